"""Views: the JSON shape of each record, shared by the CLI's --json output and the HTTP
API, so a script sees the same fields whichever way it asks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from conveyor.artifacts import Artifact
from conveyor.events import Event
from conveyor.notifications import artifact_entry
from conveyor.pipelines import Pipeline
from conveyor.queues import QueueStats
from conveyor.requests import Request
from conveyor.store import WorkerInfo
from conveyor.tasks import Task
from conveyor.tokens import Token


def artifact_view(a: Artifact) -> dict[str, Any]:
    return {**artifact_entry(a), "created_at": a.created_at}


def task_view(t: Task, outputs: Sequence[Artifact] = ()) -> dict[str, Any]:
    return {
        "id": t.id,
        "request_id": t.request_id,
        "seq": t.seq,
        "pipeline": t.pipeline,
        "queue": t.queue,
        "status": t.status.value,
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "progress": {
            "current": t.progress.current,
            "total": t.progress.total,
            "message": t.progress.message,
        },
        "params": t.params,
        "result": t.result,
        "error": t.error,
        "worker": t.lease_owner,
        "created_at": t.created_at,
        "started_at": t.started_at,
        "finished_at": t.finished_at,
        "outputs": [artifact_view(a) for a in outputs],
    }


def request_view(
    req: Request, with_tasks: bool = True, outputs: Mapping[int, Sequence[Artifact]] | None = None
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": req.id,
        "pipeline": req.pipeline,
        "status": req.status.value,
        "queue": req.queue,
        "priority": req.priority,
        "params": req.params,
        "submitter": req.submitter,
        "idempotency_key": req.idempotency_key,
        "reused_request_id": req.reused_request_id,
        "created_at": req.created_at,
        "started_at": req.started_at,
        "finished_at": req.finished_at,
        "counts": asdict(req.counts),
    }
    if with_tasks:
        found = outputs or {}
        view["tasks"] = [task_view(t, found.get(t.id, ())) for t in req.tasks]
    return view


def queue_view(q: QueueStats) -> dict[str, Any]:
    return asdict(q)


def worker_view(w: WorkerInfo) -> dict[str, Any]:
    view = asdict(w)
    view["queues"] = list(w.queues)
    return view


def event_view(e: Event) -> dict[str, Any]:
    return asdict(e)


def pipeline_view(p: Pipeline) -> dict[str, Any]:
    """What a submitter needs to know; not the command, handler or environment."""
    return {
        "name": p.name,
        "description": p.description,
        "executor": p.executor,
        "split": p.split,
        "queue": p.queue,
        "priority": p.priority,
        "timeout": p.timeout,
        "max_attempts": p.retry.max_attempts,
        "concurrency": p.concurrency,
        "cache": p.cache,
        "params_schema": None if p.schema is None else dict(p.schema),
    }


def token_view(t: Token) -> dict[str, Any]:
    """A token's record: never the token, nor its hash."""
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role.value,
        "prefix": t.prefix,
        "created_at": t.created_at,
        "last_used_at": t.last_used_at,
        "revoked_at": t.revoked_at,
    }
