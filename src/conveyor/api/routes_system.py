"""Queues, workers, pipelines, and the health checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse

from conveyor.api import models, problems
from conveyor.api.auth import Admin, Reader, conveyor_of
from conveyor.queues import ALL_QUEUES
from conveyor.views import pipeline_view, queue_view, worker_view

router = APIRouter()

QueueName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f/]+$",
        description=f"A queue; `{ALL_QUEUES}` stands for every queue.",
    ),
]


@router.get(
    "/queues",
    tags=["queues"],
    summary="Queues in priority order, with task counts",
    response_model=None,
    responses={
        200: {"description": "Queues", "model": models.QueueList},
        **problems.responses(401, 403, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def list_queues(request: Request, caller: Reader) -> JSONResponse:
    return JSONResponse({"items": [queue_view(q) for q in conveyor_of(request).queues()]})


def _queue_answer(request: Request, name: str) -> JSONResponse:
    return JSONResponse(queue_view(conveyor_of(request).queue(name)))


_QUEUE_CHANGE = {
    200: {"description": "The queue now", "model": models.Queue},
    **problems.responses(401, 403, 422, 503),
}


@router.post(
    "/queues/{name}/pause",
    tags=["queues"],
    summary="Pause a queue",
    response_model=None,
    responses=_QUEUE_CHANGE,
    openapi_extra={"x-required-role": "admin"},
)
def pause_queue(request: Request, caller: Admin, name: QueueName) -> JSONResponse:
    """Workers stop taking its tasks; running ones finish."""
    conveyor_of(request).pause(name)
    return _queue_answer(request, name)


@router.post(
    "/queues/{name}/resume",
    tags=["queues"],
    summary="Resume a queue",
    response_model=None,
    responses=_QUEUE_CHANGE,
    openapi_extra={"x-required-role": "admin"},
)
def resume_queue(request: Request, caller: Admin, name: QueueName) -> JSONResponse:
    conveyor_of(request).resume(name)
    return _queue_answer(request, name)


@router.get(
    "/workers",
    tags=["workers"],
    summary="Workers",
    response_model=None,
    responses={
        200: {"description": "Workers, newest first", "model": models.WorkerList},
        **problems.responses(401, 403, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def list_workers(
    request: Request,
    caller: Reader,
    all_: Annotated[
        bool, Query(alias="all", description="Include stopped and silent workers.")
    ] = False,
) -> JSONResponse:
    found = conveyor_of(request).workers(alive_only=not all_)
    return JSONResponse({"items": [worker_view(w) for w in found]})


@router.get(
    "/pipelines",
    tags=["pipelines"],
    summary="Pipelines and their params schemas",
    response_model=None,
    responses={
        200: {"description": "Pipelines", "model": models.PipelineList},
        **problems.responses(401, 403, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def list_pipelines(request: Request, caller: Reader) -> JSONResponse:
    return JSONResponse({"items": [pipeline_view(p) for p in conveyor_of(request).pipelines()]})


health = APIRouter(tags=["health"])


@health.get(
    "/healthz",
    summary="The server is up",
    response_model=None,
    responses={200: {"description": "Up", "model": models.Health}},
)
def healthz() -> JSONResponse:
    """Needs no token."""
    return JSONResponse({"status": "ok"})


@health.get(
    "/readyz",
    summary="The server can reach its database",
    response_model=None,
    responses={200: {"description": "Ready", "model": models.Health}, **problems.responses(503)},
)
def readyz(request: Request) -> JSONResponse:
    """Needs no token; 503 while the database cannot be reached."""
    conveyor_of(request).ready()
    return JSONResponse({"status": "ready"})
