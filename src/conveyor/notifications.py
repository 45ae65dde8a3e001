"""Completion notifications: what a pipeline asks for, which events call for one, the
JSON sent and its signature. Pure: the notifier (`conveyor.notifier`) does the I/O.

Delivery is at least once: a notification is kept in the database (an outbox filled from
the events table) until its receiver answers 2xx or its attempts run out. Receivers can
drop duplicates by the `X-Conveyor-Delivery` header (the notification's id).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from conveyor.events import Event
from conveyor.tasks import RetryPolicy

Subject = Literal["task", "request"]
SIGNATURE_HEADER = "X-Conveyor-Signature"
_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class NotifySettings:
    """`[pipelines.X.notify]`: a webhook POSTed when its tasks or requests finish."""

    webhook: str
    on: frozenset[str] = frozenset({"task", "request"})
    secret_env: str | None = None  # the environment variable holding the HMAC key
    timeout: float = 10.0  # seconds for one POST (connect, send, answer)
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(retries=8, backoff_base=2.0, backoff_max=600.0)
    )


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # gave up after its attempts


@dataclass(frozen=True)
class NewNotification:
    event_id: int
    subject: Subject
    status: str  # the subject's status: succeeded, failed or cancelled
    pipeline: str
    request_id: int | None
    task_id: int | None
    url: str
    max_attempts: int
    created_at: float


@dataclass(frozen=True)
class Notification:
    id: int
    event_id: int
    subject: Subject
    status: str
    pipeline: str
    request_id: int | None
    task_id: int | None
    url: str
    state: NotificationStatus
    attempts: int
    max_attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


def completion(event: Event) -> tuple[Subject, str] | None:
    """Whether an event finishes a task or a request: (subject, status) or None."""
    kind = event.kind
    if kind == "task.lease_expired":
        # a lost lease with no attempts left fails the task
        then = event.data.get("then") if isinstance(event.data, Mapping) else None
        return ("task", "failed") if then == "fail" else None
    subject, _, status = kind.partition(".")
    if subject in ("task", "request") and status in _TERMINAL:
        return subject, status  # type: ignore[return-value]
    return None


def plan(
    events: Sequence[Event], settings: Mapping[str, NotifySettings], now: float
) -> list[NewNotification]:
    """The notifications these events call for, given each pipeline's settings."""
    out = []
    for ev in events:
        done = completion(ev)
        if done is None or ev.pipeline is None:
            continue
        cfg = settings.get(ev.pipeline)
        if cfg is None or done[0] not in cfg.on:
            continue
        out.append(
            NewNotification(
                event_id=ev.id,
                subject=done[0],
                status=done[1],
                pipeline=ev.pipeline,
                request_id=ev.request_id,
                task_id=ev.task_id,
                url=cfg.webhook,
                max_attempts=cfg.retry.max_attempts,
                created_at=now,
            )
        )
    return out


def body_bytes(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes sent (and signed)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: `sha256=` and the HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """For receivers: whether a signature header matches the body."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


def artifact_entry(a: Any) -> dict[str, Any]:
    """An artifact as notifications and the API show it."""
    return {
        "task_id": a.task_id,
        "attempt": a.attempt,
        "kind": a.kind.value,
        "name": a.name,
        "key": a.key,
        "url": a.url,
        "size": a.size,
        "sha256": a.sha256,
    }


MAX_OUTPUTS = 1000  # most outputs listed in one request's notification


def payload(
    n: Notification,
    now: float,
    times: Mapping[str, Any],
    artifacts: Sequence[Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON POSTed for a notification: ids, pipeline, status, the subject's times,
    and the output keys and URLs (a request's: every task's, up to MAX_OUTPUTS)."""
    outputs = [artifact_entry(a) for a in artifacts if a.kind.value == "output"]
    body: dict[str, Any] = {
        "delivery": n.id,
        "event": f"{n.subject}.{n.status}",
        "event_id": n.event_id,
        "subject": n.subject,
        "status": n.status,
        "pipeline": n.pipeline,
        "request_id": n.request_id,
        "task_id": n.task_id,
        "created_at": times.get("created_at"),
        "started_at": times.get("started_at"),
        "finished_at": times.get("finished_at"),
        "notified_at": now,
        "outputs": outputs[:MAX_OUTPUTS],
        "outputs_truncated": len(outputs) > MAX_OUTPUTS,
    }
    body.update(extra or {})
    return body
