"""Helpers shared by the store contract suites (test_store_contract*.py).

Every store call gets an explicit `now`: time starts at T0 and the tests move it by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conveyor.events import Event
from conveyor.requests import CachePolicy, NewRequest, split_params
from conveyor.store import Store
from conveyor.tasks import Outcome, Task, TaskAction

T0 = 1_700_000_000.0
LEASE = 30.0


def new_request(
    pipeline: str = "p",
    items: Sequence[Any] = ("a",),
    *,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int = 1,
    timeout: float | None = None,
    idempotency_key: str | None = None,
    submitter: str | None = None,
    cache: CachePolicy | None = None,
    cache_ttl: float | None = None,
    extra: dict[str, Any] | None = None,
) -> NewRequest:
    """A request whose params `{"items": [...], **extra}` split into one task per item."""
    params = {"items": list(items), **(extra or {})}
    return NewRequest(
        pipeline=pipeline,
        params=params,
        task_params=split_params(params, "items"),
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        timeout=timeout,
        idempotency_key=idempotency_key,
        submitter=submitter,
        cache=cache or CachePolicy(),
        cache_ttl=cache_ttl,
    )


def submit(store: Store, now: float = T0, **kw: Any) -> int:
    """Submit a fresh request; its id."""
    done = store.submit(new_request(**kw), now)
    assert done.created
    return done.request.id


def claim(
    store: Store,
    worker: str = "w1",
    queues: Sequence[str] = ("default",),
    n: int = 10,
    now: float = T0,
    lease: float = LEASE,
    limits: dict[str, int] | None = None,
) -> list[Task]:
    """The tasks claimed, by id (the contract does not fix the order of a batch)."""
    got = store.claim(worker, list(queues), n, lease, now, limits=limits)
    return sorted(got, key=lambda t: t.id)


def succeed(store: Store, worker: str, tasks: Sequence[Task], now: float) -> list[int]:
    return store.finish(worker, [Outcome(t.id, TaskAction.SUCCEED) for t in tasks], now)


def run_to_success(store: Store, request_id: int, now: float, worker: str = "runner") -> None:
    """Claim and succeed every task of the request; other tasks claimed on the way are
    released (their attempt not counted)."""
    req = store.get_request(request_id)
    assert req is not None
    tasks = store.claim(worker, [req.queue], 1000, LEASE, now)
    mine = [t for t in tasks if t.request_id == request_id]
    others = [t for t in tasks if t.request_id != request_id]
    assert len(mine) == req.counts.total
    assert sorted(succeed(store, worker, mine, now)) == sorted(t.id for t in mine)
    store.finish(worker, [Outcome(t.id, TaskAction.RELEASE) for t in others], now)
    done = store.get_request(request_id)
    assert done is not None and done.status == "succeeded"


def kinds(events: Sequence[Event]) -> list[str]:
    return [e.kind for e in events]


def task_events(store: Store, task_id: int, kind: str | None = None) -> list[Event]:
    return [
        e
        for e in store.events(limit=100_000)
        if e.task_id == task_id and (kind is None or e.kind == kind)
    ]
