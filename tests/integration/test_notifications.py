"""Completion notifications against a real HTTP receiver on loopback: delivered with the
expected JSON and a valid signature; retried from the database while the receiver is
down, also across a restart; a hanging receiver never holds up the worker; given up
after the configured attempts, visibly."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from artifact_support import outputs_pipeline, run_worker
from httpcore._backends.sync import SyncStream

from conftest import cli_env, make_config, run_cli, write_config
from conveyor.app import Conveyor
from conveyor.config import ConfigError
from conveyor.notifications import NotificationStatus, verify
from conveyor.notifier import Notifier, _Deadline
from conveyor.worker import Worker, WorkerOptions

SECRET = "hook-secret-for-tests"


@dataclass
class Receiver:
    """A webhook receiver: records what it gets; `mode` is ok, fail (HTTP 503), hang,
    trickle (a 200 whose body never ends), or slow-headers (a status line, then headers
    that never end, a byte at a time)."""

    port: int = 0
    mode: str = "ok"
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/conveyor"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if owner.mode == "hang":
                    owner.release.wait(30)
                    return
                if owner.mode == "trickle":  # a 200, then a long body a byte at a time
                    owner.got.append((dict(self.headers.items()), body))
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    while not owner.release.wait(0.3):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    return
                if owner.mode == "slow-headers":
                    owner.got.append((dict(self.headers.items()), body))
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    self.wfile.flush()
                    while not owner.release.wait(0.3):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    return
                if owner.mode == "fail":
                    self.send_response(503)
                    self.end_headers()
                    return
                owner.got.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def notify_toml(url: str, extra: str = "") -> str:
    return outputs_pipeline(
        extra=f"""
[pipelines.ranks.notify]
webhook = "{url}"
secret_env = "CONVEYOR_TEST_HOOK_SECRET"
timeout = 1
retries = 4
backoff = 0.2
backoff_max = 0.5
{extra}
"""
    )


@pytest.fixture
def make_notifying(
    tmp_path: Path, db_url: str
) -> Iterator[Callable[[str], tuple[Conveyor, Notifier]]]:
    """make(toml) -> an application and its notifier (not started), closed at the end."""
    made: list[tuple[Conveyor, Notifier]] = []

    def make(toml: str) -> tuple[Conveyor, Notifier]:
        app = Conveyor(make_config(tmp_path, db_url, toml))
        app.store.upgrade()
        notifier = Notifier(app, poll=0.05, settle=1.0, env={"CONVEYOR_TEST_HOOK_SECRET": SECRET})
        made.append((app, notifier))
        return app, notifier

    yield make
    for app, notifier in made:
        notifier.stop(timeout=2)
        app.close()


def pump(notifier: Notifier, until: Callable[[], bool], timeout: float = 15.0) -> None:
    """Run the notifier's loop by hand until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out waiting"
        notifier.run_once()
        time.sleep(0.05)


def test_completions_are_posted_with_their_outputs_and_a_valid_signature(
    make_notifying: Any, receiver: Receiver
) -> None:
    app, notifier = make_notifying(notify_toml(receiver.url))
    notifier.fill()  # the notifier starts following here
    rid = app.submit("ranks", {"items": [{"name": "alpha", "code": 0}]}).request.id
    run_worker(app)
    pump(notifier, lambda: len(receiver.got) == 2)
    notifier.wait_idle(5)
    (task,) = app.get(rid).tasks
    by_subject = {json.loads(b)["subject"]: (h, b) for h, b in receiver.got}
    headers, raw = by_subject["task"]
    assert verify(raw, SECRET, headers["X-Conveyor-Signature"])
    assert headers["X-Conveyor-Event"] == "task.succeeded"
    assert headers["Content-Type"] == "application/json"
    body = json.loads(raw)
    assert body["event"] == "task.succeeded" and body["status"] == "succeeded"
    assert (body["pipeline"], body["request_id"], body["task_id"]) == ("ranks", rid, task.id)
    assert body["finished_at"] == task.finished_at and body["started_at"] == task.started_at
    assert body["attempt"] == 1 and body["error"] is None
    kept = {a.name: a for a in app.task_artifacts(task.id)}
    assert [(o["name"], o["key"], o["url"], o["sha256"]) for o in body["outputs"]] == [
        (n, kept[n].key, kept[n].url, kept[n].sha256) for n in ("alpha.csv", "out/deep/alpha.db")
    ]
    headers, raw = by_subject["request"]
    assert verify(raw, SECRET, headers["X-Conveyor-Signature"])
    body = json.loads(raw)
    assert body["event"] == "request.succeeded" and body["task_id"] is None
    assert body["counts"] == {"total": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert len(body["outputs"]) == 2 and {o["task_id"] for o in body["outputs"]} == {task.id}
    # and on the bus
    sent = [e for e in app.events(request_id=rid) if e.kind == "notification.sent"]
    assert sorted(e.data["subject"] for e in sent) == ["request", "task"]


def test_failed_and_cancelled_requests_are_announced_too(
    make_notifying: Any, receiver: Receiver
) -> None:
    app, notifier = make_notifying(notify_toml(receiver.url, 'on = ["request"]'))
    notifier.fill()
    failed = app.submit("ranks", {"items": [{"name": "a", "code": 2}]}).request.id
    run_worker(app)
    cancelled = app.submit("ranks", {"items": [{"name": "b", "code": 0}]}).request.id
    app.cancel(cancelled)
    pump(notifier, lambda: len(receiver.got) == 2)
    got = {b["request_id"]: b["status"] for b in receiver.bodies()}
    assert got == {failed: "failed", cancelled: "cancelled"}  # requests only: no tasks


def test_a_receiver_down_then_up_gets_it_later_even_across_a_restart(
    make_notifying: Any, receiver: Receiver
) -> None:
    port = receiver.port
    receiver.stop()  # down: connections refused
    app, notifier = make_notifying(notify_toml(f"http://127.0.0.1:{port}/hooks/conveyor"))
    notifier.fill()
    rid = app.submit("ranks", {"items": [{"name": "alpha", "code": 0}]}).request.id
    run_worker(app)

    def tried() -> bool:
        found = app.store.list_notifications(request_id=rid)
        return len(found) == 2 and all(n.attempts >= 1 for n in found)

    pump(notifier, tried)
    notifier.wait_idle(5)
    pending = app.store.list_notifications(request_id=rid)
    assert all(n.state == NotificationStatus.PENDING for n in pending)
    assert all("cannot reach the receiver" in (n.last_error or "") for n in pending)
    # the process goes away mid-retry; the receiver comes back; a new process delivers
    notifier.stop()
    app.close()
    receiver.port = port
    receiver.mode = "ok"
    receiver.start()
    app2, notifier2 = make_notifying(notify_toml(receiver.url))
    pump(notifier2, lambda: len(receiver.got) == 2)
    notifier2.wait_idle(5)
    done = app2.store.list_notifications(request_id=rid)
    assert all(n.state == NotificationStatus.SENT and n.attempts >= 2 for n in done)
    assert sorted(b["subject"] for b in receiver.bodies()) == ["request", "task"]


def test_a_hanging_receiver_never_holds_up_the_worker(
    make_notifying: Any, receiver: Receiver
) -> None:
    receiver.mode = "hang"
    app, notifier = make_notifying(notify_toml(receiver.url))
    notifier.fill()
    notifier.start()
    try:
        first = app.submit("ranks", {"items": [{"name": "a", "code": 0}]}).request.id
        run_worker(app)
        # the notifier is now stuck on the receiver; the worker keeps working meanwhile
        time.sleep(0.3)
        started = time.monotonic()
        more = app.submit(
            "ranks", {"items": [{"name": f"n{i}", "code": 0} for i in range(6)]}
        ).request.id
        w = Worker(app, WorkerOptions(concurrency=3, burst=True, poll_interval=0.05))
        assert w.run().succeeded == 6
        assert time.monotonic() - started < 10
        assert app.get(more).status.value == "succeeded"

        def timed_out() -> bool:
            found = app.store.list_notifications(request_id=first)
            return any("did not answer within 1s" in (n.last_error or "") for n in found)

        deadline = time.monotonic() + 10
        while not timed_out():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        receiver.release.set()
        notifier.stop(timeout=3)


def test_an_answer_whose_body_trickles_is_taken_at_its_status_line(
    make_notifying: Any, receiver: Receiver
) -> None:
    # Each byte comes within the 1 s time limit; the body would take days.
    receiver.mode = "trickle"
    app, notifier = make_notifying(notify_toml(receiver.url))
    notifier.fill()
    rid = app.submit("ranks", {"items": [{"name": "a", "code": 0}]}).request.id
    run_worker(app)
    started = time.monotonic()
    try:

        def sent() -> bool:
            found = app.store.list_notifications(request_id=rid)
            return bool(found) and all(n.state == "sent" for n in found)

        pump(notifier, sent, timeout=10)
    finally:
        receiver.release.set()
    assert time.monotonic() - started < 5
    assert len(receiver.got) == len(app.store.list_notifications(request_id=rid))  # once each


def test_headers_that_trickle_end_the_delivery_at_its_time_limit(
    make_notifying: Any, receiver: Receiver
) -> None:
    # Each byte of the headers comes within the 1 s limit on a read; the delivery as a
    # whole gets 1 s, then it is a failure to retry, and the sender is free again.
    receiver.mode = "slow-headers"
    app, notifier = make_notifying(notify_toml(receiver.url, 'on = ["task"]'))
    notifier.fill()
    rid = app.submit("ranks", {"items": [{"name": "a", "code": 0}]}).request.id
    run_worker(app)
    try:
        deadline = time.monotonic() + 10
        while notifier.send_due() == 0:  # due once settled
            assert time.monotonic() < deadline
            notifier.fill()
            time.sleep(0.02)
        started = time.monotonic()
        notifier.wait_idle(10)
        took = time.monotonic() - started
        (n,) = app.store.list_notifications(request_id=rid)
        assert n.state == NotificationStatus.PENDING and n.attempts == 1
        assert n.last_error == "the receiver did not answer within 1s"
        assert 0.9 < took < 3
        assert len(receiver.got) == 1
    finally:
        receiver.release.set()


def test_it_gives_up_after_its_attempts_visibly(make_notifying: Any, receiver: Receiver) -> None:
    receiver.mode = "fail"
    app, notifier = make_notifying(
        notify_toml(receiver.url, 'on = ["task"]').replace("retries = 4", "retries = 1")
    )
    notifier.fill()
    rid = app.submit("ranks", {"items": [{"name": "a", "code": 0}]}).request.id
    run_worker(app)

    def given_up() -> bool:
        found = app.store.list_notifications(request_id=rid)
        return bool(found) and found[0].state == NotificationStatus.FAILED

    pump(notifier, given_up)
    (n,) = app.store.list_notifications(request_id=rid)
    assert (n.attempts, n.last_error) == (2, "the receiver answered HTTP 503")
    (ev,) = [e for e in app.events(request_id=rid) if e.kind == "notification.failed"]
    assert ev.task_id == n.task_id and ev.data["error"] == "the receiver answered HTTP 503"


def test_a_missing_secret_stops_the_notifier_from_starting(tmp_path: Path, sqlite_url: str) -> None:
    app = Conveyor(make_config(tmp_path, sqlite_url, notify_toml("http://127.0.0.1:9/x")))
    with pytest.raises(ConfigError, match="CONVEYOR_TEST_HOOK_SECRET is not set"):
        Notifier(app, env={})
    app.close()


def test_a_burst_worker_sends_what_its_tasks_finished(
    tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> None:
    config = write_config(tmp_path, notify_toml(receiver.url))
    env = cli_env(sqlite_url, config, CONVEYOR_TEST_HOOK_SECRET=SECRET)
    r = run_cli(
        "submit", "ranks", "--set", 'items=[{"name": "a", "code": 0}]', env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    # the notifier starts following when it first runs: before this request finishes
    r = run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(b["event"] for b in receiver.bodies()) == ["request.succeeded", "task.succeeded"]
    assert all(verify(raw, SECRET, h["X-Conveyor-Signature"]) for h, raw in receiver.got)
    missing = run_cli("notify", env=cli_env(sqlite_url, config), cwd=tmp_path, timeout=60)
    assert missing.returncode == 1
    assert "CONVEYOR_TEST_HOOK_SECRET is not set" in missing.stderr


@pytest.mark.parametrize(
    "event",
    ["connection.connect_tcp.complete", "proxy.start_tls.complete"],
    ids=["direct", "tls-through-a-proxy"],
)
def test_the_deadline_shuts_the_latest_connection_made(event: str) -> None:
    # An https webhook behind a proxy reads its answer from the TLS connection made in
    # the proxy's tunnel, announced as "proxy.start_tls": the deadline shuts that one.
    ours, receivers = socket.socketpair()
    deadline = _Deadline(0.3)
    try:
        deadline.trace(event, {"return_value": SyncStream(ours)})
        started = time.monotonic()
        receivers.settimeout(5)
        assert receivers.recv(1) == b""  # shut down under any reader: end of file
        assert deadline.passed and 0.2 < time.monotonic() - started < 3
    finally:
        deadline.cancel()
        ours.close()
        receivers.close()
