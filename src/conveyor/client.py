"""The Python client of Conveyor's HTTP API.

    from conveyor.client import Client

    with Client("http://127.0.0.1:8000", token) as conveyor:
        req = conveyor.submit("spotbot", params)
        done = conveyor.wait(req.id, timeout=1800)   # raises WaitTimeout

Answers are immutable records (`Request`, `Task`); failures are typed errors built from
the API's problem documents (`AuthError`, `NotFound`, `Conflict`, `ValidationError`,
`ServerUnavailable`, all `ClientError`s). Every call has a time limit. The token is sent
as `Authorization: Bearer …` and appears in no repr, message or log line.
"""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import httpx

from conveyor import __version__
from conveyor.requests import RequestStatus, TaskCounts
from conveyor.tasks import Progress, TaskStatus

log = logging.getLogger(__name__)

API = "/api/v1"
DEFAULT_TIMEOUT = 10.0  # seconds for connecting, and for each read, of an ordinary call
# The server sends a comment every 15 s on an idle event stream: a longer silence means
# the connection is dead.
STREAM_READ_TIMEOUT = 45.0
MAX_STREAM_SECONDS = 86_400.0  # the most the server lets one stream run
POLL_FIRST = 0.25  # seconds before the first look when polling; it grows to `poll`


# ----------------------------------------------------------------------- records
@dataclass(frozen=True)
class Task:
    """One task of a request, as the API shows it."""

    id: int
    request_id: int
    seq: int
    pipeline: str
    queue: str
    status: TaskStatus
    attempts: int
    max_attempts: int
    progress: Progress
    params: Any
    result: Any
    error: str | None
    worker: str | None  # the worker holding its lease
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Task:
        p = d["progress"]
        return cls(
            id=d["id"],
            request_id=d["request_id"],
            seq=d["seq"],
            pipeline=d["pipeline"],
            queue=d["queue"],
            status=TaskStatus(d["status"]),
            attempts=d["attempts"],
            max_attempts=d["max_attempts"],
            progress=Progress(p["current"], p.get("total"), p.get("message")),
            params=d.get("params"),
            result=d.get("result"),
            error=d.get("error"),
            worker=d.get("worker"),
            created_at=d["created_at"],
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
        )


@dataclass(frozen=True)
class Request:
    """A request, as the API shows it. `tasks` is empty in listings (`Client.list`)."""

    id: int
    pipeline: str
    status: RequestStatus
    queue: str
    priority: int
    params: Any
    submitter: str | None
    idempotency_key: str | None
    reused_request_id: int | None  # the request whose cached result this one reused
    created_at: float
    started_at: float | None
    finished_at: float | None
    counts: TaskCounts
    tasks: tuple[Task, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status.terminal

    @property
    def succeeded(self) -> bool:
        return self.status == RequestStatus.SUCCEEDED

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Request:
        c = d["counts"]
        return cls(
            id=d["id"],
            pipeline=d["pipeline"],
            status=RequestStatus(d["status"]),
            queue=d["queue"],
            priority=d["priority"],
            params=d.get("params"),
            submitter=d.get("submitter"),
            idempotency_key=d.get("idempotency_key"),
            reused_request_id=d.get("reused_request_id"),
            created_at=d["created_at"],
            started_at=d.get("started_at"),
            finished_at=d.get("finished_at"),
            counts=TaskCounts(c["total"], c["succeeded"], c["failed"], c["cancelled"]),
            tasks=tuple(Task.from_json(t) for t in d.get("tasks") or ()),
        )


# ------------------------------------------------------------------------ errors
@dataclass(frozen=True)
class FieldError:
    """One failing field of a 422: a JSON path into the body, or `query.<name>` …"""

    path: str
    message: str


class ClientError(Exception):
    """The API answered with an error (a problem document), or did not answer.

    `status` is the HTTP status (None when no answer came), `title` and `detail` the
    problem document's, `errors` the failing fields of bad input."""

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str,
        errors: tuple[FieldError, ...] = (),
        type: str = "about:blank",
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.type = type


class AuthError(ClientError):
    """401: no token or not a valid one; 403: the token's role does not allow it."""


class NotFound(ClientError):
    """404: no such request, task, log or endpoint."""


class Conflict(ClientError):
    """409: e.g. an idempotency key reused with other params."""


class ValidationError(ClientError):
    """422: an unknown pipeline, params the schema refuses, an invalid field."""


class ServerUnavailable(ClientError):
    """5xx, or no answer at all (refused, reset, timed out)."""


class WaitTimeout(TimeoutError):
    """`Client.wait` ran out of time; `request` is the request as last seen."""

    def __init__(self, request: Request, timeout: float) -> None:
        super().__init__(f"request {request.id} still {request.status.value} after {timeout:g}s")
        self.request = request
        self.timeout = timeout


_ERRORS: dict[int, type[ClientError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
}


def error_from(status: int, body: bytes, reason: str = "") -> ClientError:
    """The typed error for an error answer: from its problem document when it has one
    (RFC 9457), else from its status line and the start of its body."""
    cls = _ERRORS.get(status) or (ServerUnavailable if status >= 500 else ClientError)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        errors = tuple(
            FieldError(str(e.get("path", "")), str(e.get("message", "")))
            for e in doc.get("errors") or ()
            if isinstance(e, dict)
        )
        return cls(
            status,
            str(doc.get("title") or reason),
            doc["detail"],
            errors,
            str(doc.get("type") or "about:blank"),
        )
    text = body.decode("utf-8", "replace").strip()[:500]
    return cls(status, reason or "Error", text or reason or f"HTTP {status}")


def unreachable(url: str, exc: Exception) -> ServerUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return ServerUnavailable(None, "Timeout", f"no answer from {url} in time ({exc})")
    return ServerUnavailable(None, "Unreachable", f"cannot reach {url}: {exc}")


# ---------------------------------------------------------------- event streams
def sse_events(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as dicts of their fields (`id`, `event`, `data`); comments
    are skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = fields[name] + "\n" + value if name in fields else value
    if fields:
        yield fields


class _StreamFailed(Exception):
    """The event stream cannot be used (refused, cut, silent): poll instead."""


# ------------------------------------------------------------------------- logs
class LogStream:
    """A task attempt's log as text, as it arrives: iterate it; close it (or use `with`)
    to stop early."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self._chunks = self._read()

    def _read(self) -> Generator[str, None, None]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            for raw in self._response.iter_bytes():
                text = decoder.decode(raw)
                if text:
                    yield text
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        except httpx.TransportError as exc:
            raise unreachable(self._url, exc) from None
        finally:
            self._response.close()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def read(self) -> str:
        """Everything (that is left), at once."""
        return "".join(self)

    def close(self) -> None:
        self._chunks.close()
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# ----------------------------------------------------------------------- client
def _when(value: float | datetime | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class _Watch:
    """What `wait` has seen so far."""

    def __init__(self, on_update: Callable[[Request], None] | None) -> None:
        self.on_update = on_update
        self.event_id: int | None = None  # the last event seen on the stream
        self.refreshed = 0.0

    @property
    def request(self) -> Request:
        return self._request

    def see(self, req: Request) -> Request:
        self._request = req
        self.refreshed = time.monotonic()
        if self.on_update is not None:
            self.on_update(req)
        return req


class Client:
    """A connection to one Conveyor server. Thread-safe; close it (or use `with`)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"User-Agent": f"conveyor-client/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing
    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        """One request; its JSON answer. Raises a ClientError."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        try:
            r = self._http.request(method, API + path, json=body, params=params or None)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        if r.is_error:
            raise error_from(r.status_code, r.content, r.reason_phrase)
        try:
            return r.json()
        except ValueError:
            raise ClientError(
                r.status_code, "Not JSON", f"{method} {path} answered something that is not JSON"
            ) from None

    def _open(
        self, path: str, query: Mapping[str, Any], read_timeout: float | None
    ) -> httpx.Response:
        """A streamed answer, checked: raises a ClientError instead of an error answer."""
        params = {k: v for k, v in query.items() if v is not None}
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        request = self._http.build_request("GET", API + path, params=params, timeout=timeout)
        try:
            r = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        if r.is_error:
            try:
                content = r.read()
            except httpx.TransportError:
                content = b""
            finally:
                r.close()
            raise error_from(r.status_code, content, r.reason_phrase)
        return r

    # ---------------------------------------------------------------- requests
    def submit(
        self,
        pipeline: str,
        params: Any,
        *,
        queue: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
        cache_read: bool = True,
        cache_write: bool = True,
    ) -> Request:
        """Submit to a pipeline: the new request, with its tasks. With an idempotency key
        used before (same params), the earlier request; other params: Conflict."""
        body: dict[str, Any] = {
            "pipeline": pipeline,
            "params": params,
            "cache": {"read": cache_read, "write": cache_write},
        }
        if queue is not None:
            body["queue"] = queue
        if priority is not None:
            body["priority"] = priority
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return Request.from_json(self._call("POST", "/requests", body=body))

    def status(self, request_id: int) -> Request:
        """A request and its tasks."""
        return Request.from_json(self._call("GET", f"/requests/{request_id}"))

    def cancel(self, request_id: int) -> Request:
        """Queued tasks never run; running ones are stopped."""
        return Request.from_json(self._call("POST", f"/requests/{request_id}/cancel"))

    def retry(self, request_id: int) -> Request:
        """Run a finished request's failed and cancelled tasks again."""
        return Request.from_json(self._call("POST", f"/requests/{request_id}/retry"))

    def wait(
        self,
        request_id: int,
        timeout: float | None = None,
        *,
        on_update: Callable[[Request], None] | None = None,
        poll: float = 5.0,
    ) -> Request:
        """Block until the request is finished (succeeded, failed or cancelled) and return
        it; raise WaitTimeout (holding the request as last seen) after `timeout` seconds.

        Follows the server's event stream for the request, so it returns as soon as the
        request finishes; if the stream cannot be used it polls, at growing intervals up
        to `poll` seconds, riding out a server that is briefly unavailable.
        `on_update(request)` is called with each state seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = _Watch(on_update)
        watch.see(self.status(request_id))
        try:
            while not watch.request.finished and not _past(deadline):
                self._follow(watch, deadline)
        except _StreamFailed as exc:
            log.info("event stream unusable (%s); polling request %s", exc, request_id)
            self._poll(watch, deadline, poll)
        if not watch.request.finished:
            raise WaitTimeout(watch.request, timeout or 0.0)
        return watch.request

    def _follow(self, watch: _Watch, deadline: float | None) -> None:
        """Watch one stream of the request's events until the request finishes or the
        stream ends at its time limit; raises _StreamFailed when the stream cannot be
        used."""
        rid = watch.request.id
        left = _left(deadline)
        limit = MAX_STREAM_SECONDS if left is None else min(max(left, 0.01), MAX_STREAM_SECONDS)
        query = {"selector": f"request.{rid}", "timeout": round(limit, 3), "after": watch.event_id}
        try:
            r = self._open("/events/stream", query, STREAM_READ_TIMEOUT)
        except ClientError as exc:
            raise _StreamFailed(str(exc)) from None
        opened = time.monotonic()
        try:
            lines = r.iter_lines()
            if watch.event_id is None:
                # The stream holds everything from its first line on: a look after it
                # misses nothing.
                next(lines, None)
                if watch.see(self.status(rid)).finished:
                    return
            for event in sse_events(lines):
                if event.get("id", "").isdigit():
                    watch.event_id = int(event["id"])
                # Task events come in bursts: look at most twice a second for them.
                kind = event.get("event", "")
                due = kind.startswith("request.") or time.monotonic() - watch.refreshed > 0.5
                if due and watch.see(self.status(rid)).finished:
                    return
            if watch.see(self.status(rid)).finished:
                return
        except httpx.TransportError as exc:
            raise _StreamFailed(str(exc) or type(exc).__name__) from None
        except ServerUnavailable as exc:
            raise _StreamFailed(str(exc)) from None
        finally:
            r.close()
        if time.monotonic() - opened < limit - 1.0:
            # Ended before its time: the server is stopping (or something between cut it).
            raise _StreamFailed("the stream ended early")

    def _poll(self, watch: _Watch, deadline: float | None, poll: float) -> None:
        delay = min(POLL_FIRST, poll)
        while not watch.request.finished:
            left = _left(deadline)
            if left is not None and left <= 0:
                return
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 1.5, poll)
            try:
                watch.see(self.status(watch.request.id))
            except ServerUnavailable as exc:
                log.warning("request %s: %s; trying again", watch.request.id, exc.detail)

    def list(
        self,
        *,
        status: RequestStatus | str | None = None,
        pipeline: str | None = None,
        queue: str | None = None,
        submitter: str | None = None,
        created_after: float | datetime | str | None = None,
        created_before: float | datetime | str | None = None,
        q: str | None = None,
        page_size: int = 100,
        limit: int | None = None,
    ) -> Iterator[Request]:
        """Requests, newest first (without their tasks), fetched a page at a time as the
        iteration goes on; at most `limit` of them."""
        query: dict[str, Any] = {
            "status": None if status is None else RequestStatus(status).value,
            "pipeline": pipeline,
            "queue": queue,
            "submitter": submitter,
            "created_after": _when(created_after),
            "created_before": _when(created_before),
            "q": q,
            "limit": page_size,
        }
        given = 0
        while True:
            if limit is not None:
                query["limit"] = min(page_size, limit - given)
                if query["limit"] <= 0:
                    return
            page = self._call("GET", "/requests", query=query)
            for item in page["items"]:
                yield Request.from_json(item)
                given += 1
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    # ------------------------------------------------------------------- tasks
    def task(self, task_id: int) -> Task:
        return Task.from_json(self._call("GET", f"/tasks/{task_id}"))

    def logs(
        self,
        task_id: int,
        attempt: int | None = None,
        tail: int | None = None,
        follow: bool = False,
        timeout: float | None = None,
    ) -> LogStream:
        """A task attempt's log (default: the latest attempt), as an iterator of text.
        `tail`: only the last N lines. `follow`: keep reading while the attempt runs
        (waiting for it to start if need be) and end when it ends, or after `timeout`
        seconds. Raises NotFound at once when there is no such log."""
        query = {
            "attempt": attempt,
            "tail": tail,
            "follow": "true" if follow else None,
            "timeout": timeout if follow else None,
        }
        # A followed log is silent while the task is: the read waits as long as following
        # may (unbounded without a timeout, as the caller asked).
        read = (None if timeout is None else timeout + self.timeout) if follow else self.timeout
        return LogStream(self._open(f"/tasks/{task_id}/log", query, read), self.url)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
