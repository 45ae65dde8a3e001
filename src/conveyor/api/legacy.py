"""The Spotbot-compatible endpoint: the old PHP page's protocol, byte for byte, so its
callers work unchanged.

    curl -d @my_config.json "http://HOST/spotbot/spotbot_offline_submitter.php?context=SUBMIT"
        -> the new request id, as plain text (no newline)
    curl "http://HOST/spotbot/spotbot_offline_submitter.php?context=STATUS_CHECK&spotbot_offline_req_id=N"
        -> REQUESTED, QUEUED, REQ_SUCCESS, REQ_FAILED or REQ_NOT_FOUND

`curl -d` sends the file (newlines stripped) as `application/x-www-form-urlencoded`; like
the PHP page, the raw body is read as JSON whatever the content type says. The requests
go to the pipeline named by `[legacy] pipeline` (default: `spotbot`).

Authentication: existing callers send none, so by default none is needed; what they
submit is recorded with the submitter `legacy`. With `[legacy] require_token = true` a
token is needed (a submit token to SUBMIT, any token to STATUS_CHECK), sent as
`Authorization: Bearer <token>` or, for callers that can only change the URL, as
`&token=<token>`. A token that is sent is always checked, and what it submits is
recorded under its name. Errors are problem documents, as everywhere in the API.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from conveyor.api import problems
from conveyor.api.auth import BearerCredentials, Caller, conveyor_of, identify, secret_from
from conveyor.api.body import loads
from conveyor.api.problems import Problem
from conveyor.app import Conveyor, SubmitOptions, UnknownPipeline
from conveyor.pipelines import ParamsError
from conveyor.requests import RequestStatus
from conveyor.store import NotFound
from conveyor.tokens import Role

LEGACY_PATH = "/spotbot/spotbot_offline_submitter.php"
LEGACY_SUBMITTER = "legacy"
NOT_FOUND = "REQ_NOT_FOUND"

router = APIRouter(tags=["legacy"])


def legacy_status(status: RequestStatus | None) -> str:
    """The old request_status names for Conveyor's request statuses (None: no such
    request)."""
    if status is None:
        return NOT_FOUND
    return {
        RequestStatus.REQUESTED: "REQUESTED",
        RequestStatus.RUNNING: "QUEUED",
        RequestStatus.SUCCEEDED: "REQ_SUCCESS",
        RequestStatus.FAILED: "REQ_FAILED",
        RequestStatus.CANCELLED: "REQ_FAILED",
    }[status]


def _caller(app: Conveyor, secret: str | None, needed: Role) -> Caller:
    if secret is None and not app.config.legacy.require_token:
        return Caller(LEGACY_SUBMITTER, Role.SUBMIT)
    return identify(app, secret, needed, open_reading=False)


def _status_of(app: Conveyor, raw_id: str) -> str:
    if not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 18:
        return NOT_FOUND  # no request can have it
    try:
        req = app.get(int(raw_id), with_tasks=False)
    except NotFound:
        return NOT_FOUND
    # The old table held only Spotbot requests: others are not its business.
    if req.pipeline != app.config.legacy.pipeline:
        return NOT_FOUND
    return legacy_status(req.status)


def _text(body: str) -> PlainTextResponse:
    return PlainTextResponse(body, headers={"Cache-Control": "no-store"})


async def spotbot_offline_submitter(
    request: Request,
    creds: BearerCredentials,
    context: Annotated[
        Literal["SUBMIT", "STATUS_CHECK"] | None, Query(description="What to do.")
    ] = None,
    spotbot_offline_req_id: Annotated[
        str | None, Query(description="STATUS_CHECK: the request id")
    ] = None,
    token: Annotated[
        str | None,
        Query(description="A token, for callers that cannot send a header (see [legacy])"),
    ] = None,
) -> PlainTextResponse:
    """The old PHP page's protocol; see the README's "Legacy Spotbot endpoint"."""
    app = conveyor_of(request)
    secret = secret_from(request, creds) or token
    if context == "SUBMIT":
        caller = await run_in_threadpool(_caller, app, secret, Role.SUBMIT)
        params = loads(await request.body())
        opts = SubmitOptions(submitter=caller.name)
        pipeline = app.config.legacy.pipeline
        try:
            submitted = await asyncio.wrap_future(app.submit_grouped(pipeline, params, opts))
        except UnknownPipeline:
            raise Problem(
                404,
                f"the legacy endpoint is not set up here: no pipeline {pipeline!r} is "
                "configured (see [legacy] pipeline)",
                "not-found",
            ) from None
        except ParamsError as exc:
            # The body is the params themselves: paths are relative to it.
            raise Problem(
                422,
                f"params invalid at {exc.path}: {exc.message}",
                "invalid-params",
                [(exc.path, exc.message)],
            ) from None
        return _text(str(submitted.request.id))
    if context == "STATUS_CHECK":
        await run_in_threadpool(_caller, app, secret, Role.READ)
        if spotbot_offline_req_id is None:
            message = "STATUS_CHECK needs spotbot_offline_req_id"
            raise Problem(
                400, message, "bad-request", [("query.spotbot_offline_req_id", "missing")]
            )
        return _text(await run_in_threadpool(_status_of, app, spotbot_offline_req_id.strip()))
    raise Problem(
        400,
        "no context: expected context=SUBMIT or context=STATUS_CHECK",
        "bad-request",
        [("query.context", "expected SUBMIT or STATUS_CHECK")],
    )


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "SUBMIT: the new request id. STATUS_CHECK: REQUESTED, QUEUED, "
        "REQ_SUCCESS, REQ_FAILED or REQ_NOT_FOUND",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **problems.responses(400, 401, 403, 404, 413, 422, 503),
}
_OPTIONAL_TOKEN: list[dict[str, list[str]]] = [{}, {"token": []}]

router.add_api_route(
    LEGACY_PATH,
    spotbot_offline_submitter,
    methods=["POST"],
    name="legacy_spotbot_post",
    summary="Spotbot offline submitter: SUBMIT (legacy protocol)",
    response_class=PlainTextResponse,
    responses=_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "SUBMIT: the request's params as JSON, in any content type "
            "(`curl -d @file` sends application/x-www-form-urlencoded)",
            "content": {"application/json": {"schema": {}}},
        },
        "security": _OPTIONAL_TOKEN,
    },
)
router.add_api_route(
    LEGACY_PATH,
    spotbot_offline_submitter,
    methods=["GET"],
    name="legacy_spotbot_get",
    summary="Spotbot offline submitter: STATUS_CHECK (legacy protocol)",
    response_class=PlainTextResponse,
    responses=_RESPONSES,
    openapi_extra={"security": _OPTIONAL_TOKEN},
)
