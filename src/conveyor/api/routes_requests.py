"""Requests: submit, look, list, cancel, retry, and a request's events."""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import WithJsonSchema

from conveyor.api import models, problems
from conveyor.api.auth import Caller, Reader, Submitter, conveyor_of
from conveyor.api.body import parse, read_json
from conveyor.api.models import ID_MAX, Status
from conveyor.api.problems import Problem
from conveyor.app import Conveyor, SubmitOptions
from conveyor.requests import CachePolicy
from conveyor.requests import Request as ConveyorRequest
from conveyor.store import RequestFilter
from conveyor.tokens import may_manage
from conveyor.views import event_view, request_view

router = APIRouter(tags=["requests"])

RequestId = Annotated[int, Path(ge=1, le=ID_MAX, description="Request id.")]
_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
FilterName = Annotated[str | None, Query(min_length=1, max_length=200, pattern=_NO_CONTROL)]
_ONE_REQUEST = {"description": "The request, with its tasks", "model": models.Request}


def _view(req: ConveyorRequest, status: int = 200, **headers: str) -> JSONResponse:
    return JSONResponse(request_view(req), status_code=status, headers=headers or None)


# --------------------------------------------------------------------- submit
@router.post(
    "/requests",
    status_code=201,
    summary="Submit a request",
    response_model=None,
    responses={
        201: {"description": "Created", "model": models.Request},
        200: {
            "description": "An earlier request with this idempotency key",
            "model": models.Request,
        },
        **problems.responses(400, 401, 403, 409, 413, 415, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submit"}}},
        },
        "x-required-role": "submit",
    },
)
async def submit(request: Request, caller: Submitter) -> JSONResponse:
    """Submit to a pipeline; the submitter is the token's name. Answers 201 with the new
    request, or 200 with the earlier one when the idempotency key was used before with
    the same params."""
    body = parse(models.Submit, await read_json(request))
    app = conveyor_of(request)
    opts = SubmitOptions(
        queue=body.queue,
        priority=body.priority,
        idempotency_key=body.idempotency_key,
        submitter=caller.name,
        cache=CachePolicy(read=body.cache.read, write=body.cache.write),
    )
    submitted = await asyncio.wrap_future(app.submit_grouped(body.pipeline, body.params, opts))
    req, created = submitted.request, submitted.created
    return _view(req, 201 if created else 200, Location=f"/api/v1/requests/{req.id}")


# ----------------------------------------------------------------------- look
@router.get(
    "/requests/{request_id}",
    summary="A request and its tasks",
    response_model=None,
    responses={200: _ONE_REQUEST, **problems.responses(401, 403, 404, 422, 503)},
    openapi_extra={"x-required-role": "read"},
)
def get_request(request: Request, caller: Reader, request_id: RequestId) -> JSONResponse:
    """Status, tasks with progress and attempts, timestamps, and where the result was
    reused from the cache (`reused_request_id`), and each task's outputs."""
    req, outputs = conveyor_of(request).get_with_outputs(request_id)
    return JSONResponse(request_view(req, outputs=outputs))


def encode_cursor(last_id: int) -> str:
    """Opaque to clients: the last id listed, as 8 bytes in URL-safe base64 (11 chars)."""
    return base64.urlsafe_b64encode(last_id.to_bytes(8, "big")).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id to list below. Any string of the documented form is a cursor (one this API
    never gave out just lists less, or nothing)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=")
    except (binascii.Error, ValueError):
        raw = b""
    if len(cursor) != 11 or len(raw) != 8:
        message = "not a cursor this API gave out"
        raise Problem(422, f"query.cursor: {message}", "validation", [("query.cursor", message)])
    return min(int.from_bytes(raw, "big"), ID_MAX)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(value: str | None, name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 / RFC 3339 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None:
        if math.isfinite(number):
            return number
    else:
        for text in (value, value.upper()):  # RFC 3339 allows a lower-case t and z
            try:
                when = datetime.fromisoformat(text)
            except ValueError:
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return (when - _EPOCH).total_seconds()
    message = "expected epoch seconds or an ISO 8601 time, e.g. 2026-01-31T12:00:00Z"
    raise Problem(422, f"query.{name}: {message}", "validation", [(f"query.{name}", message)])


_TIME_DOC = "Epoch seconds, or an ISO 8601 time (UTC unless it has an offset)."
# What the document says a time is; the parsing is parse_time's.
Time = Annotated[
    str,
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]}),
]


@router.get(
    "/requests",
    summary="List requests, newest first",
    response_model=None,
    responses={
        200: {"description": "A page of requests", "model": models.RequestPage},
        **problems.responses(401, 403, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def list_requests(
    request: Request,
    caller: Reader,
    status: Annotated[Status | None, Query()] = None,
    pipeline: FilterName = None,
    queue: FilterName = None,
    submitter: FilterName = None,
    created_after: Annotated[
        Time | None, Query(max_length=64, description="Created at or after. " + _TIME_DOC)
    ] = None,
    created_before: Annotated[
        Time | None, Query(max_length=64, description="Created before. " + _TIME_DOC)
    ] = None,
    q: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=_NO_CONTROL,
            description="Text that appears in the params (case-insensitive for ASCII).",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[A-Za-z0-9_-]{11}$", description="`next_cursor` of the page before."),
    ] = None,
) -> JSONResponse:
    """Filter by status, pipeline, queue, submitter, creation time and text in the
    params; page with `cursor`."""
    flt = RequestFilter(
        status=status,
        pipeline=pipeline,
        queue=queue,
        submitter=submitter,
        created_after=parse_time(created_after, "created_after"),
        created_before=parse_time(created_before, "created_before"),
        before_id=decode_cursor(cursor) if cursor is not None else None,
        text=q,
        limit=limit + 1,
    )
    found = conveyor_of(request).list_requests(flt)
    page = found[:limit]
    more = len(found) > limit
    body: dict[str, Any] = {
        "items": [request_view(r, with_tasks=False) for r in page],
        "next_cursor": encode_cursor(page[-1].id) if more and page else None,
    }
    return JSONResponse(body)


# ------------------------------------------------------------ cancel and retry
def _managed(app: Conveyor, caller: Caller, request_id: int) -> None:
    req = app.get(request_id, with_tasks=False)
    if not may_manage(caller.role, caller.name, req.submitter):
        raise Problem(
            403,
            f"request {request_id} was submitted by {req.submitter!r}: only its submitter "
            "or an admin token may change it",
            "forbidden",
        )


@router.post(
    "/requests/{request_id}/cancel",
    summary="Cancel a request",
    response_model=None,
    responses={200: _ONE_REQUEST, **problems.responses(401, 403, 404, 409, 422, 503)},
    openapi_extra={"x-required-role": "submit"},
)
def cancel_request(request: Request, caller: Submitter, request_id: RequestId) -> JSONResponse:
    """Queued tasks never run; running ones are stopped. Your own requests with a submit
    token, anyone's with an admin token."""
    app = conveyor_of(request)
    _managed(app, caller, request_id)
    return _view(app.cancel(request_id))


@router.post(
    "/requests/{request_id}/retry",
    summary="Retry a failed or cancelled request",
    response_model=None,
    responses={200: _ONE_REQUEST, **problems.responses(401, 403, 404, 409, 422, 503)},
    openapi_extra={"x-required-role": "submit"},
)
def retry_request(request: Request, caller: Submitter, request_id: RequestId) -> JSONResponse:
    """Runs its failed and cancelled tasks again; 409 while it is still running. Your own
    requests with a submit token, anyone's with an admin token."""
    app = conveyor_of(request)
    _managed(app, caller, request_id)
    return _view(app.retry(request_id))


@router.get(
    "/requests/{request_id}/events",
    summary="A request's events, oldest first",
    response_model=None,
    responses={
        200: {"description": "Events", "model": models.EventList},
        **problems.responses(401, 403, 404, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def request_events(
    request: Request,
    caller: Reader,
    request_id: RequestId,
    after: Annotated[int, Query(ge=0, le=ID_MAX, description="Only events after this id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> JSONResponse:
    """Every state change of the request and its tasks; `after` pages on."""
    app = conveyor_of(request)
    app.get(request_id, with_tasks=False)
    events = app.events(after_id=after, request_id=request_id, limit=limit)
    return JSONResponse({"items": [event_view(e) for e in events]})
