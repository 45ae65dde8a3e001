"""The dashboard over the ASGI app, as a browser would use it without running scripts:
logging in with a token, who may see and do what (roles, CSRF, read_open, revoked
tokens), what each page shows, the filters and pagination, and /metrics.

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api_support import ApiEnv, claim_all, run_request, submit
from conveyor.store import WorkerInfo
from conveyor.tasks import Outcome, TaskAction

pytestmark = pytest.mark.anyio


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


@asynccontextmanager
async def login(api: ApiEnv, role: str = "admin") -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client logged in with the token of `role`."""
    async with api.client(role=None) as c:
        await _log_in(api, c, role)
        yield c


async def _log_in(api: ApiEnv, c: httpx.AsyncClient, role: str) -> None:
    page = await c.get("/login")
    r = await c.post(
        "/login", data={"token": api.tokens[role], "csrf": _csrf(page.text), "next": "/queues"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/queues", r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert api.tokens[role] not in cookie  # the cookie never holds the token


async def test_pages_need_a_login_and_show_what_is_stored(api: ApiEnv) -> None:
    async with api.client(role=None) as anon:
        r = await anon.get("/requests")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/requests"
        live = await anon.get("/", headers={"HX-Request": "true"})
        assert live.headers["HX-Redirect"] == "/login?next=/"
        assert (await anon.get("/static/htmx-2.0.11.min.js")).status_code == 200

    async with api.client() as c:
        ok = (await submit(c))["id"]
        bad = (await submit(c, pipeline="plain", params={"find": "needle-in-params"}))["id"]
    run_request(api.store, ok)
    run_request(api.store, bad, TaskAction.FAIL)
    now = time.time()
    api.store.register_worker(WorkerInfo("w-1", "host-a", 4242, ("default", "test"), 3), now)

    async with login(api, "read") as c:
        answer = await c.get("/")
        overview = answer.text
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert "Tasks finished per hour" in overview and "<svg" in overview
        assert re.search(r'<th scope="row"><a href="/requests\?queue=test">test</a></th>', overview)
        assert "1</span> workers running" in overview.replace("\n", "")
        # a live update is the fragment alone, which polls again
        fragment = (await c.get("/", headers={"HX-Request": "true"})).text
        assert fragment.startswith('<div id="live"') and "<html" not in fragment
        assert 'hx-trigger="every 2.0s"' in fragment

        detail = (await c.get(f"/requests/{ok}")).text
        assert "succeeded" in detail and "Timeline" in detail and "request.submitted" in detail
        assert len(re.findall(r'<tr id="task-\d+">', detail)) == 3
        assert (await c.get("/requests/999999")).status_code == 404

        failed = (await c.get("/failed")).text
        assert f"request {bad}" in failed and "boom" in failed
        assert f"request {bad}" in (await c.get("/failed", params={"q": "needle"})).text
        assert "No failed tasks" in (await c.get("/failed", params={"q": "nothing-so"})).text

        workers = (await c.get("/workers")).text
        assert "host-a" in workers and "4242" in workers and "default, test" in workers

        queues = (await c.get("/queues")).text
        assert "Pause" not in queues.split("</h1>", 1)[1].split("need an admin")[1]


async def test_a_quiet_attempts_log_from_the_database_is_shown(api: ApiEnv) -> None:
    """The log panel, the log as a file and the failed tasks' tails read a quiet
    attempt's log (kept in the database, not in a file) as they read any other."""
    async with api.client() as c:
        rid = (await submit(c, pipeline="plain", params={"items": [{"n": 1}]}))["id"]
    (task,) = claim_all(api.store, rid)
    quiet = "$ false\nexit code 1\n"
    api.store.finish(
        "w1", [Outcome(task.id, TaskAction.FAIL, error="exit code 1", log=quiet)], time.time()
    )
    async with login(api, "read") as c:
        panel = (await c.get(f"/tasks/{task.id}/log")).text
        assert "$ false\nexit code 1" in panel
        assert "exit code 1" in (await c.get(f"/tasks/{task.id}/log", params={"tail": 1})).text
        whole = await c.get(f"/tasks/{task.id}/log.txt")
        assert whole.status_code == 200 and whole.text == quiet
        assert (await c.get(f"/tasks/{task.id}/log.txt", params={"attempt": 2})).status_code == 404
        failed = (await c.get("/failed")).text
        assert f"request {rid}" in failed and "$ false" in failed


async def test_requests_search_filters_and_pages(api: ApiEnv) -> None:
    async with api.client() as c:
        ids = [
            (await submit(c, pipeline="plain", params={"n": i, "tag": f"t{i % 3}"}))["id"]
            for i in range(7)
        ]
        other = (await submit(c))["id"]
    async with login(api, "read") as c:

        def listed(html: str) -> list[int]:
            return [int(x) for x in re.findall(r'<tr id="request-(\d+)">', html)]

        every = listed((await c.get("/requests")).text)
        assert every == sorted([*ids, other], reverse=True)
        assert listed((await c.get("/requests", params={"pipeline": "plain"})).text) == sorted(
            ids, reverse=True
        )
        assert listed((await c.get("/requests", params={"q": "T1"})).text) == [
            ids[4],
            ids[1],
        ]
        assert listed((await c.get("/requests", params={"q": str(other)})).text) == [other]
        assert listed((await c.get("/requests", params={"submitter": "admin-user"})).text)
        assert not listed((await c.get("/requests", params={"submitter": "nobody"})).text)
        assert not listed((await c.get("/requests", params={"since": "2999-01-01T00:00"})).text)
        bad = (await c.get("/requests", params={"since": "yesterday"})).text
        assert "is not a date and time" in bad

        # keyset pages: the "Older" link carries the filters and the last id seen
        api_page = await c.get("/requests", params={"pipeline": "plain"})
        assert "Older" not in api_page.text
    # 60 more: a page holds 50
    async with api.client() as c2:
        for i in range(60):
            await submit(c2, pipeline="plain", params={"bulk": i})
    async with login(api, "read") as c:
        first = (await c.get("/requests", params={"pipeline": "plain"})).text
        older = re.search(r'href="(/requests\?[^"]+)" rel="next"', first)
        assert older
        second = (await c.get(older.group(1).replace("&amp;", "&"))).text
        got = listed(first) + listed(second)
        assert len(got) == 67 and got == sorted(got, reverse=True) and len(set(got)) == 67


async def test_pausing_needs_admin_and_the_forms_token(api: ApiEnv) -> None:
    async with login(api, "read") as reader:
        r = await reader.post("/queues/test/pause", data={"csrf": "x"})
        assert r.status_code == 403
    assert "test" not in api.app.store.paused_queues()

    async with login(api, "admin") as admin:
        page = (await admin.get("/queues")).text
        assert 'aria-label="Pause queue test"' in page
        token = _csrf(page)
        assert (await admin.post("/queues/test/pause", data={"csrf": "forged"})).status_code == 403
        r = await admin.post(
            "/queues/test/pause", data={"csrf": token}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403
        assert "test" not in api.app.store.paused_queues()

        r = await admin.post("/queues/test/pause", data={"csrf": token})
        assert r.status_code == 303
        assert "test" in api.app.store.paused_queues()
        live = await admin.post(
            "/queues/test/resume", data={"csrf": token}, headers={"HX-Request": "true"}
        )
        assert live.status_code == 200 and live.text.startswith('<div id="live"')
        assert "test" not in api.app.store.paused_queues()

        # revoking the token ends its sessions
        api.app.revoke_token("admin-user")
        r = await admin.get("/queues")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")

        # logging out: the cookie goes
        async with login(api, "submit") as again:
            out = await again.post("/logout", data={"csrf": _csrf((await again.get("/")).text)})
            assert out.status_code == 303
            assert (await again.get("/")).status_code == 303


async def test_login_refuses_bad_tokens_and_forms(api: ApiEnv) -> None:
    async with api.client(role=None) as c:
        page = await c.get("/login")
        r = await c.post("/login", data={"token": "cvy_nope", "csrf": _csrf(page.text)})
        assert r.status_code == 401 and "not valid" in r.text
        assert "conveyor_session" not in r.headers.get("set-cookie", "")
        r = await c.post("/login", data={"token": api.tokens["read"], "csrf": "forged"})
        assert r.status_code == 400 and "expired" in r.text
        # never sent anywhere but this site
        page = await c.get("/login")
        r = await c.post(
            "/login",
            data={"token": api.tokens["read"], "csrf": _csrf(page.text), "next": "//evil.example"},
        )
        assert r.status_code == 303 and r.headers["location"] == "/"


async def test_read_open_shows_pages_without_a_login(make_api: Any) -> None:
    from api_support import API_TOML

    api = make_api(API_TOML + "\n[api]\nread_open = true\n")
    async with api.client(role=None) as c:
        r = await c.get("/queues")
        assert r.status_code == 200 and "read-only view" in r.text
        assert 'aria-label="Pause' not in r.text
        r = await c.post("/queues/test/pause", data={"csrf": ""})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


async def test_metrics(api: ApiEnv) -> None:
    async with api.client() as c:
        done = (await submit(c))["id"]
        failed = (await submit(c, pipeline="plain"))["id"]
        await submit(c, pipeline="plain")
        assert (await c.get("/api/v1/requests/1")).status_code == 200
    run_request(api.store, done)
    run_request(api.store, failed, TaskAction.FAIL)
    api.store.register_worker(WorkerInfo("w-1", "h", 1, ("default",), 2), time.time())

    async with api.client(role=None) as anon:
        assert (await anon.get("/metrics")).status_code == 401
    async with api.client("read") as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(series: str) -> float:
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert found, f"{series} not in\n{text}"
        return float(found.group(1))

    assert value('conveyor_queue_tasks{queue="default",status="succeeded"}') == 3
    assert value('conveyor_queue_tasks{queue="test",status="failed"}') == 1
    assert value('conveyor_queue_tasks{queue="test",status="queued"}') == 1
    assert value('conveyor_tasks_started_total{pipeline="echo"}') == 3
    assert value('conveyor_tasks_succeeded_total{pipeline="echo"}') == 3
    assert value('conveyor_tasks_failed_total{pipeline="plain"}') == 1
    assert value('conveyor_task_duration_seconds_count{pipeline="echo"}') == 3
    assert value('conveyor_task_duration_seconds_bucket{le="+Inf",pipeline="echo"}') == 3
    assert value("conveyor_workers_alive") == 1
    assert value("conveyor_lease_expiries_total") == 0
    assert value("conveyor_database_up") == 1
    assert (
        value(
            'conveyor_api_requests_total{method="GET",route="/api/v1/requests/{request_id}",'
            'status="200"}'
        )
        == 1
    )
    assert "conveyor_ingest_" not in text  # no spool directories: nothing about ingestion
