"""The HTTP API, requests side: submit, look, list with filters and pages, cancel,
retry, events; and every kind of bad input answered with a problem document.

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from api_support import ITEMS, ApiEnv, claim_all, finish, problem, run_request, submit
from conveyor.api.models import EventList, RequestPage
from conveyor.api.models import Request as RequestOut
from conveyor.api.models import Task as TaskOut
from conveyor.app import SubmitOptions
from conveyor.tasks import TaskAction

pytestmark = pytest.mark.anyio


def paths(body: dict[str, Any]) -> list[str]:
    return [e["path"] for e in body.get("errors", [])]


# ------------------------------------------------------------------------ submit
async def test_submit_answers_201_with_the_request_and_its_tasks(api: ApiEnv) -> None:
    async with api.client("submit") as c:
        r = await c.post(
            "/api/v1/requests",
            json={"pipeline": "echo", "params": ITEMS, "queue": "urgent", "priority": 5},
        )
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/json"
    req = RequestOut.model_validate(r.json())  # exactly the documented shape
    assert r.headers["location"] == f"/api/v1/requests/{req.id}"
    assert (req.pipeline, req.status, req.queue, req.priority) == ("echo", "requested", "urgent", 5)
    assert req.submitter == "submit-user"  # the token's name
    assert req.params == ITEMS
    assert [t.params for t in req.tasks] == ITEMS["items"]
    assert [t.status for t in req.tasks] == ["queued"] * 3
    assert req.counts.total == 3


async def test_get_shows_tasks_with_progress_attempts_and_timestamps(api: ApiEnv) -> None:
    async with api.client() as c:
        rid = (await submit(c))["id"]
        tasks = claim_all(api.store, rid)
        finish(api.store, tasks[:1], TaskAction.SUCCEED)
        finish(api.store, tasks[1:2], TaskAction.FAIL)
        r = await c.get(f"/api/v1/requests/{rid}")
        assert r.status_code == 200
        req = RequestOut.model_validate(r.json())
        assert req.status == "running" and req.started_at is not None
        by_status = {t.status: t for t in req.tasks}
        assert by_status["succeeded"].attempts == 1 and by_status["succeeded"].finished_at
        assert by_status["failed"].error == "boom"
        assert by_status["running"].worker == "w1"
        assert by_status["running"].progress.current == 0
        one = await c.get(f"/api/v1/tasks/{req.tasks[0].id}")
        assert one.status_code == 200
        assert TaskOut.model_validate(one.json()).id == req.tasks[0].id
        problem(await c.get("/api/v1/requests/999999"), 404)
        problem(await c.get("/api/v1/tasks/999999"), 404)


async def test_an_idempotency_key_returns_the_first_request(api: ApiEnv) -> None:
    async with api.client() as c:
        first = await submit(c, idempotency_key="etl-2026-01-31")
        again = await c.post(
            "/api/v1/requests",
            json={"pipeline": "echo", "params": ITEMS, "idempotency_key": "etl-2026-01-31"},
        )
        assert again.status_code == 200
        assert again.json()["id"] == first["id"]
        other = await c.post(
            "/api/v1/requests",
            json={
                "pipeline": "echo",
                "params": {"items": [{"name": "z"}]},
                "idempotency_key": "etl-2026-01-31",
            },
        )
        assert "already used" in problem(other, 409)["detail"]


async def test_the_result_cache_links_the_request_reused_and_can_be_bypassed(
    api: ApiEnv,
) -> None:
    async with api.client() as c:
        first = await submit(c, pipeline="cached", params={"x": 1})
        run_request(api.store, first["id"])
        reused = await submit(c, pipeline="cached", params={"x": 1})
        assert reused["status"] == "succeeded"
        assert reused["reused_request_id"] == first["id"]
        assert reused["tasks"] == []
        fresh = await submit(c, pipeline="cached", params={"x": 1}, cache={"read": False})
        assert fresh["reused_request_id"] is None
        assert fresh["status"] == "requested" and len(fresh["tasks"]) == 1


# ------------------------------------------------------------------- bad input
async def test_bad_bodies_are_answered_clearly(make_api: Any) -> None:
    api = make_api(toml=_with_small_body())
    async with api.client() as c:
        post = c.post
        url = "/api/v1/requests"
        json_type = {"content-type": "application/json"}

        body = problem(await post(url, content=b'{"pipeline": "echo",', headers=json_type), 400)
        assert "not valid JSON" in body["detail"] and "line 1" in body["detail"]
        body = problem(await post(url, content=b'{"pipeline": NaN}', headers=json_type), 400)
        assert "NaN" in body["detail"]
        problem(await post(url, content=b'{"a": 1e999}', headers=json_type), 400)
        problem(await post(url, content=b'{"a": "\\ud800"}', headers=json_type), 400)
        problem(await post(url, content=b"\xff\xfe", headers=json_type), 400)
        problem(await post(url, content=b"", headers=json_type), 400)
        problem(await post(url, content=b"[" * 1020, headers=json_type), 400)

        body = problem(await post(url, content=b"{}", headers={"content-type": "text/plain"}), 415)
        assert "application/json" in body["detail"]
        problem(await post(url, content=b"{}"), 415)  # no content type at all
        form = {"content-type": "application/x-www-form-urlencoded"}
        problem(await post(url, content=b"pipeline=echo", headers=form), 415)
        # a JSON content type with parameters, or a +json one, is fine
        ok = await post(
            url,
            content=json.dumps({"pipeline": "plain", "params": {}}).encode(),
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert ok.status_code == 201

        big = json.dumps({"pipeline": "plain", "params": {"x": "y" * 5000}}).encode()
        body = problem(await post(url, content=big, headers=json_type), 413)
        assert "1024 bytes" in body["detail"]

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 500

        problem(await post(url, content=chunks(), headers=json_type), 413)


async def test_values_no_store_keeps_exactly_are_refused_and_nothing_is_stored(
    api: ApiEnv,
) -> None:
    # SQLite gives integers beyond 64 bits back as floats (or infinity); Python parses
    # no more than 4,300 digits; values nested hundreds deep break whoever reads them.
    json_type = {"content-type": "application/json"}
    nested = "[" * 300 + "]" * 300
    cases = [
        ('{"pipeline": "plain", "params": {"n": -' + "9" * 5000 + "}}", "5000 digits"),
        ('{"pipeline": "plain", "params": {"deep": ' + nested + "}}", "$.params.deep"),
        ('{"pipeline": "plain", "params": {"s": ["ok", "\\ud800"]}}', "$.params.s[1]"),
    ]
    async with api.client() as c:
        for text, said in cases:
            body = problem(await c.post("/api/v1/requests", content=text, headers=json_type), 400)
            assert body["type"].endswith("bad-json") and said in body["detail"], body
        # a bare number beyond 64 bits would come back from SQLite as a float
        bare = '{"pipeline": "plain", "params": 12345678901234567890}'
        body = problem(await c.post("/api/v1/requests", content=bare, headers=json_type), 422)
        assert "beyond 64 bits" in json.dumps(body), body
        ok = {"pipeline": "plain", "params": {"n": 2**64, "m": -(2**63), "deep": [[[1]]]}}
        created = await submit(c, **ok)
        assert created["params"] == ok["params"]
    assert created["id"] == 1  # the first stored


def _with_small_body() -> str:
    from api_support import API_TOML

    return "[api]\nmax_body = 1024\n" + API_TOML


async def test_invalid_fields_are_named_by_their_json_path(api: ApiEnv) -> None:
    async with api.client() as c:
        url = "/api/v1/requests"
        body = problem(await c.post(url, json={"pipeline": "nope", "params": {}}), 422)
        assert paths(body) == ["$.pipeline"]
        assert "unknown pipeline 'nope'" in body["detail"] and "echo" in body["detail"]

        bad = {"items": [{"name": "a"}, {"name": 7}]}
        body = problem(await c.post(url, json={"pipeline": "echo", "params": bad}), 422)
        assert paths(body) == ["$.params.items[1].name"]
        body = problem(await c.post(url, json={"pipeline": "echo", "params": {"items": [{}]}}), 422)
        assert paths(body) == ["$.params.items[0].name"]

        body = problem(await c.post(url, json={"params": {}}), 422)
        assert paths(body) == ["$.pipeline"]
        body = problem(
            await c.post(url, json={"pipeline": "plain", "params": {}, "colour": 1}), 422
        )
        assert paths(body) == ["$.colour"]
        body = problem(
            await c.post(url, json={"pipeline": "plain", "params": {}, "priority": 2**40}), 422
        )
        assert paths(body) == ["$.priority"]
        body = problem(
            await c.post(url, json={"pipeline": "plain", "params": {}, "queue": "a\x00b"}), 422
        )
        assert paths(body) == ["$.queue"]
        body = problem(
            await c.post(url, json={"pipeline": "plain", "params": {}, "cache": {"read": "no"}}),
            422,
        )
        assert paths(body) == ["$.cache.read"]
        body = problem(await c.post(url, json=["not", "an", "object"]), 422)
        assert paths(body) == ["$"]


# ------------------------------------------------------------------------ list
async def test_list_filters_newest_first(api: ApiEnv) -> None:
    async with api.client("submit") as c:
        a = await submit(c, params={"items": [{"name": "alpha/100%_done"}]})
        b = await submit(c, pipeline="plain", params={"path": 'C:\\logs\\"A146B#11"'})
    async with api.client("admin") as c:
        d = await submit(c, pipeline="plain", params={"note": "Ünïcode"}, queue="urgent")
        run_request(api.store, d["id"], TaskAction.FAIL)

        async def ids(**query: Any) -> list[int]:
            r = await c.get("/api/v1/requests", params=query)
            assert r.status_code == 200, r.text
            page = RequestPage.model_validate(r.json())
            assert page.next_cursor is None
            return [item.id for item in page.items]

        assert await ids() == [d["id"], b["id"], a["id"]]
        assert await ids(status="failed") == [d["id"]]
        assert await ids(pipeline="plain") == [d["id"], b["id"]]
        assert await ids(queue="urgent") == [d["id"]]
        assert await ids(submitter="submit-user") == [b["id"], a["id"]]
        assert await ids(q="ALPHA") == [a["id"]]
        assert await ids(q="100%_") == [a["id"]]
        assert await ids(q="0%") == [a["id"]]
        assert await ids(q="%") == [a["id"]]
        assert await ids(q="_") == [a["id"]]
        assert await ids(q='\\"A146B#11"') == [b["id"]]
        assert await ids(q="Ünïcode") == [d["id"]]
        assert await ids(q="nothing like it") == []
        assert await ids(q="plain", pipeline="plain", status="requested") == []

        t = (await c.get(f"/api/v1/requests/{b['id']}")).json()["created_at"]
        assert await ids(created_after=t) == [d["id"], b["id"]]
        assert await ids(created_before=t) == [a["id"]]
        # (an ISO time has microseconds: a hair before b's creation, b included)
        iso = datetime.fromtimestamp(t - 0.0005, UTC).isoformat()
        assert await ids(created_after=iso) == [d["id"], b["id"]]
        naive = datetime.fromtimestamp(t - 0.0005, UTC).replace(tzinfo=None).isoformat()
        assert await ids(created_after=naive) == [d["id"], b["id"]]

        for query, path in [
            ({"status": "sleeping"}, "query.status"),
            ({"limit": 0}, "query.limit"),
            ({"limit": 1001}, "query.limit"),
            ({"created_after": "yesterday"}, "query.created_after"),
            ({"created_after": "nan"}, "query.created_after"),
            ({"cursor": "garbage!"}, "query.cursor"),
            ({"q": ""}, "query.q"),
            ({"pipeline": "a\x01"}, "query.pipeline"),
        ]:
            body = problem(await c.get("/api/v1/requests", params=query), 422)
            assert paths(body) == [path], query


async def test_pages_follow_the_cursor_to_the_end(api: ApiEnv) -> None:
    async with api.client() as c:
        made = [(await submit(c, pipeline="plain", params={"n": i}))["id"] for i in range(7)]
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            query: dict[str, Any] = {"limit": 3, "pipeline": "plain"}
            if cursor:
                query["cursor"] = cursor
            page = (await c.get("/api/v1/requests", params=query)).json()
            pages += 1
            seen += [item["id"] for item in page["items"]]
            assert all("tasks" not in item for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert isinstance(cursor, str)
        assert seen == sorted(made, reverse=True)
        assert pages == 3
        # exactly a page's worth left: no empty page after it
        last = (await c.get("/api/v1/requests", params={"limit": 7})).json()
        assert last["next_cursor"] is None
        # a full page of the largest size still says whether more follow
        bulk = [api.app.prepare("plain", {"bulk": i}, SubmitOptions()) for i in range(1000)]
        api.store.submit_many(bulk, time.time())
        page = (await c.get("/api/v1/requests", params={"limit": 1000})).json()
        assert len(page["items"]) == 1000 and page["next_cursor"] is not None


# -------------------------------------------------------------- cancel and retry
async def test_cancel_and_retry(api: ApiEnv) -> None:
    async with api.client() as c:
        rid = (await submit(c))["id"]
        r = await c.post(f"/api/v1/requests/{rid}/cancel")
        assert r.status_code == 200
        req = RequestOut.model_validate(r.json())
        assert req.status == "cancelled"
        assert {t.status for t in req.tasks} == {"cancelled"}

        r = await c.post(f"/api/v1/requests/{rid}/retry")
        assert r.status_code == 200
        assert r.json()["status"] == "requested"
        assert {t["status"] for t in r.json()["tasks"]} == {"queued"}

        body = problem(await c.post(f"/api/v1/requests/{rid}/retry"), 409)
        assert "only a failed or cancelled request" in body["detail"]
        problem(await c.post("/api/v1/requests/424242/cancel"), 404)
        problem(await c.post("/api/v1/requests/424242/retry"), 404)
        body = problem(await c.post("/api/v1/requests/0/cancel"), 422)
        assert paths(body) == ["path.request_id"]
        problem(await c.get("/api/v1/requests/99999999999999999999999"), 422)


async def test_a_requests_events_oldest_first(api: ApiEnv) -> None:
    async with api.client() as c:
        rid = (await submit(c, params={"items": [{"name": "a"}]}))["id"]
        other = (await submit(c))["id"]
        run_request(api.store, rid)
        r = await c.get(f"/api/v1/requests/{rid}/events")
        assert r.status_code == 200
        events = EventList.model_validate(r.json()).items
        assert [e.kind for e in events] == [
            "request.submitted",
            "task.running",
            "request.running",
            "task.succeeded",
            "request.succeeded",
        ] or [e.kind for e in events] == [
            "request.submitted",
            "request.running",
            "task.running",
            "task.succeeded",
            "request.succeeded",
        ]
        assert {e.request_id for e in events} == {rid}
        assert events == sorted(events, key=lambda e: e.id)
        later = await c.get(f"/api/v1/requests/{rid}/events", params={"after": events[2].id})
        assert [e["id"] for e in later.json()["items"]] == [e.id for e in events[3:]]
        assert other != rid
        problem(await c.get("/api/v1/requests/9999/events"), 404)


async def test_unknown_endpoints_and_methods_are_problems_too(api: ApiEnv) -> None:
    async with api.client() as c:
        problem(await c.get("/api/v1/nothing-here"), 404)
        r = await c.put("/api/v1/requests/1/cancel")
        problem(r, 405)
        assert "POST" in r.headers["allow"]
