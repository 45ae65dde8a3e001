"""A task's artifacts: list them, and download one (streamed through the server, or a
redirect to a time-limited link when `[artifacts] presign` is set and the store makes
them)."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from conveyor.api import models, problems
from conveyor.api.auth import Reader, conveyor_of
from conveyor.api.models import ID_MAX
from conveyor.api.problems import Problem
from conveyor.app import Conveyor
from conveyor.artifacts import Artifact, ArtifactError, ArtifactKind, ArtifactMissing, Readable
from conveyor.views import artifact_view

router = APIRouter(tags=["artifacts"])

TaskId = Annotated[int, Path(ge=1, le=ID_MAX, description="Task id.")]
CHUNK = 256 * 1024


def _store_problem(exc: ArtifactError) -> Problem:
    if isinstance(exc, ArtifactMissing):
        return Problem(404, f"gone from the artifact store: {exc}", "not-found")
    return Problem(502, f"artifact store: {exc}", "artifact-store")


@router.get(
    "/tasks/{task_id}/artifacts",
    summary="A task's artifacts",
    response_model=None,
    responses={
        200: {"description": "Outputs and logs", "model": models.ArtifactList},
        **problems.responses(401, 403, 404, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
def list_artifacts(request: Request, caller: Reader, task_id: TaskId) -> JSONResponse:
    """The outputs of the task's latest attempt that kept any, and each attempt's log
    (where logs are uploaded), with size, sha256, key and URL."""
    found = conveyor_of(request).task_artifacts(task_id)
    return JSONResponse({"items": [artifact_view(a) for a in found]})


def _chunks(body: Readable) -> Iterator[bytes]:
    try:
        while chunk := body.read(CHUNK):
            yield chunk
    finally:
        body.close()


def _open(app: Conveyor, artifact: Artifact) -> Readable:
    try:
        return app.open_artifact(artifact)
    except ArtifactError as exc:
        raise _store_problem(exc) from None


def _link(app: Conveyor, artifact: Artifact) -> str | None:
    try:
        return app.artifact_link(artifact)
    except ArtifactError as exc:
        raise _store_problem(exc) from None


@router.get(
    "/tasks/{task_id}/artifacts/{name:path}",
    summary="Download an artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file, streamed, with the media type its name suggests",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        307: {"description": "A time-limited link to the file in the artifact store"},
        502: {"description": "The artifact store failed"},
        **problems.responses(401, 403, 404, 422, 503),
    },
    openapi_extra={"x-required-role": "read"},
)
async def download_artifact(
    request: Request,
    caller: Reader,
    task_id: TaskId,
    name: Annotated[str, Path(min_length=1, max_length=1024, description="Artifact name.")],
    stream: Annotated[
        bool, Query(description="Stream through the server even where links are made.")
    ] = False,
) -> Response:
    """The file. Where `[artifacts] presign` is set and the store makes links, answers
    with a redirect to one (unless `stream=true`)."""
    app = conveyor_of(request)
    artifact = await run_in_threadpool(app.artifact, task_id, name)
    return await artifact_response(app, artifact, stream)


async def artifact_response(app: Conveyor, artifact: Artifact, stream: bool) -> Response:
    """The artifact's bytes, streamed; or, where the store makes links and `stream` is
    not asked for, a redirect to a time-limited one. (The API and the dashboard.)"""
    if not stream:
        link = await run_in_threadpool(_link, app, artifact)
        if link is not None:
            return RedirectResponse(link, status_code=307)
    body = await run_in_threadpool(_open, app, artifact)
    filename = artifact.name.rsplit("/", 1)[-1]
    media = (
        "text/plain; charset=utf-8"
        if artifact.kind == ArtifactKind.LOG
        else mimetypes.guess_type(filename)[0] or "application/octet-stream"
    )
    return StreamingResponse(
        _chunks(body),
        media_type=media,
        headers={
            "Content-Length": str(artifact.size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
            "ETag": f'"{artifact.sha256}"',
            "X-Conveyor-SHA256": artifact.sha256,
        },
    )
