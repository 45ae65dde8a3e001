"""ASGI middleware: the body size limit, an access log that never holds a token, and
the API's request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.problems import Problem, problem_response
from conveyor.metrics import ApiMetrics, route_label

access_log = logging.getLogger("conveyor.api.access")


class BodyTooLarge(Problem):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the body is larger than {limit} bytes ([api] max_body)", "body-too-large"
        )


class BodyLimit:
    """Refuse bodies over `limit` bytes: at once when Content-Length says so, else as
    soon as the bytes read pass it (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await problem_response(BodyTooLarge(self.limit))(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


def redacted_query(query: bytes) -> str:
    """The query string with any `token` value hidden (the legacy endpoint accepts one)."""
    if not query:
        return ""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if not any(k == "token" for k, _ in pairs):
        return query.decode("latin-1")
    return urlencode([(k, "***" if k == "token" else v) for k, v in pairs], safe="*")


async def _timed(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    done: Callable[[int | None, float], None],
) -> None:
    """Run `app`, then tell `done` the answer's status (None: none was sent) and the
    seconds it took, even when it raised."""
    start = time.perf_counter()
    status: int | None = None

    async def sending(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await app(scope, receive, sending)
    finally:
        done(status, time.perf_counter() - start)


class AccessLog:
    """One line per request: method, path, status, time. Headers are never logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return

        def done(status: int | None, seconds: float) -> None:
            query = redacted_query(scope.get("query_string", b""))
            client = scope.get("client")
            access_log.info(
                '%s "%s %s%s" %s %.1fms',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["path"],
                f"?{query}" if query else "",
                status or "-",
                seconds * 1000,
            )

        await _timed(self.app, scope, receive, send, done)


class RequestMetrics:
    """Count every HTTP request by its route's template (not its path: ids would make a
    series each); an answer never started counts as a 500."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        def done(status: int | None, seconds: float) -> None:
            self.metrics.observe(scope["method"], route_label(scope), status or 500, seconds)

        await _timed(self.app, scope, receive, send, done)
