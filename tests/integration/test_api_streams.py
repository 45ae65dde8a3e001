"""Streams over a real HTTP server on a loopback port: the server-sent event stream
(selectors, resuming, heartbeats, clients going away) and task logs (tail, attempts,
following a running attempt to its end).

Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from api_support import ApiEnv, claim_all, finish, live_server, problem, run_request
from conveyor.tasks import Outcome, Task, TaskAction

ITEMS = {"items": [{"name": "a"}, {"name": "b"}]}


def sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events as dicts of their fields; comments as {"comment": text}."""
    fields: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    if fields:
        yield fields


def events_until(
    r: httpx.Response, done: Callable[[dict[str, Any]], bool], limit: float = 10
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    start = time.monotonic()
    for item in sse(r.iter_lines()):
        assert time.monotonic() - start < limit, f"no end after {limit}s: {got}"
        if "comment" in item:
            continue
        assert set(item) == {"id", "event", "data"}, item
        data = json.loads(item["data"])
        assert data["id"] == int(item["id"]) and data["kind"] == item["event"]
        got.append(data)
        if done(data):
            break
    return got


def later(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def follow_while(c: httpx.Client, task_id: int, delay: float, fn: Callable[[], Any]) -> str:
    """A task's log followed to its end, `fn` run `delay` s after the stream has
    answered (the request's first look done): the text streamed."""
    url = f"/api/v1/tasks/{task_id}/log"
    with c.stream("GET", url, params={"follow": "true", "timeout": 10}) as r:
        assert r.status_code == 200
        worker = later(delay, fn)
        text = r.read().decode()
    worker.join()
    return text


@pytest.fixture
def served(make_api: Any) -> Iterator[tuple[ApiEnv, httpx.Client]]:
    api: ApiEnv = make_api(heartbeat=0.3)
    with (
        live_server(api.asgi) as url,
        httpx.Client(base_url=url, headers=api.auth("read"), timeout=10) as client,
    ):
        yield api, client


# ------------------------------------------------------------------------ events
def test_the_stream_follows_a_request_as_it_happens(served: tuple[ApiEnv, httpx.Client]) -> None:
    api, c = served
    noise = api.app.submit("plain", {}).request.id
    rid = api.app.submit("echo", ITEMS).request.id
    selector = f"request.{rid}"
    with c.stream("GET", "/api/v1/events/stream", params={"selector": selector}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        worker = later(0.3, lambda: (run_request(api.store, noise), run_request(api.store, rid)))
        got = events_until(r, lambda e: e["kind"] == "request.succeeded")
        worker.join()
    assert {e["request_id"] for e in got} == {rid}
    assert [e["id"] for e in got] == sorted(e["id"] for e in got)
    kinds = [e["kind"] for e in got]
    assert "request.submitted" not in kinds  # it happened before the stream began
    assert kinds.count("task.running") == 2 and kinds.count("task.succeeded") == 2
    assert kinds[-1] == "request.succeeded"


def test_resuming_after_an_event_id(served: tuple[ApiEnv, httpx.Client]) -> None:
    api, c = served
    rid = api.app.submit("echo", ITEMS).request.id
    run_request(api.store, rid)
    everything = [e.id for e in api.app.events(request_id=rid)]
    selector = {"selector": f"request.{rid}", "timeout": 0.2}
    with c.stream(
        "GET",
        "/api/v1/events/stream",
        params=selector,
        headers={"Last-Event-ID": str(everything[1])},
    ) as r:
        resumed = [int(e["id"]) for e in sse(r.iter_lines()) if "id" in e]
    assert resumed == everything[2:]
    with c.stream("GET", "/api/v1/events/stream", params={**selector, "after": 0}) as r:
        assert [int(e["id"]) for e in sse(r.iter_lines()) if "id" in e] == everything


def test_selectors_pick_events(served: tuple[ApiEnv, httpx.Client]) -> None:
    api, c = served
    a = api.app.submit("echo", ITEMS).request.id
    b = api.app.submit("plain", {"x": 1}).request.id
    run_request(api.store, a)
    run_request(api.store, b)
    api.app.pause("urgent")

    def kinds(selector: str) -> list[tuple[str, int | None]]:
        params = {"selector": selector, "after": 0, "timeout": 0.2}
        with c.stream("GET", "/api/v1/events/stream", params=params) as r:
            found = [json.loads(e["data"]) for e in sse(r.iter_lines()) if "data" in e]
        return [(e["kind"], e["request_id"]) for e in found]

    assert {rid for _, rid in kinds("pipeline.plain.*")} == {b}
    assert kinds("pipeline.echo.task.succeeded") == [("task.succeeded", a)] * 2
    assert kinds("request.*.request.succeeded") == [
        ("request.succeeded", a),
        ("request.succeeded", b),
    ]
    assert kinds("queue.paused") == [("queue.paused", None)]
    assert {rid for _, rid in kinds(f"request.{a}, request.{b}")} == {a, b}
    r = c.get("/api/v1/events/stream", params={"selector": "request..x"})
    assert problem(r, 422)["errors"][0]["path"] == "query.selector"
    r = c.get("/api/v1/events/stream", headers={"Last-Event-ID": "abc"})
    assert problem(r, 422)["errors"][0]["path"] == "header.Last-Event-ID"


def test_an_idle_stream_sends_heartbeats_and_ends_when_the_client_goes(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    api, c = served
    hub = api.asgi.state.hub
    with c.stream("GET", "/api/v1/events/stream", params={"selector": "nothing.ever"}) as r:
        lines = r.iter_lines()
        comments = []
        start = time.monotonic()
        for item in sse(lines):
            comments.append(item.get("comment"))
            if comments.count("keepalive") == 2:
                break
        assert comments[0] == "connected"
        assert time.monotonic() - start < 3
        assert hub.subscribers == 1
    # the client hung up: the server's side of the stream ends and lets go
    deadline = time.monotonic() + 5
    while hub.subscribers:
        assert time.monotonic() < deadline, "the stream outlived its client"
        time.sleep(0.05)


# -------------------------------------------------------------------------- logs
def _running_task(api: ApiEnv) -> Task:
    rid = api.app.submit("plain", {}).request.id
    (task,) = claim_all(api.store, rid)
    return task


def _log(api: ApiEnv, task: Task, attempt: int = 1) -> Any:
    path = api.app.artifacts.log_path(task.request_id, task.id, attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_logs_whole_tail_and_by_attempt(served: tuple[ApiEnv, httpx.Client]) -> None:
    api, c = served
    task = _running_task(api)
    url = f"/api/v1/tasks/{task.id}/log"
    assert "no log yet" in problem(c.get(url), 404)["detail"]
    _log(api, task, 1).write_text("first\n")
    _log(api, task, 2).write_text("one\ntwo\nthree\n")
    r = c.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.text == "one\ntwo\nthree\n"  # the latest attempt
    assert c.get(url, params={"tail": 2}).text == "two\nthree\n"
    assert c.get(url, params={"tail": 0}).text == ""
    assert c.get(url, params={"tail": 50}).text == "one\ntwo\nthree\n"
    assert c.get(url, params={"attempt": 1}).text == "first\n"
    assert "attempt 3" in problem(c.get(url, params={"attempt": 3}), 404)["detail"]
    assert problem(c.get(url, params={"tail": -1}), 422)["errors"][0]["path"] == "query.tail"
    problem(c.get("/api/v1/tasks/987654/log"), 404)


def test_a_quiet_attempts_log_kept_in_the_database_is_served_like_a_file(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    api, c = served
    task = _running_task(api)
    url = f"/api/v1/tasks/{task.id}/log"
    quiet = "$ true\nexit code 0\n"

    def finish_quietly() -> None:
        api.store.finish(
            "w1", [Outcome(task.id, TaskAction.RETRY, attempt=1, log=quiet)], time.time()
        )

    # followed while it runs: its log comes with its end
    worker = later(0.3, finish_quietly)
    r = c.get(url, params={"follow": "true", "timeout": 10})
    worker.join()
    assert r.text == quiet
    assert c.get(url).text == quiet
    assert c.get(url, params={"tail": 1}).text == "exit code 0\n"
    assert c.get(url, params={"tail": 0}).text == ""
    # a later attempt's file and the quiet attempt's row side by side
    (again,) = claim_all(api.store, task.request_id)
    assert again.attempts == 2
    _log(api, again, 2).write_text("noisy\n")
    assert c.get(url).text == "noisy\n"
    assert c.get(url, params={"attempt": 1}).text == quiet
    assert list(api.app.task_logs(task.id)[1]) == [1, 2]
    assert not api.app.artifacts.log_path(task.request_id, task.id, 1).exists()


def test_following_a_task_follows_its_running_attempt_not_an_earlier_log(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    """The running attempt of a quiet command has no log until it ends: following the
    task waits for it rather than ending at the attempt before."""
    api, c = served
    task = _running_task(api)
    first = Outcome(task.id, TaskAction.RETRY, attempt=1, log="$ false\nexit code 1\n")
    api.store.finish("w1", [first], time.time())
    (again,) = claim_all(api.store, task.request_id)
    assert again.attempts == 2
    second = "$ true\nexit code 0\n"

    def finish_quietly() -> None:
        done = Outcome(task.id, TaskAction.SUCCEED, attempt=2, log=second)
        api.store.finish("w1", [done], time.time())

    worker = later(0.5, finish_quietly)
    url = f"/api/v1/tasks/{task.id}/log"
    r = c.get(url, params={"follow": "true", "timeout": 10})
    worker.join()
    assert r.text == second
    assert c.get(url).text == second


def test_following_an_attempt_with_no_log_yet_does_not_ask_the_database_for_it_each_look(
    served: tuple[ApiEnv, httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While it waits, the stream looks at the attempt's file (every 0.2 s) and the
    task's status (every 0.5 s); the logs the database keeps are read by the request's
    first look and once the attempt is over: not on every look."""
    api, c = served
    task = _running_task(api)
    reads: list[int] = []
    real = api.app.store.attempt_logs

    def counted(task_id: int) -> dict[int, str]:
        reads.append(task_id)
        return real(task_id)

    monkeypatch.setattr(api.app.store, "attempt_logs", counted)
    quiet = "$ true\nexit code 0\n"

    def finish_quietly() -> None:
        api.store.finish(
            "w1", [Outcome(task.id, TaskAction.SUCCEED, attempt=1, log=quiet)], time.time()
        )

    assert follow_while(c, task.id, 1.5, finish_quietly) == quiet
    assert len(reads) == 2  # the first look, and the one after the attempt's end

    # an attempt that prints while followed: its file is found without the database
    reads.clear()
    running = _running_task(api)

    def print_then_finish() -> None:
        _log(api, running).write_text("printed\n")
        time.sleep(0.6)
        finish(api.store, [running], TaskAction.SUCCEED)

    assert follow_while(c, running.id, 0.4, print_then_finish) == "printed\n"
    assert len(reads) == 1  # the first look only


def test_following_a_queued_task_shows_its_next_attempt_even_if_it_ends_between_looks(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    """The attempt followed is fixed when the stream starts (the task's next one): a
    quiet attempt that starts and ends between two looks, the task queued again for a
    retry, is still the one shown, not skipped for the attempt after it."""
    api, c = served
    rid = api.app.submit("plain", {}).request.id
    (queued,) = api.app.get(rid).tasks
    quiet = "$ false\nexit code 1\n"

    def run_quietly_and_retry() -> None:
        (task,) = claim_all(api.store, rid)
        retry = Outcome(task.id, TaskAction.RETRY, attempt=1, log=quiet, delay=60)
        api.store.finish("w1", [retry], time.time())

    assert follow_while(c, queued.id, 0.1, run_quietly_and_retry) == quiet
    (again,) = api.app.get(rid).tasks
    assert again.status.value == "queued" and again.attempts == 1  # waiting to retry


def test_following_a_log_streams_until_the_attempt_ends(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    api, c = served
    task = _running_task(api)
    path = _log(api, task)
    path.write_text("starting\n")

    def write_then_finish() -> None:
        for i in range(3):
            with path.open("a") as f:
                f.write(f"step {i}\n")
            time.sleep(0.15)
        finish(api.store, [task], TaskAction.SUCCEED)

    start = time.monotonic()
    with c.stream("GET", f"/api/v1/tasks/{task.id}/log", params={"follow": "true"}) as r:
        assert r.status_code == 200
        writer = later(0.2, write_then_finish)
        chunks = r.iter_bytes()
        first = next(chunks)
        assert first == b"starting\n"  # sent before the attempt ended
        rest = b"".join(chunks)
    writer.join()
    assert first + rest == b"starting\nstep 0\nstep 1\nstep 2\n"
    assert time.monotonic() - start < 5


def test_following_waits_for_a_queued_task_and_timeout_ends_it(
    served: tuple[ApiEnv, httpx.Client],
) -> None:
    api, c = served
    rid = api.app.submit("plain", {}).request.id
    (queued,) = api.app.get(rid).tasks
    url = f"/api/v1/tasks/{queued.id}/log"
    r = c.get(url, params={"follow": "true", "timeout": 0.3})
    assert r.status_code == 200 and r.text == ""

    def start_and_finish() -> None:
        (task,) = claim_all(api.store, rid)
        _log(api, task).write_text("ran\n")
        time.sleep(0.3)
        finish(api.store, [task], TaskAction.FAIL)

    worker = later(0.2, start_and_finish)
    r = c.get(url, params={"follow": "true", "timeout": 10})
    worker.join()
    assert r.text == "ran\n"
    # finished: following a finished task is just reading it
    assert c.get(url, params={"follow": "true"}).text == "ran\n"
    assert c.get(url, params={"follow": "true", "tail": 1}).text == "ran\n"
