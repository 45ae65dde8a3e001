"""The store's one narrow interface: domain verbs over requests, tasks, events, workers
and queues. Dialect differences stay behind it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.artifacts import Artifact
from conveyor.events import Event
from conveyor.notifications import NewNotification, Notification
from conveyor.queues import QueueStats
from conveyor.requests import NewRequest, Request
from conveyor.retention import Pruned
from conveyor.stats import ActivityRow, PipelineTotals, StatusCount
from conveyor.tasks import Outcome, Progress, RetryPolicy, Task
from conveyor.tokens import NewToken, Token


class StoreError(Exception):
    pass


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The change contradicts what is stored (e.g. an idempotency key reused for other
    params, or a retry of a request that is still running)."""


class Unavailable(StoreError):
    """The database cannot be reached."""


class Refused(StoreError, ValueError):
    """The database refused a value it cannot hold: sent again, it is refused again."""


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    status: str = "running"
    running: int = 0
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    stopped_at: float | None = None


@dataclass(frozen=True)
class RequestFilter:
    status: str | None = None
    pipeline: str | None = None
    queue: str | None = None
    submitter: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    before_id: int | None = None  # cursor: only requests older than this id
    text: str | None = None  # appears in the params' JSON (case-insensitive)
    limit: int = 50


@dataclass(frozen=True)
class Submitted:
    request: Request
    created: bool  # False when an idempotency key returned an existing request


@dataclass(frozen=True)
class Claimed:
    tasks: list[Task]


class Listener(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until there may be new work (True) or `timeout` passes (False)."""

    def close(self) -> None: ...


class Store(Protocol):
    url: str
    dialect: str

    def upgrade(self) -> None: ...

    def close(self) -> None: ...

    def ping(self) -> None: ...

    # requests
    def submit(self, new: NewRequest, now: float) -> Submitted: ...

    def submit_many(
        self, batch: Sequence[NewRequest], now: float, with_tasks: bool = False
    ) -> list[Submitted]:
        """Submit several requests in one transaction, answering in their order; with
        `with_tasks` the answers carry their tasks as `submit`'s do."""
        ...

    def get_request(self, request_id: int, with_tasks: bool = True) -> Request | None: ...

    def get_request_artifacts(self, request_id: int) -> tuple[Request, list[Artifact]] | None:
        """A request with its tasks and every artifact of its tasks, read together."""
        ...

    def list_requests(self, flt: RequestFilter) -> list[Request]:
        """Newest first, every field of the filter applied (`text` too)."""
        ...

    def cancel_request(self, request_id: int, now: float) -> Request: ...

    def retry_request(self, request_id: int, extra_attempts: int, now: float) -> Request: ...

    # tasks
    def get_task(self, task_id: int) -> Task | None: ...

    def claim(
        self,
        worker_id: str,
        queues: Sequence[str],
        n: int,
        lease: float,
        now: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[Task]: ...

    def next_available(self, queues: Sequence[str]) -> float | None:
        """The earliest time a queued task of these (unpaused) queues becomes claimable."""

    def heartbeat(
        self,
        worker_id: str,
        lease: float,
        now: float,
        running: int,
        held: Collection[int] | None = None,
    ) -> set[int]:
        """Renew the leases of the worker's running tasks (only those in `held`, the
        tasks it still holds, when given: one it has lost track of then expires and is
        retried); the ids renewed."""
        ...

    def finish(self, worker_id: str, outcomes: Sequence[Outcome], now: float) -> list[int]: ...

    def report_progress(
        self,
        worker_id: str,
        task_id: int,
        progress: Progress,
        now: float,
        attempt: int | None = None,
    ) -> bool:
        """Store an attempt's progress while the task is still on it (`attempt`, if
        given) and leased to this worker; whether it was."""
        ...

    def expire_leases(self, now: float, policies: Mapping[str, RetryPolicy]) -> list[int]: ...

    # queues
    def pause(self, queue: str, now: float) -> None: ...

    def resume(self, queue: str, now: float) -> None: ...

    def paused_queues(self) -> set[str]: ...

    def queue_stats(self) -> list[QueueStats]: ...

    # workers
    def register_worker(self, info: WorkerInfo, now: float) -> None: ...

    def stop_worker(self, worker_id: str, now: float) -> None: ...

    def list_workers(self, alive_since: float | None = None) -> list[WorkerInfo]: ...

    # events
    def events(
        self, after_id: int = 0, request_id: int | None = None, limit: int = 1000
    ) -> list[Event]: ...

    def latest_event_id(self) -> int:
        """The id of the newest event (0 when there is none)."""
        ...

    def listener(self) -> Listener: ...

    # API tokens (only their hashes)
    def create_token(self, new: NewToken, now: float) -> Token:
        """Raises Conflict when an active token has that name."""
        ...

    def token_by_hash(self, token_hash: str) -> Token | None: ...

    def list_tokens(self) -> list[Token]: ...

    def revoke_token(self, name_or_id: str, now: float) -> Token:
        """Revoke the active token of that name, else the token of that id; NotFound."""
        ...

    def touch_token(self, token_id: int, now: float) -> None: ...

    def count_tasks(self, **where: Any) -> int: ...

    # aggregates (the dashboard, the metrics)
    def status_counts(self) -> list[StatusCount]:
        """Requests and tasks by queue, pipeline and status."""
        ...

    def activity(self, since: float, width: float) -> list[ActivityRow]:
        """Tasks that succeeded or failed since `since`, in `width`-second buckets."""
        ...

    def pipeline_totals(self, bounds: Sequence[float]) -> list[PipelineTotals]: ...

    def count_events(self, kind: str) -> int: ...

    def failed_tasks(
        self, limit: int = 50, before_id: int | None = None, text: str | None = None
    ) -> list[Task]:
        """Failed tasks, newest first; `text`: a task or request id, or text in the
        error or the params."""
        ...

    def attempt_logs(self, task_id: int) -> dict[int, str]:
        """The logs of the task's quiet attempts that the database keeps (see
        `Outcome.log`), by attempt."""
        ...

    # artifacts
    def record_artifacts(self, artifacts: Sequence[Artifact]) -> None:
        """Record what attempts kept; an attempt's artifact recorded again replaces it."""
        ...

    def list_artifacts(
        self, task_id: int | None = None, request_id: int | None = None
    ) -> list[Artifact]: ...

    # the notifications outbox
    def enqueue_notifications(
        self,
        cursor: str,
        plan: Callable[[Sequence[Event]], list[NewNotification]],
        now: float,
        limit: int = 500,
        settle: float = 10.0,
    ) -> tuple[int, int]:
        """Follow the events from the named cursor (made at the newest event when new):
        store the notifications `plan` makes of them and move the cursor, together.
        Returns how many were stored and the event id the cursor is at."""
        ...

    def next_notification_at(self) -> float | None:
        """When the next pending notification is due (None: none is pending)."""
        ...

    def claim_notifications(self, n: int, lease: float, now: float) -> list[Notification]: ...

    def settle_notification(
        self,
        notification_id: int,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> None:
        """Sent (no error), due again at `retry_at`, or failed for good."""
        ...

    def list_notifications(
        self, request_id: int | None = None, limit: int = 100
    ) -> list[Notification]: ...

    # retention
    def prune(self, finished_before: float, limit: int = 500) -> Pruned:
        """Delete up to `limit` requests that finished before `finished_before`, oldest
        first, with their tasks, events, artifact records and notifications (one
        transaction); a request whose result a newer one reused stays."""
        ...

    def count_prunable(self, finished_before: float) -> Pruned: ...

    def prune_unattached(self, before: float) -> int:
        """Forget workers silent since `before` and request-less events older than it."""
        ...

    # ingestion
    def record_ingest(
        self, spool: str, counts: Mapping[str, int], now: float, kind: str, data: Any
    ) -> None:
        """Add to a spool's counters and record an `ingest.*` event, together."""
        ...

    def ingest_counters(self) -> dict[str, dict[str, int]]:
        """Every spool's counters: {spool: {name: value}}."""
        ...

    def ingest_rates(self, since: float) -> dict[str, float]:
        """Each spool's files per minute as its latest `ingest.progress` event since
        `since` reported it (among the newest events only: a look stays cheap)."""
        ...
