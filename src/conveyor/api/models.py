"""The API's bodies as pydantic models: what a submit may hold, and the shape of each
answer for the OpenAPI document. Answers themselves are the dicts of `conveyor.views`
(one JSON shape for the CLI and the API); tests hold the two to each other."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# No control characters: names end up in SQL text columns and in logs.
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
INT32_MAX = 2**31 - 1
ID_MAX = 2**63 - 1
Status = Literal["requested", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Input(BaseModel):
    # JSON types as the document says them: "no" is not a boolean, nor "5" a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class CacheOptions(_Input):
    read: bool = Field(default=True, description="May reuse the result of an identical request.")
    write: bool = Field(default=True, description="This request's result may be reused later.")


class Submit(_Input):
    """A new request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pipeline: Name = Field(description="A pipeline's name (see GET /api/v1/pipelines).")
    params: Any = Field(description="The pipeline's params; checked against its params schema.")
    queue: Name | None = Field(default=None, description="Queue (default: the pipeline's).")
    priority: int | None = Field(
        default=None,
        ge=-INT32_MAX,
        le=INT32_MAX,
        description="Higher runs first within a queue (default: the pipeline's).",
    )
    idempotency_key: Name | None = Field(
        default=None,
        description="Submitting again with the same key returns the first request "
        "(200) instead of making a new one; with other params it is a conflict (409).",
    )
    cache: CacheOptions = Field(
        default_factory=CacheOptions,
        description="Use of the pipeline's result cache; read=false bypasses it.",
    )


class Progress(_Strict):
    current: float
    total: float | None
    message: str | None


class Counts(_Strict):
    total: int
    succeeded: int
    failed: int
    cancelled: int


class Artifact(_Strict):
    task_id: int
    attempt: int
    kind: Literal["output", "log"]
    name: str = Field(description="Outputs: the path in the work dir; logs: attempt-N.log.")
    key: str = Field(description="The object's key in the artifact store.")
    url: str = Field(description="Where the store keeps it (s3:// or file://).")
    size: int
    sha256: str
    created_at: float


class ArtifactList(_Strict):
    items: list[Artifact]


class Task(_Strict):
    id: int
    request_id: int
    seq: int
    pipeline: str
    queue: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attempts: int
    max_attempts: int
    progress: Progress
    params: Any
    result: Any
    error: str | None
    worker: str | None = Field(description="The worker holding its lease.")
    created_at: float
    started_at: float | None
    finished_at: float | None
    outputs: list[Artifact] = Field(
        default=[], description="What it kept: its latest outputs and each attempt's log."
    )


class RequestSummary(_Strict):
    """A request without its tasks (as listed)."""

    id: int
    pipeline: str
    status: Status
    queue: str
    priority: int
    params: Any
    submitter: str | None
    idempotency_key: str | None
    reused_request_id: int | None = Field(
        description="When the result was reused from the cache: the request that made it."
    )
    created_at: float
    started_at: float | None
    finished_at: float | None
    counts: Counts


class Request(RequestSummary):
    tasks: list[Task]


class RequestPage(_Strict):
    items: list[RequestSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page.")


class Event(_Strict):
    id: int
    ts: float
    kind: str
    request_id: int | None
    task_id: int | None
    pipeline: str | None
    queue: str | None
    data: Any


class EventList(_Strict):
    items: list[Event]


class Queue(_Strict):
    name: str
    paused: bool
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class QueueList(_Strict):
    items: list[Queue]


class Worker(_Strict):
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    status: str
    running: int
    started_at: float
    last_heartbeat: float
    stopped_at: float | None


class WorkerList(_Strict):
    items: list[Worker]


class Pipeline(_Strict):
    name: str
    description: str
    executor: Literal["command", "python"]
    split: str | None
    queue: str
    priority: int
    timeout: float | None
    max_attempts: int
    concurrency: int | None
    cache: float | None = Field(description="Seconds a result may be reused; null: never.")
    params_schema: dict[str, Any] | None = Field(description="JSON Schema of the params.")


class PipelineList(_Strict):
    items: list[Pipeline]


class Health(_Strict):
    status: Literal["ok", "ready"]
