"""The event stream: server-sent events, filtered by selectors, resumable."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema

from conveyor.api import problems
from conveyor.api.auth import Reader, conveyor_of
from conveyor.api.models import ID_MAX
from conveyor.api.problems import Problem
from conveyor.api.stream import EventHub
from conveyor.app import Conveyor
from conveyor.events import Event, event_matches
from conveyor.views import event_view

router = APIRouter(tags=["events"])

BACKLOG_PAGE = 500


_SEGMENT = r"[^., \x00-\x1f\x7f]+"
_SELECTOR = rf"{_SEGMENT}(\.{_SEGMENT})*"
SELECTORS = rf"^ *({_SELECTOR}( *, *{_SELECTOR})*)? *$"


def parse_selectors(text: str | None) -> list[str]:
    """Comma-separated selectors; none: every event."""
    if text is None:
        return []
    selectors = [s.strip(" ") for s in text.split(",") if s.strip(" ")]
    for s in selectors:
        if any(not part for part in s.split(".")):
            message = f"selector {s!r} has an empty segment (e.g. pipeline.spotbot.*)"
            raise Problem(
                422, f"query.selector: {message}", "validation", [("query.selector", message)]
            )
    return selectors


def sse_event(e: Event) -> bytes:
    data = json.dumps(event_view(e), separators=(",", ":"), allow_nan=False)
    return f"id: {e.id}\nevent: {e.kind}\ndata: {data}\n\n".encode()


def _matches(selectors: Sequence[str], e: Event) -> bool:
    return not selectors or any(event_matches(s, e) for s in selectors)


async def event_stream(
    app: Conveyor,
    hub: EventHub,
    selectors: Sequence[str],
    after: int,
    heartbeat: float,
    timeout: float | None,
) -> AsyncIterator[bytes]:
    """Events after `after`, in id order, as they happen: the backlog from the store,
    then what the hub hands out. A comment every `heartbeat` seconds keeps idle
    connections open (and finds the ones whose client went away)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor = after
    yield b": connected\n\n"
    with hub.subscription() as woken:
        last_sent = time.monotonic()
        while not hub.closed:
            woken.clear()
            events, covered = hub.read(cursor)
            if not covered:
                page = await run_in_threadpool(app.events, cursor, None, BACKLOG_PAGE)
                limit = hub.released
                events = [e for e in page if e.id <= limit]
                if not events:  # nothing stored between here and what the hub holds
                    cursor = max(cursor, limit)
                    continue
            if events:
                cursor = events[-1].id
                out = b"".join(sse_event(e) for e in events if _matches(selectors, e))
                if out:
                    last_sent = time.monotonic()
                    yield out
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wait = heartbeat - (now - last_sent)
            if deadline is not None:
                wait = min(wait, deadline - now)
            try:
                await asyncio.wait_for(woken.wait(), timeout=max(wait, 0.0))
            except TimeoutError:
                if time.monotonic() - last_sent >= heartbeat:
                    last_sent = time.monotonic()
                    yield b": keepalive\n\n"


@router.get(
    "/events/stream",
    summary="Follow events as server-sent events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A `text/event-stream`: `id`, `event` (the kind) and `data` (the "
            "event as JSON) for each event; comment lines keep the connection alive",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "description": "Each event (comments aside)",
                        "type": "object",
                        "properties": {
                            "id": {"type": "string", "description": "The event id"},
                            "event": {"type": "string", "description": "The event kind"},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/Event"},
                            },
                        },
                        "required": ["id", "event", "data"],
                    }
                }
            },
        },
        **problems.responses(401, 403, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
async def stream(
    request: Request,
    caller: Reader,
    selector: Annotated[
        str | None,
        Query(
            max_length=1000,
            pattern=SELECTORS,
            description="Comma-separated selectors: `*` stands for one dotted segment and "
            "a selector matches everything below it, e.g. `pipeline.spotbot.*`, "
            "`request.42`, `task.succeeded`, `queue.urgent`. None: every event.",
        ),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=ID_MAX, description="Start after this event id (default: now)."),
    ] = None,
    timeout: Annotated[
        float | None, Query(gt=0, le=86400, description="End the stream after this many seconds.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        WithJsonSchema({"type": "string", "pattern": "^[0-9]{1,18}$"}),
        Header(
            alias="Last-Event-ID",
            pattern="^[0-9]{1,18}$",
            description="Resume after this event id (EventSource sends it on reconnect).",
        ),
    ] = None,
) -> StreamingResponse:
    """Watch instead of polling: every event (or those matching `selector`) from now on,
    or from `after` / `Last-Event-ID` on, in id order. Ends when the client goes away."""
    selectors = parse_selectors(selector)
    app = conveyor_of(request)
    hub: EventHub = request.app.state.hub
    await run_in_threadpool(hub.start)
    start = int(last_event_id) if last_event_id is not None else after
    if start is None:
        start = hub.released
    heartbeat: float = request.app.state.heartbeat
    return StreamingResponse(
        event_stream(app, hub, selectors, start, heartbeat, timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
