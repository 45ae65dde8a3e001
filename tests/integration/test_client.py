"""The Python client against a real server (uvicorn on a loopback port): submit, status,
wait (over the event stream, and by polling when the stream fails), cancel, listing page
by page, logs and following them, and the typed error of each failure.

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import httpx
import pytest

from api_support import API_TOML, ITEMS, ApiEnv, claim_all, live_server, run_request
from conveyor.client import (
    AuthError,
    Client,
    ClientError,
    Conflict,
    NotFound,
    Request,
    ServerUnavailable,
    ValidationError,
    WaitTimeout,
)
from conveyor.requests import RequestStatus
from conveyor.tasks import TaskAction, TaskStatus
from conveyor.worker import Worker, WorkerOptions

CLIENT_TOML = (
    API_TOML
    + """
[pipelines.chatty]
executor = "python"
handler = "client_handlers:chatty"
"""
)


class Served:
    """A live server over a test database, and clients for it."""

    def __init__(self, api: ApiEnv, url: str) -> None:
        self.api = api
        self.url = url
        self._clients: list[Client] = []

    def client(self, role: str | None = "admin", **kwargs: Any) -> Client:
        c = Client(self.url, self.api.tokens[role] if role else None, **kwargs)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()


@pytest.fixture
def served(make_api: Callable[..., ApiEnv]) -> Iterator[Served]:
    api = make_api(CLIENT_TOML, heartbeat=0.3)
    with live_server(api.asgi) as url:
        s = Served(api, url)
        yield s
        s.close()


def later(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Counting(httpx.HTTPTransport):
    """The real network, counting the requests sent per path (and refusing `refuse`)."""

    def __init__(self, refuse: str | None = None) -> None:
        super().__init__()
        self.refuse = refuse
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.refuse is not None and request.url.path == self.refuse:
            raise httpx.ConnectError("refused for the test", request=request)
        return super().handle_request(request)


@pytest.fixture
def worker(served: Served) -> Iterator[Callable[[], None]]:
    """start() runs a real worker in a thread until the test ends."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start() -> None:
        w = Worker(served.api.app, WorkerOptions(concurrency=2, poll_interval=0.1, grace=5))
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        started.append((w, t))

    yield start
    for w, t in started:
        w.stop(hard=True)
        t.join(10)


# ------------------------------------------------------------------ submit, wait
def test_submit_status_and_wait_over_the_event_stream(served: Served) -> None:
    c = served.client("submit")
    req = c.submit("echo", ITEMS, priority=3, idempotency_key="k-1")
    assert isinstance(req, Request) and req.status == RequestStatus.REQUESTED
    assert (req.pipeline, req.priority, req.submitter) == ("echo", 3, "submit-user")
    assert [t.params["name"] for t in req.tasks] == ["a", "b", "c"]
    assert all(t.status == TaskStatus.QUEUED for t in req.tasks)
    with pytest.raises(FrozenInstanceError):
        req.status = RequestStatus.FAILED  # type: ignore[misc]
    assert c.submit("echo", ITEMS, idempotency_key="k-1").id == req.id  # the same request
    assert c.status(req.id) == req

    hub = served.api.asgi.state.hub
    watchers: list[int] = []

    def finish_while_watched() -> None:
        # Once the client follows the request's stream (a client that polled never
        # would): on a loaded machine that can take longer than the first half second.
        deadline = time.monotonic() + 5
        while hub.subscribers < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        watchers.append(hub.subscribers)
        run_request(served.api.store, req.id)

    seen: list[RequestStatus] = []
    start = time.monotonic()
    later(0.5, finish_while_watched)
    done = c.wait(req.id, timeout=20, on_update=lambda r: seen.append(r.status))
    assert time.monotonic() - start < 8
    assert watchers == [1]  # it followed the stream rather than polling
    assert done.status == RequestStatus.SUCCEEDED and done.succeeded and done.finished
    assert done.counts.succeeded == 3 and len(done.tasks) == 3
    assert seen[0] == RequestStatus.REQUESTED and seen[-1] == RequestStatus.SUCCEEDED
    # a finished request: answered at once
    assert c.wait(req.id, timeout=1).status == RequestStatus.SUCCEEDED


def test_wait_with_a_real_worker_and_a_failing_request(served: Served, worker: Any) -> None:
    c = served.client("submit")
    ok = c.submit("chatty", {"lines": 2, "pause": 0.05})
    worker()
    assert c.wait(ok.id, timeout=20).status == RequestStatus.SUCCEEDED
    assert c.status(ok.id).tasks[0].result == {"lines": 2}
    bad = c.submit("chatty", {"lines": "many"})  # the handler fails on it
    failed = c.wait(bad.id, timeout=20)
    assert failed.status == RequestStatus.FAILED and not failed.succeeded
    assert failed.tasks[0].error and "many" in failed.tasks[0].error


def test_wait_times_out_with_the_request_as_last_seen(served: Served) -> None:
    c = served.client("read")
    rid = served.api.app.submit("echo", ITEMS).request.id
    claim_all(served.api.store, rid)  # running, and never finished
    start = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        c.wait(rid, timeout=0.6)
    took = time.monotonic() - start
    assert 0.6 <= took < 3, took
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.request.id == rid
    assert caught.value.request.status == RequestStatus.RUNNING
    assert f"request {rid} still running after 0.6s" == str(caught.value)


def test_wait_polls_when_the_stream_is_refused(served: Served) -> None:
    net = Counting(refuse="/api/v1/events/stream")
    c = served.client("read", transport=net)
    rid = served.api.app.submit("echo", ITEMS).request.id

    def finish_once_polled() -> None:
        # ended after the client has looked a few times, however slow the machine
        deadline = time.monotonic() + 15
        while net.paths.count(f"/api/v1/requests/{rid}") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        run_request(served.api.store, rid, TaskAction.FAIL)

    later(0, finish_once_polled)
    done = c.wait(rid, timeout=20, poll=0.3)
    assert done.status == RequestStatus.FAILED
    assert "/api/v1/events/stream" in net.paths  # it tried
    polls = net.paths.count(f"/api/v1/requests/{rid}")
    assert polls >= 3, net.paths  # then looked again and again


def test_wait_polls_when_the_server_ends_its_streams(served: Served) -> None:
    c = served.client("read")
    rid = served.api.app.submit("echo", ITEMS).request.id
    hub = served.api.asgi.state.hub

    def stop_streams_then_finish() -> None:
        hub.close()  # what a stopping server does to every stream
        time.sleep(0.5)
        run_request(served.api.store, rid)

    later(0.5, stop_streams_then_finish)
    assert c.wait(rid, timeout=20, poll=0.3).status == RequestStatus.SUCCEEDED


# ----------------------------------------------------------------- cancel, list
def test_cancel(served: Served) -> None:
    mine = served.client("submit")
    req = mine.submit("echo", ITEMS)
    other_id = served.api.app.submit("echo", ITEMS).request.id  # not the token's own
    cancelled = mine.cancel(req.id)
    assert cancelled.status == RequestStatus.CANCELLED
    assert {t.status for t in cancelled.tasks} == {TaskStatus.CANCELLED}
    assert mine.status(req.id).status == RequestStatus.CANCELLED
    with pytest.raises(AuthError) as caught:
        mine.cancel(other_id)
    assert caught.value.status == 403
    assert served.client("admin").cancel(other_id).status == RequestStatus.CANCELLED


def test_list_follows_the_cursor_page_by_page(served: Served) -> None:
    app = served.api.app
    ids = [app.submit("plain", {"name": f"item-{i}"}).request.id for i in range(7)]
    ids.append(app.submit("echo", ITEMS).request.id)
    app.cancel(ids[0])
    net = Counting()
    c = served.client("read", transport=net)

    got = list(c.list(page_size=3))
    assert [r.id for r in got] == sorted(ids, reverse=True)  # newest first, all of them
    assert net.paths.count("/api/v1/requests") == 3  # 3 + 3 + 2
    assert all(r.tasks == () and r.counts.total == 1 for r in got if r.pipeline == "plain")

    assert [r.id for r in c.list(pipeline="plain", page_size=2)] == sorted(ids[:7])[::-1]
    assert [r.id for r in c.list(status="cancelled")] == [ids[0]]
    assert [r.id for r in c.list(status=RequestStatus.REQUESTED, queue="test", limit=4)] == (
        sorted(ids[1:7])[::-1][:4]
    )
    assert [r.id for r in c.list(q="ITEM-5")] == [ids[5]]
    assert list(c.list(submitter="nobody")) == []
    assert len(list(c.list(created_after=time.time() - 60, created_before="2999-01-01"))) == 8
    # lazily: nothing is fetched before the first item is asked for
    before = len(net.paths)
    pages = c.list(page_size=1)
    assert len(net.paths) == before
    assert next(pages).id == ids[-1]


# ------------------------------------------------------------------------- logs
def test_logs_whole_tail_attempt_and_following(served: Served, worker: Any) -> None:
    c = served.client("read")
    rid = served.api.app.submit("chatty", {"lines": 6, "pause": 0.15}).request.id
    (task,) = served.api.app.get(rid).tasks
    worker()
    chunks: list[tuple[float, str]] = []
    with c.logs(task.id, follow=True, timeout=20) as stream:  # waits for it to start
        for text in stream:
            chunks.append((time.monotonic(), text))
    done = served.api.app.get(rid)
    assert done.status == RequestStatus.SUCCEEDED
    text = "".join(t for _, t in chunks)
    assert text == "".join(f"line {i}\n" for i in range(6))
    assert len(chunks) > 1  # it came as it was written
    assert chunks[-1][0] - chunks[0][0] > 0.3

    assert c.logs(task.id).read() == text
    assert c.logs(task.id, attempt=1, tail=2).read() == "line 4\nline 5\n"
    assert c.logs(task.id, tail=0).read() == ""
    with pytest.raises(NotFound) as caught:
        c.logs(task.id, attempt=2)  # raised at once, not when read
    assert "attempt 2" in caught.value.detail
    with pytest.raises(NotFound):
        c.logs(987654)
    # closing early lets go of the connection
    with c.logs(task.id) as stream:
        assert next(stream).startswith("line 0")
    assert c.task(task.id).status == TaskStatus.SUCCEEDED


# ----------------------------------------------------------------------- errors
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_every_failure_is_a_typed_error(served: Served, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = served.api.tokens
    admin = served.client("admin")

    with pytest.raises(AuthError) as caught:
        served.client(None).status(1)
    assert caught.value.status == 401 and "needs a token" in caught.value.detail
    with pytest.raises(AuthError) as caught:
        Client(served.url, "cvy_" + "A" * 43).list().__next__()
    assert caught.value.status == 401 and caught.value.title == "Unauthorized"
    with pytest.raises(AuthError) as caught:
        served.client("read").submit("echo", ITEMS)
    assert caught.value.status == 403
    assert "has role read; this needs submit" in caught.value.detail

    with pytest.raises(NotFound) as caught:
        admin.status(424242)
    assert caught.value.status == 404 and caught.value.detail == "no request 424242"
    with pytest.raises(NotFound):
        admin.cancel(424242)

    admin.submit("echo", ITEMS, idempotency_key="once")
    with pytest.raises(Conflict) as caught:
        admin.submit("echo", {"items": [{"name": "other"}]}, idempotency_key="once")
    assert caught.value.status == 409 and "idempotency key 'once'" in caught.value.detail

    with pytest.raises(ValidationError) as caught:
        admin.submit("nope", {})
    assert caught.value.status == 422 and "unknown pipeline 'nope'" in caught.value.detail
    assert caught.value.errors[0].path == "$.pipeline"
    with pytest.raises(ValidationError) as caught:
        admin.submit("echo", {"items": [{"nom": "a"}]})
    assert caught.value.errors[0].path == "$.params.items[0].name"
    assert caught.value.type == "urn:conveyor:problem:invalid-params"
    with pytest.raises(ValidationError) as caught:
        list(admin.list(q="\x01"))
    assert caught.value.errors[0].path == "query.q"

    with pytest.raises(ServerUnavailable) as caught:
        Client(f"http://127.0.0.1:{free_port()}", tokens["admin"], timeout=2).status(1)
    assert caught.value.status is None and "cannot reach" in caught.value.detail

    for cls in (AuthError, NotFound, Conflict, ValidationError, ServerUnavailable):
        assert issubclass(cls, ClientError)
    # the token is in no repr, message or log line
    assert repr(admin) == f"Client({served.url!r})"
    seen = repr(admin) + str(caught.value) + caplog.text
    for token in tokens.values():
        assert token not in seen
    assert "/api/v1/requests/424242" in caplog.text  # the calls were logged
