"""Problem documents (RFC 9457): every error the API answers, as
`application/problem+json` with `type`, `title`, `status`, `detail` and, for bad input,
`errors` naming each failing field by its path.

Paths: a field of the JSON body is a JSON path (`$.params.logs_to_process[0].output_dir`);
a query, path or header parameter is `query.<name>`, `path.<name>`, `header.<name>`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.app import UnknownPipeline
from conveyor.pipelines import ParamsError, json_path
from conveyor.store import Conflict, NotFound, StoreError, Unavailable
from conveyor.tasks import TransitionError
from conveyor.tokens import TokenNameError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE = "urn:conveyor:problem:"


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    message: str


class ProblemModel(BaseModel):
    """The shape of every error response (for the OpenAPI document)."""

    model_config = ConfigDict(extra="forbid", title="Problem")

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class Problem(Exception):
    """Raised anywhere in the API; answered as a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        kind: str | None = None,
        errors: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.errors = list(errors)
        self.headers = dict(headers or {})
        self.title = title


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")
    except ValueError:
        return "error"


def problem_body(
    status: int,
    detail: str,
    kind: str | None = None,
    errors: Iterable[tuple[str, str]] = (),
    title: str | None = None,
) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body: dict[str, Any] = {
        "type": _TYPE + (kind or _slug(status)),
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    listed = [{"path": p, "message": m} for p, m in errors]
    if listed:
        body["errors"] = listed
    return body


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem_body(problem.status, problem.detail, problem.kind, problem.errors, problem.title),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


def body_path(loc: Sequence[Any]) -> str:
    """A JSON path for a location inside the body."""
    return json_path(loc)


def param_path(loc: Sequence[Any]) -> str:
    """`query.limit`, `path.request_id`, `header.last-event-id`; `$…` inside the body."""
    if loc and loc[0] == "body":
        return body_path(list(loc[1:]))
    return ".".join(str(p) for p in loc)


def validation_problem(
    errors: Sequence[Mapping[str, Any]], where: str, prefix: Sequence[Any] = ()
) -> Problem:
    listed = [
        (
            body_path([*prefix, *e["loc"]]) if where == "body" else param_path(e["loc"]),
            str(e["msg"]),
        )
        for e in errors
    ]
    first_path, first_msg = listed[0] if listed else ("$", "invalid")
    more = f" (and {len(listed) - 1} more)" if len(listed) > 1 else ""
    return Problem(422, f"{first_path}: {first_msg}{more}", "validation", listed)


def from_pydantic(exc: ValidationError, prefix: Sequence[Any] = ()) -> Problem:
    """A body that parsed as JSON but does not have the expected shape."""
    return validation_problem(exc.errors(include_url=False), "body", prefix)


def _domain_problem(exc: Exception) -> Problem:
    if isinstance(exc, UnknownPipeline):
        return Problem(422, str(exc.args[0]), "unknown-pipeline", [("$.pipeline", "unknown")])
    if isinstance(exc, ParamsError):
        path = "$.params" + exc.path[1:]
        return Problem(
            422, f"params invalid at {path}: {exc.message}", "invalid-params", [(path, exc.message)]
        )
    if isinstance(exc, NotFound):
        return Problem(404, str(exc), "not-found")
    if isinstance(exc, Conflict | TransitionError):
        return Problem(409, str(exc), "conflict")
    if isinstance(exc, TokenNameError):
        return Problem(422, str(exc), "validation", [("$.name", str(exc))])
    if isinstance(exc, Unavailable):
        return Problem(
            503, f"database unavailable: {exc}", "unavailable", headers={"Retry-After": "5"}
        )
    return Problem(500, "internal error", "internal")


def install(app: FastAPI) -> None:
    """Answer every error, expected or not, with a problem document."""

    async def on_problem(_req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc)

    async def on_validation(_req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            reason = (errors[0].get("ctx") or {}).get("error", "not JSON")
            detail = f"the body is not valid JSON: {reason}"
            return problem_response(Problem(400, detail, "bad-json"))
        return problem_response(validation_problem(errors, "params"))

    async def on_http(_req: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        return problem_response(Problem(exc.status_code, detail, headers=exc.headers))

    async def on_domain(_req: Request, exc: Exception) -> JSONResponse:
        problem = _domain_problem(exc)
        if problem.status >= 500 and problem.status != 503:
            log.error("unexpected error", exc_info=exc)
        return problem_response(problem)

    async def on_unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return problem_response(Problem(500, "internal error: the server logged it", "internal"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (UnknownPipeline, ParamsError, StoreError, TransitionError, TokenNameError):
        app.add_exception_handler(cls, on_domain)
    app.add_exception_handler(Exception, on_unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem responses an operation may give, for the OpenAPI document."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "The body is not JSON, or is empty",
    401: "No token, or not a valid one",
    403: "The token's role does not allow this",
    404: "No such thing",
    409: "Conflicts with what is stored",
    413: "The body is larger than the server accepts",
    415: "The body is not `application/json`",
    422: "Invalid input; `errors` names each failing field",
    503: "The database cannot be reached",
}
