"""Views: the JSON shape of each record, shared by the CLI's --json output and the HTTP
API, so a script sees the same fields whichever way it asks."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from conveyor.events import Event
from conveyor.queues import QueueStats
from conveyor.requests import Request
from conveyor.store import WorkerInfo
from conveyor.tasks import Task


def task_view(t: Task) -> dict[str, Any]:
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
    }


def request_view(req: Request, with_tasks: bool = True) -> dict[str, Any]:
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
        view["tasks"] = [task_view(t) for t in req.tasks]
    return view


def queue_view(q: QueueStats) -> dict[str, Any]:
    return asdict(q)


def worker_view(w: WorkerInfo) -> dict[str, Any]:
    view = asdict(w)
    view["queues"] = list(w.queues)
    return view


def event_view(e: Event) -> dict[str, Any]:
    return asdict(e)
