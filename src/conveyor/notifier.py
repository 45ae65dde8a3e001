"""The notifier: follows the events table into the notifications outbox and POSTs each
notification to its pipeline's webhook, retrying with back-off from the database.

It runs as a thread beside a worker (`conveyor worker`, `conveyor up`) or on its own
(`conveyor notify`). Several may run against one database: the outbox cursor is taken
under a lock and each delivery is claimed with a lease. Sends happen on a small thread
pool, each with an explicit timeout, so a receiver that fails or hangs delays only its
own notifications and never a worker; a notifier that dies leaves every notification in
the database, due again when its lease ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from conveyor.app import Conveyor
from conveyor.artifacts import latest_outputs
from conveyor.config import ConfigError
from conveyor.events import Event
from conveyor.notifications import (
    SIGNATURE_HEADER,
    NewNotification,
    Notification,
    NotifySettings,
    body_bytes,
    payload,
    plan,
    sign,
)
from conveyor.store import Unavailable
from conveyor.tasks import backoff_delay

log = logging.getLogger(__name__)
CURSOR = "notifications"


def notify_settings(app: Conveyor) -> dict[str, NotifySettings]:
    return {name: p.notify for name, p in app.config.pipelines.items() if p.notify is not None}


def secrets_of(settings: Mapping[str, NotifySettings], env: Mapping[str, str]) -> dict[str, str]:
    """Each pipeline's signing secret; raises ConfigError naming a variable that is
    missing, so a notifier never sends unsigned what should be signed."""
    found = {}
    for name, cfg in settings.items():
        if cfg.secret_env is None:
            continue
        value = env.get(cfg.secret_env)
        if not value:
            raise ConfigError(
                f"pipelines.{name}.notify.secret_env: environment variable "
                f"{cfg.secret_env} is not set"
            )
        found[name] = value
    return found


class Notifier:
    def __init__(
        self,
        app: Conveyor,
        *,
        poll: float = 0.5,
        senders: int = 4,
        settle: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.settings = notify_settings(app)
        self.secrets = secrets_of(self.settings, os.environ if env is None else env)
        self.poll = poll
        self.senders = senders
        self.settle = settle
        longest = max((c.timeout for c in self.settings.values()), default=10.0)
        self.lease = longest + 30.0  # a send's time limit, and some
        # No connection is kept for the next delivery (the answer's body is never read, so
        # none could be): each delivery connects anew, which `_post`'s deadline needs.
        self._http = httpx.Client(
            follow_redirects=False,
            headers={"User-Agent": "conveyor"},
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="conveyor-notify-send")
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cursor = -1  # the event id the outbox is filled up to (-1: not known yet)

    @property
    def enabled(self) -> bool:
        return bool(self.settings)

    # the loop -------------------------------------------------------------------
    def _plan(self, events: Sequence[Event]) -> list[NewNotification]:
        return plan(events, self.settings, self.app.clock())

    def fill(self) -> int:
        """Turn new completion events into notifications; returns how many."""
        store = self.app.store
        if self._cursor >= 0 and store.latest_event_id() <= self._cursor:
            return 0  # nothing new: no write
        written, self._cursor = store.enqueue_notifications(
            CURSOR, self._plan, self.app.clock(), settle=self.settle
        )
        return written

    def send_due(self) -> int:
        """Hand due notifications to the senders, as many as are free; returns how many."""
        with self._lock:
            self._inflight = {f for f in self._inflight if not f.done()}
            free = self.senders - len(self._inflight)
        if free <= 0:
            return 0
        now = self.app.clock()
        due = self.app.store.next_notification_at()
        if due is None or due > now:
            return 0
        claimed = self.app.store.claim_notifications(free, self.lease, now)
        for n in claimed:
            fut = self._pool.submit(self.deliver, n)
            with self._lock:
                self._inflight.add(fut)
        return len(claimed)

    def run_once(self) -> int:
        self.fill()
        return self.send_due()

    def wait_idle(self, timeout: float) -> None:
        """Wait for the sends under way (for tests and a clean stop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(f.done() for f in self._inflight):
                    return
            time.sleep(0.02)

    def run(self) -> None:
        """Until stop(): fill the outbox and send what is due."""
        while not self._stop.is_set():
            try:
                busy = self.run_once() > 0
            except Unavailable as exc:
                log.warning("notifier: database unavailable: %s", exc)
                busy = False
            except Exception:  # the notifier must outlive any one failure
                log.exception("notifier failed; going on")
                busy = False
            if not busy:
                self._stop.wait(self.poll)

    def start(self) -> threading.Thread:
        """Run in a thread of its own; what finishes from now on is announced (the
        first look, which places a new cursor, is made before this returns)."""
        try:
            self.fill()
        except Unavailable as exc:
            log.warning("notifier: database unavailable: %s", exc)
        self._thread = threading.Thread(target=self.run, name="conveyor-notify", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop, after one last look (so what finished just before is sent now); sends
        get `timeout` seconds, and what is left stays due for the next notifier."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            try:
                self.run_once()
            except Exception:
                log.warning("notifier: the last look failed; what is due stays due")
        self.wait_idle(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # one delivery ---------------------------------------------------------------
    def deliver(self, n: Notification) -> None:
        """POST one notification and record what came of it."""
        cfg = self.settings.get(n.pipeline) or NotifySettings(webhook=n.url)
        try:
            error = self._post(n, cfg)
        except Exception as exc:  # a bug must leave the notification due, not lost
            log.exception("notification %s", n.id)
            error = f"{type(exc).__name__}: {exc}"
        now = self.app.clock()
        retry_at = None
        if error is not None:
            attempts = n.attempts + 1
            if attempts < n.max_attempts:
                retry_at = now + backoff_delay(cfg.retry, attempts)
            log.warning(
                "notification %s to %s: %s (attempt %d of %d)",
                n.id,
                _host(n.url),
                error,
                attempts,
                n.max_attempts,
            )
        self._settle(lambda: self.app.store.settle_notification(n.id, now, error, retry_at))

    def _settle(self, write: Callable[[], None]) -> None:
        delay = 0.2
        for _ in range(8):
            try:
                write()
                return
            except Unavailable as exc:
                log.warning("notifier: cannot record a delivery (%s); retrying", exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        # Left as it was: due again when its lease ends, so it is sent again.

    def body(self, n: Notification) -> bytes:
        store = self.app.store
        times: Mapping[str, Any] = {}
        extra: dict[str, Any] = {}
        artifacts: list[Any] = []
        if n.subject == "task" and n.task_id is not None:
            task = store.get_task(n.task_id)
            if task is not None:
                times = task._asdict()
                extra = {"attempt": task.attempts, "error": task.error}
            artifacts = latest_outputs(store.list_artifacts(task_id=n.task_id))
        elif n.request_id is not None:
            req = store.get_request(n.request_id, with_tasks=False)
            if req is not None:
                times = {
                    "created_at": req.created_at,
                    "started_at": req.started_at,
                    "finished_at": req.finished_at,
                }
                c = req.counts
                extra = {
                    "counts": {
                        "total": c.total,
                        "succeeded": c.succeeded,
                        "failed": c.failed,
                        "cancelled": c.cancelled,
                    }
                }
            by_task: dict[int, list[Any]] = {}
            for a in store.list_artifacts(request_id=n.request_id):
                by_task.setdefault(a.task_id, []).append(a)
            artifacts = [a for found in by_task.values() for a in latest_outputs(found)]
        return body_bytes(payload(n, self.app.clock(), times, artifacts, extra))

    def _post(self, n: Notification, cfg: NotifySettings) -> str | None:
        body = self.body(n)
        headers = {
            "Content-Type": "application/json",
            "X-Conveyor-Event": f"{n.subject}.{n.status}",
            "X-Conveyor-Delivery": str(n.id),
        }
        secret = self.secrets.get(n.pipeline)
        if secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, secret)
        deadline = _Deadline(cfg.timeout)
        try:
            # Only the status line and headers are read: the answer's body, which a
            # receiver could trickle a byte at a time (each read within the time limit),
            # is not waited for; the connection is closed instead. The time limit holds
            # for each connect and read, and for the whole delivery (`_Deadline`).
            with self._http.stream(
                "POST",
                n.url,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(cfg.timeout),
                extensions={"trace": deadline.trace},
            ) as answer:
                status = answer.status_code
        except httpx.TimeoutException:
            return f"the receiver did not answer within {cfg.timeout:g}s"
        except httpx.HTTPError as exc:
            if deadline.passed and isinstance(exc, _CUT_SHORT):
                return f"the receiver did not answer within {cfg.timeout:g}s"
            return f"cannot reach the receiver: {type(exc).__name__}: {exc}"
        finally:
            deadline.cancel()
        if 200 <= status < 300:
            return None
        return f"the receiver answered HTTP {status}"


_CONNECTED = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")


# what reading or writing a connection shut down by the deadline raises
_CUT_SHORT = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class _Deadline:
    """A whole delivery's time limit. httpx's limits hold for each connect, write and
    read, so a receiver sending its status line and headers a byte at a time, each
    within the limit, could hold a sender for hours. The connection is taken as it is
    made (httpcore's `trace` extension), and when the time is up it is shut down,
    which ends the read waiting on it."""

    def __init__(self, seconds: float) -> None:
        self.passed = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        # "connection.connect_tcp", "proxy.start_tls" (TLS through a proxy's tunnel), ...:
        # the latest connection made is the one the answer is read from.
        if name.endswith(_CONNECTED):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sock = sock
                    if self.passed:
                        _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            if self._sock is not None:
                _shut(self._sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    """Shut a connection down under whoever is reading it (closing its descriptor
    would not wake the read). The plain socket's call, also for a TLS socket, whose
    own would first try to end TLS."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _host(url: str) -> str:
    """For logs: where a webhook goes, without its path or query (which may hold a
    token)."""
    try:
        return httpx.URL(url).host or url
    except httpx.InvalidURL:
        return "?"
