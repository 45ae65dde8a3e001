"""Tokens and roles over HTTP: missing, wrong, malformed, revoked and under-privileged
tokens; whose requests a token may change; read_open; nothing secret stored or logged.

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa

from api_support import API_TOML, ApiEnv, problem, submit
from conveyor.app import Conveyor
from conveyor.config import parse_config
from conveyor.tokens import TOKEN_PREFIX, Role, hash_secret

pytestmark = pytest.mark.anyio

# (method, path, role needed)
ENDPOINTS = [
    ("GET", "/api/v1/requests", "read"),
    ("GET", "/api/v1/requests/1", "read"),
    ("GET", "/api/v1/requests/1/events", "read"),
    ("GET", "/api/v1/tasks/1", "read"),
    ("GET", "/api/v1/tasks/1/log", "read"),
    ("GET", "/api/v1/events/stream", "read"),
    ("GET", "/api/v1/queues", "read"),
    ("GET", "/api/v1/workers", "read"),
    ("GET", "/api/v1/pipelines", "read"),
    ("POST", "/api/v1/requests", "submit"),
    ("POST", "/api/v1/requests/1/cancel", "submit"),
    ("POST", "/api/v1/requests/1/retry", "submit"),
    ("POST", "/api/v1/queues/default/pause", "admin"),
    ("POST", "/api/v1/queues/default/resume", "admin"),
]
RANK = {"read": 0, "submit": 1, "admin": 2}


def unauthorized(r: httpx.Response) -> dict[str, Any]:
    body = problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    return body


async def test_every_endpoint_but_health_needs_a_token(api: ApiEnv) -> None:
    async with api.client(role=None) as c:
        for method, path, _ in ENDPOINTS:
            body = unauthorized(await c.request(method, path))
            assert "needs a token" in body["detail"], path
        for path in ("/api/v1/healthz", "/api/v1/readyz", "/healthz", "/readyz"):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/openapi.json")).status_code == 200


async def test_wrong_malformed_and_revoked_tokens_are_refused(api: ApiEnv) -> None:
    async with api.client(role=None) as c:
        for header in (
            "Bearer cvy_" + "A" * 43,  # well formed, unknown
            "Bearer not-even-a-token",
            "Bearer " + api.tokens["admin"] + "x",
            "Basic YWRtaW46YWRtaW4=",
            "Bearer",
            api.tokens["admin"],  # no scheme
        ):
            body = unauthorized(await c.get("/api/v1/queues", headers={"Authorization": header}))
            assert "token" in body["detail"] or "Bearer" in body["detail"]


@pytest.mark.parametrize("ttl", [0.0, 0.4])
async def test_a_revoked_token_stops_working_within_the_token_cache_time(
    make_api: Any, ttl: float
) -> None:
    """A token checked once is trusted for `[api] token_cache` seconds (0: never)."""
    api: ApiEnv = make_api(toml=f"[api]\ntoken_cache = {ttl}\n" + API_TOML)
    good = api.auth("read")
    async with api.client(role=None) as c:
        assert (await c.get("/api/v1/queues", headers=good)).status_code == 200
        api.app.revoke_token("read-user")
        revoked = time.monotonic()
        while (r := await c.get("/api/v1/queues", headers=good)).status_code == 200:
            assert ttl and time.monotonic() - revoked < ttl + 0.5, "still trusted"
            await anyio.sleep(0.05)
        assert "revoked" in unauthorized(r)["detail"]
        # and, being revoked, it is not trusted again
        assert (await c.get("/api/v1/queues", headers=good)).status_code == 401


async def test_a_role_below_the_one_needed_is_403(api: ApiEnv) -> None:
    async with api.client() as admin:
        rid = (await submit(admin))["id"]
    assert rid == 1  # the ids the table names
    for role in ("read", "submit"):
        async with api.client(role) as c:
            for method, path, needed in ENDPOINTS:
                if RANK[role] >= RANK[needed] or path.endswith("/stream"):
                    continue
                r = await c.request(method, path, json={"pipeline": "plain", "params": {}})
                body = problem(r, 403)
                assert f"has role {role}; this needs {needed}" in body["detail"], path


async def test_submit_tokens_change_their_own_requests_admins_anyones(make_api: Any) -> None:
    api: ApiEnv = make_api()
    _, other = api.app.create_token("other", Role.SUBMIT)
    async with api.client("submit") as mine:
        rid = (await submit(mine))["id"]
        theirs = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api.asgi),
            base_url="http://conveyor.test",
            headers={"Authorization": f"Bearer {other}"},
        )
        async with theirs:
            body = problem(await theirs.post(f"/api/v1/requests/{rid}/cancel"), 403)
            assert "submitted by 'submit-user'" in body["detail"]
            problem(await theirs.post(f"/api/v1/requests/{rid}/retry"), 403)
            # reading anyone's is fine
            assert (await theirs.get(f"/api/v1/requests/{rid}")).status_code == 200
        assert (await mine.post(f"/api/v1/requests/{rid}/cancel")).status_code == 200
    async with api.client("admin") as admin:
        r = await admin.post(f"/api/v1/requests/{rid}/retry")
        assert r.status_code == 200 and r.json()["status"] == "requested"
        assert (await admin.post(f"/api/v1/requests/{rid}/cancel")).status_code == 200


async def test_admins_pause_and_resume_queues(api: ApiEnv) -> None:
    async with api.client("admin") as c:
        r = await c.post("/api/v1/queues/test/pause")
        assert r.status_code == 200 and r.json()["paused"] is True
        assert r.json()["name"] == "test"
        queues = {q["name"]: q for q in (await c.get("/api/v1/queues")).json()["items"]}
        assert queues["test"]["paused"] and not queues["default"]["paused"]
        r = await c.post("/api/v1/queues/test/resume")
        assert r.json()["paused"] is False
        r = await c.post("/api/v1/queues/*/pause")
        assert r.json() == {**r.json(), "name": "*", "paused": True}
        queues = (await c.get("/api/v1/queues")).json()["items"]
        assert all(q["paused"] for q in queues)
        await c.post("/api/v1/queues/*/resume")
        assert not any(q["paused"] for q in (await c.get("/api/v1/queues")).json()["items"])


async def test_read_open_lets_reading_go_without_a_token(make_api: Any) -> None:
    api: ApiEnv = make_api(toml="[api]\nread_open = true\n" + API_TOML)
    async with api.client(role=None) as c:
        for method, path, needed in ENDPOINTS:
            if needed != "read" or path.endswith(("/stream", "/log")):
                continue
            r = await c.request(method, path)
            assert r.status_code in (200, 404), (path, r.text)
        unauthorized(await c.post("/api/v1/requests", json={"pipeline": "plain", "params": {}}))
        unauthorized(await c.post("/api/v1/queues/default/pause"))
        # a token that is sent is checked all the same
        bad = {"Authorization": "Bearer cvy_" + "B" * 43}
        unauthorized(await c.get("/api/v1/queues", headers=bad))
    doc = (await _get_doc(api))["paths"]
    assert {"token": []} in doc["/api/v1/queues"]["get"]["security"]
    assert {} in doc["/api/v1/queues"]["get"]["security"]
    assert doc["/api/v1/requests"]["post"]["security"] == [{"token": []}]


async def _get_doc(api: ApiEnv) -> dict[str, Any]:
    async with api.client(role=None) as c:
        doc: dict[str, Any] = (await c.get("/openapi.json")).json()
        return doc


async def test_only_hashes_are_stored_and_last_use_is_noted(api: ApiEnv) -> None:
    secret = api.tokens["submit"]
    assert secret.startswith(TOKEN_PREFIX) and len(secret) >= 40
    engine = api.store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM api_tokens"))]
    assert len(rows) == 3
    assert not any(secret in str(v) for row in rows for v in row.values())
    row = next(r for r in rows if r["name"] == "submit-user")
    assert row["token_hash"] == hash_secret(secret)
    assert row["prefix"] == secret[:10] and row["last_used_at"] is None

    async with api.client("submit") as c:
        await c.get("/api/v1/queues")
    listed = {t.name: t for t in api.app.list_tokens()}
    assert listed["submit-user"].last_used_at is not None
    assert listed["read-user"].last_used_at is None


async def test_no_token_reaches_the_log(api: ApiEnv, caplog: pytest.LogCaptureFixture) -> None:
    secret = api.tokens["admin"]
    with caplog.at_level(logging.DEBUG):
        async with api.client("admin") as c:
            await submit(c, pipeline="plain", params={})
            await c.get(
                f"/spotbot/spotbot_offline_submitter.php?context=STATUS_CHECK"
                f"&spotbot_offline_req_id=1&token={secret}"
            )
            await c.get("/api/v1/requests", headers={"Authorization": "Bearer cvy_wrong_one_x"})
    # (the test's own HTTP client logs its URLs: only the server's records count)
    text = "\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records if r.name.startswith("conveyor")
    )
    assert "conveyor.api.access" in text and "/api/v1/requests" in text
    assert "token=***" in text
    assert secret not in text and "cvy_wrong_one_x" not in text


def test_an_unreachable_database_is_a_503_not_a_500(tmp_path: Any) -> None:
    import asyncio

    config = parse_config(
        {"pipelines": {"plain": {"executor": "python", "handler": "a.b:c"}}},
        tmp_path,
        {"CONVEYOR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    app = Conveyor(config)
    from conveyor.api import create_app

    asgi = create_app(app)

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://t"
        ) as c:
            bearer = {"Authorization": "Bearer cvy_" + "C" * 43}
            return [
                await c.get("/api/v1/readyz"),
                await c.get("/api/v1/requests", headers=bearer),
                await c.get("/api/v1/healthz"),
            ]

    ready, listed, healthy = asyncio.run(go())
    for r in (ready, listed):
        body = problem(r, 503)
        assert "database unavailable" in body["detail"]
        assert r.headers["retry-after"]
    assert healthy.status_code == 200
    app.close()
