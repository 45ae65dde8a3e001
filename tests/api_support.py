"""Fixtures and helpers of the HTTP API tests (a pytest plugin of the root conftest): an
API over a test database with a token of each role, clients for it (in-process over
ASGI, or a real uvicorn on a loopback port for streams), problem documents, and moving
tasks along by hand, as a worker would."""

from __future__ import annotations

import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conveyor.api import create_app
from conveyor.app import Conveyor
from conveyor.config import builtin_config_path, parse_config
from conveyor.store import Store
from conveyor.tasks import Outcome, Task, TaskAction
from conveyor.tokens import Role

# An `echo` pipeline that splits params.items into tasks, with a schema; `plain` takes
# anything; `cached` reuses results for an hour.
API_TOML = """
[pipelines.echo]
executor = "python"
handler = "conveyor.examples.handlers:noop"
split = "items"
retries = 1
[pipelines.echo.schema]
type = "object"
required = ["items"]
properties.items.type = "array"
properties.items.minItems = 1
properties.items.items = { type = "object", required = ["name"], properties.name.type = "string" }

[pipelines.plain]
executor = "python"
handler = "conveyor.examples.handlers:noop"
queue = "test"

[pipelines.cached]
executor = "python"
handler = "conveyor.examples.handlers:noop"
cache = 3600
"""


@dataclass
class ApiEnv:
    app: Conveyor
    asgi: FastAPI
    tokens: dict[str, str]  # role -> token; each token is named "<role>-user"

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def client(self, role: str | None = "admin") -> httpx.AsyncClient:
        """An in-process client (answers are read whole: not for streams)."""
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.asgi),
            base_url="http://conveyor.test",
            headers=self.auth(role) if role else {},
        )

    @property
    def store(self) -> Store:
        return self.app.store


def make_env(app: Conveyor, **kwargs: Any) -> ApiEnv:
    app.store.upgrade()
    tokens = {r.value: app.create_token(f"{r.value}-user", r)[1] for r in Role}
    return ApiEnv(app, create_app(app, **kwargs), tokens)


def builtin_app(db_url: str, tmp_path: Path, extra_toml: str = "") -> Conveyor:
    """The built-in example config (the `spotbot` pipeline among them), plus extra TOML."""
    path = builtin_config_path()
    data = tomllib.loads(path.read_text() + "\n" + extra_toml)
    env = {"CONVEYOR_DATABASE_URL": db_url, "CONVEYOR_ARTIFACTS": str(tmp_path / "artifacts")}
    return Conveyor(parse_config(data, path.parent, env, data_dir=tmp_path))


# ------------------------------------------------------------------ a real server
@contextmanager
def live_server(asgi: FastAPI) -> Iterator[str]:
    """uvicorn on a free loopback port, in a thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        asgi, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asgi.state.hub.close()
        server.should_exit = True
        thread.join(10)
        sock.close()


# ------------------------------------------------------------- moving tasks along
def claim_all(store: Store, request_id: int, worker: str = "w1") -> list[Task]:
    """Claim every queued task of the request (as a worker would); others claimed on
    the way go back."""
    req = store.get_request(request_id)
    assert req is not None
    mine: list[Task] = []
    queues = sorted({t.queue for t in req.tasks})
    for _ in range(20):
        got = store.claim(worker, queues, 50, 30.0, time.time())
        if not got:
            break
        mine += [t for t in got if t.request_id == request_id]
        others = [Outcome(t.id, TaskAction.RELEASE) for t in got if t.request_id != request_id]
        if others:
            store.finish(worker, others, time.time())
    return mine


def finish(store: Store, tasks: list[Task], action: TaskAction, worker: str = "w1") -> None:
    error = None if action == TaskAction.SUCCEED else "boom"
    store.finish(worker, [Outcome(t.id, action, error=error) for t in tasks], time.time())


def run_request(store: Store, request_id: int, action: TaskAction = TaskAction.SUCCEED) -> None:
    finish(store, claim_all(store, request_id), action)


ITEMS = {"items": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}


async def submit(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    """POST /api/v1/requests (an `echo` of ITEMS unless told otherwise): the new request."""
    body.setdefault("pipeline", "echo")
    body.setdefault("params", ITEMS)
    r = await c.post("/api/v1/requests", json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is a problem document with this status; its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:conveyor:problem:")
    assert body["title"] and body["detail"]
    return body


# ---------------------------------------------------------------------- fixtures
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_api(make_app: Any) -> Iterator[Callable[..., ApiEnv]]:
    """make_api(toml=API_TOML, **create_app options) -> an API with a token per role, on
    this test's database (SQLite or PostgreSQL: see `db_url`)."""
    made: list[ApiEnv] = []

    def make(toml: str = API_TOML, **kwargs: Any) -> ApiEnv:
        env = make_env(make_app(toml), **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.asgi.state.hub.close()


@pytest.fixture
def api(make_api: Callable[..., ApiEnv]) -> ApiEnv:
    return make_api()
