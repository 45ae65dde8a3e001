"""Pipelines, workers, health, and the OpenAPI document: complete (every route, every
operation's role and answers) and held to the views the answers are made of.

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import pytest

from api_support import ApiEnv, problem, run_request
from conveyor.api.models import PipelineList, QueueList, WorkerList
from conveyor.store import WorkerInfo

pytestmark = pytest.mark.anyio


async def test_pipelines_with_their_params_schemas(api: ApiEnv) -> None:
    async with api.client("read") as c:
        r = await c.get("/api/v1/pipelines")
    assert r.status_code == 200
    items = {p.name: p for p in PipelineList.model_validate(r.json()).items}
    assert sorted(items) == ["cached", "echo", "plain"]
    echo = items["echo"]
    assert echo.split == "items" and echo.max_attempts == 2 and echo.executor == "python"
    assert echo.params_schema is not None and echo.params_schema["required"] == ["items"]
    assert items["cached"].cache == 3600
    assert items["plain"].params_schema is None and items["plain"].queue == "test"
    assert "handler" not in r.text and "conveyor.examples" not in r.text  # how it runs: private


async def test_workers_alive_and_all(api: ApiEnv) -> None:
    now = time.time()
    api.store.register_worker(WorkerInfo("w-old", "h1", 11, ("default",), 2), now - 600)
    api.store.register_worker(WorkerInfo("w-new", "h2", 12, ("urgent", "default"), 4), now)
    api.store.stop_worker("w-old", now - 500)
    async with api.client("read") as c:
        alive = WorkerList.model_validate((await c.get("/api/v1/workers")).json()).items
        every = (await c.get("/api/v1/workers", params={"all": "true"})).json()
    assert [w.id for w in alive] == ["w-new"]
    assert alive[0].queues == ["urgent", "default"] and alive[0].concurrency == 4
    assert [w["id"] for w in WorkerList.model_validate(every).model_dump()["items"]] == [
        "w-new",
        "w-old",
    ]


async def test_queues_list_counts(api: ApiEnv) -> None:
    rid = api.app.submit("plain", {}).request.id
    api.app.submit("echo", {"items": [{"name": "a"}, {"name": "b"}]})
    run_request(api.store, rid)
    async with api.client("read") as c:
        queues = QueueList.model_validate((await c.get("/api/v1/queues")).json()).items
    by_name = {q.name: q for q in queues}
    assert [q.name for q in queues][:5] == ["urgent", "production", "default", "test", "dev"]
    assert by_name["default"].queued == 2 and by_name["test"].succeeded == 1


async def test_health_and_readiness(api: ApiEnv) -> None:
    async with api.client(role=None) as c:
        assert (await c.get("/api/v1/healthz")).json() == {"status": "ok"}
        assert (await c.get("/api/v1/readyz")).json() == {"status": "ready"}


async def test_the_openapi_document_is_complete(api: ApiEnv) -> None:
    async with api.client(role=None) as c:
        r = await c.get("/openapi.json")
    doc: dict[str, Any] = r.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    expected = {
        ("POST", "/api/v1/requests"),
        ("GET", "/api/v1/requests"),
        ("GET", "/api/v1/requests/{request_id}"),
        ("POST", "/api/v1/requests/{request_id}/cancel"),
        ("POST", "/api/v1/requests/{request_id}/retry"),
        ("GET", "/api/v1/requests/{request_id}/events"),
        ("GET", "/api/v1/tasks/{task_id}"),
        ("GET", "/api/v1/tasks/{task_id}/log"),
        ("GET", "/api/v1/tasks/{task_id}/artifacts"),
        ("GET", "/api/v1/tasks/{task_id}/artifacts/{name}"),
        ("GET", "/api/v1/events/stream"),
        ("GET", "/api/v1/queues"),
        ("POST", "/api/v1/queues/{name}/pause"),
        ("POST", "/api/v1/queues/{name}/resume"),
        ("GET", "/api/v1/workers"),
        ("GET", "/api/v1/pipelines"),
        ("GET", "/api/v1/healthz"),
        ("GET", "/api/v1/readyz"),
        ("GET", "/spotbot/spotbot_offline_submitter.php"),
        ("POST", "/spotbot/spotbot_offline_submitter.php"),
    }
    assert documented == expected
    async with api.client(role=None) as c:  # each one is served
        for method, path in documented:
            url = path.format(request_id=1, task_id=1, name="default")
            r = await c.request(method, url, params={"timeout": 0.1})
            assert r.status_code in (200, 400, 401), (method, path, r.text)
    schemas = doc["components"]["schemas"]
    assert schemas["Submit"]["properties"]["pipeline"]["enum"] == ["cached", "echo", "plain"]
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail"}
    assert doc["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    op_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method} {path}"
            if "healthz" in path or "readyz" in path:
                assert "security" not in op, where
                continue
            if path.startswith("/spotbot"):
                assert {} in op["security"], where
                continue
            assert op["x-required-role"] in ("read", "submit", "admin"), where
            assert op["security"] == [{"token": []}], where
            for status in ("401", "403"):
                content = op["responses"][status]["content"]
                assert list(content) == ["application/problem+json"], where
    submit = doc["paths"]["/api/v1/requests"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Submit"
    }
    assert {"200", "201", "400", "409", "413", "415", "422"} <= set(submit["responses"])


async def test_problems_name_the_status_and_are_never_html(api: ApiEnv) -> None:
    async with api.client() as c:
        body = problem(await c.get("/api/v1/requests/12345"), 404)
        assert body == {
            "type": "urn:conveyor:problem:not-found",
            "title": "Not Found",
            "status": 404,
            "detail": "no request 12345",
        }
