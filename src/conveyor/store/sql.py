"""The store on SQLAlchemy: what SQLite and PostgreSQL share. The dialect modules supply
the claim, the bulk writes and the wake-ups."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from conveyor.events import Event
from conveyor.queues import QueueStats, claimable_queues
from conveyor.requests import (
    REQUEST_TRANSITIONS,
    NewRequest,
    Request,
    RequestStatus,
    TaskCounts,
    check_request_transition,
    derive_request_status,
    request_sources,
)
from conveyor.store import schema as t
from conveyor.store.base import (
    Conflict,
    Listener,
    NotFound,
    RequestFilter,
    Submitted,
    Unavailable,
    WorkerInfo,
)
from conveyor.tasks import (
    Outcome,
    Progress,
    RetryPolicy,
    Task,
    TaskAction,
    TaskStatus,
    decide_retry,
    task_sources,
    task_target,
)

TASK_COLUMNS = [c.name for c in t.tasks.columns]
EventRow = dict[str, Any]


def in_list(statuses: frozenset[Any]) -> str:
    """A SQL list of status literals. Only enum values reach it, never request data."""
    return ", ".join(f"'{s.value}'" for s in sorted(statuses))


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def typed_tasks(sql: str) -> sa.TextualSelect:
    """Raw SQL that returns task rows, read with the columns' types (JSON decoded)."""
    return sa.text(sql).columns(*t.tasks.c)


def task_from_row(row: Any) -> Task:
    m = row._mapping if isinstance(row, Row) else row
    return Task(
        id=m["id"],
        request_id=m["request_id"],
        pipeline=m["pipeline"],
        queue=m["queue"],
        priority=m["priority"],
        seq=m["seq"],
        params=m["params"],
        status=TaskStatus(m["status"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        timeout=m["timeout"],
        created_at=m["created_at"],
        available_at=m["available_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        progress=Progress(m["progress_current"], m["progress_total"], m["progress_message"]),
        result=m["result"],
        error=m["error"],
    )


def counts_from(m: Mapping[str, Any]) -> TaskCounts:
    return TaskCounts(
        total=m["tasks_total"],
        succeeded=m["tasks_succeeded"],
        failed=m["tasks_failed"],
        cancelled=m["tasks_cancelled"],
    )


def request_from_row(row: Any, tasks: Sequence[Task] = ()) -> Request:
    m = row._mapping
    return Request(
        id=m["id"],
        pipeline=m["pipeline"],
        params=m["params"],
        queue=m["queue"],
        priority=m["priority"],
        status=RequestStatus(m["status"]),
        counts=counts_from(m),
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        idempotency_key=m["idempotency_key"],
        submitter=m["submitter"],
        reused_request_id=m["reused_request_id"],
        tasks=tuple(tasks),
    )


def event_row(
    ts: float,
    kind: str,
    request_id: int | None = None,
    task_id: int | None = None,
    pipeline: str | None = None,
    queue: str | None = None,
    data: Any = None,
) -> EventRow:
    return {
        "ts": ts,
        "kind": kind,
        "request_id": request_id,
        "task_id": task_id,
        "pipeline": pipeline,
        "queue": queue,
        "data": data,
    }


_T = TypeVar("_T")
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
_COUNTER_OF = {
    TaskStatus.SUCCEEDED.value: 0,
    TaskStatus.FAILED.value: 1,
    TaskStatus.CANCELLED.value: 2,
}
OUTCOME_EVENTS = {
    TaskAction.SUCCEED: "task.succeeded",
    TaskAction.FAIL: "task.failed",
    TaskAction.RETRY: "task.retrying",
    TaskAction.RELEASE: "task.released",
}


class _Retryable(Exception):
    pass


class LocalWakeup:
    """Wakes waiters in this process at once; other processes rely on the dialect's
    notifications or on polling."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def listener(self) -> Listener:
        return _LocalListener(self)


class _LocalListener:
    def __init__(self, wakeup: LocalWakeup) -> None:
        self._w = wakeup
        self._seen = wakeup._generation

    def wait(self, timeout: float) -> bool:
        w = self._w
        with w._cond:
            if w._generation == self._seen:
                w._cond.wait(timeout)
            fired = w._generation != self._seen
            self._seen = w._generation
            return fired

    def close(self) -> None:
        pass


class SQLStore:
    dialect = "sql"
    # True where the dialect's claim statements record their own events
    claim_records_events = False

    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self.wakeup = LocalWakeup()

    # ----------------------------------------------------------------- plumbing
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
                raise _Retryable(str(exc.orig)) from exc
            raise Unavailable(_describe(exc)) from exc

    def _retrying(self, tx: Callable[[], _T]) -> _T:
        """Run a transaction again when the database aborted it for a deadlock or a
        serialisation conflict: it was rolled back whole, so running it again is safe."""
        for attempt in range(10):
            try:
                return tx()
            except _Retryable:
                time.sleep(0.005 * (attempt + 1) * random.random())
        return tx()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(conveyor_readonly=True) as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise Unavailable(_describe(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))

    def upgrade(self) -> None:
        from conveyor.store.migrate import upgrade

        try:
            upgrade(self.engine)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise Unavailable(_describe(exc)) from exc

    # dialect hooks ------------------------------------------------------------
    def _insert_tasks(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute(t.tasks.insert(), rows)

    def _insert_events(self, conn: Connection, rows: list[EventRow]) -> None:
        if rows:
            conn.execute(t.events.insert(), rows)

    def _notify(self, conn: Connection, topic: str) -> None:
        """Tell waiting workers (in other processes too) once `conn` commits."""

    def _lock_for_limits(self, conn: Connection) -> None:
        """Serialise claims of concurrency-limited pipelines."""

    def _claim_tasks(
        self,
        conn: Connection,
        queue: str,
        n: int,
        exclude: list[str],
        worker_id: str,
        expires: float,
        now: float,
    ) -> list[Task]:
        """Claim up to n queued tasks of `queue` (not of the `exclude`d pipelines), in
        claim order."""
        raise NotImplementedError

    def _candidates(
        self, conn: Connection, queue: str, n: int, exclude: list[str], now: float
    ) -> list[tuple[int, str]]:
        """(id, pipeline) of up to n claimable tasks, in claim order, locked for us."""
        raise NotImplementedError

    def _mark_claimed(
        self, conn: Connection, ids: list[int], worker_id: str, expires: float, now: float
    ) -> list[Task]:
        raise NotImplementedError

    def _update_running(self, conn: Connection, changes: list[dict[str, Any]]) -> list[Row[Any]]:
        """Apply changes to running tasks, each guarded by status 'running', its lease
        owner and, for lease expiry, the expiry that was seen. Returns the rows changed
        (id, request_id, pipeline, queue, attempts, status)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- requests
    def submit(self, new: NewRequest, now: float) -> Submitted:
        return self.submit_many([new], now)[0]

    def submit_many(self, batch: Sequence[NewRequest], now: float) -> list[Submitted]:
        try:
            with self._write() as conn:
                out = self._submit_many(conn, batch, now)
        except sa.exc.IntegrityError:
            # A concurrent submit with the same idempotency key won the race: answer
            # with what it stored.
            with self._write() as conn:
                out = self._submit_many(conn, batch, now)
        if any(s.created for s in out):
            self.wakeup.fire()
        return out

    def _submit_many(
        self, conn: Connection, batch: Sequence[NewRequest], now: float
    ) -> list[Submitted]:
        results: list[Submitted | None] = [None] * len(batch)
        fresh: list[tuple[int, NewRequest, int | None]] = []
        for i, new in enumerate(batch):
            if new.idempotency_key is not None:
                row = conn.execute(
                    sa.select(t.requests).where(t.requests.c.idempotency_key == new.idempotency_key)
                ).first()
                if row is not None:
                    if row.pipeline != new.pipeline or row.params_hash != new.params_hash:
                        raise Conflict(
                            f"idempotency key {new.idempotency_key!r} was already used for "
                            f"request {row.id} with other params"
                        )
                    results[i] = Submitted(self._load_request(conn, row), created=False)
                    continue
            reused = None
            if new.cache_ttl is not None and new.cache.read:
                reused = conn.execute(
                    sa.select(t.requests.c.id)
                    .where(
                        t.requests.c.pipeline == new.pipeline,
                        t.requests.c.params_hash == new.params_hash,
                        t.requests.c.finished_at >= now - new.cache_ttl,
                        t.requests.c.status == RequestStatus.SUCCEEDED.value,
                        t.requests.c.cacheable.is_(True),
                        t.requests.c.reused_request_id.is_(None),
                    )
                    .order_by(t.requests.c.finished_at.desc())
                    .limit(1)
                ).scalar()
            fresh.append((i, new, reused))
        if not fresh:
            return [r for r in results if r is not None]

        req_rows = []
        for _, new, reused in fresh:
            req_rows.append(
                {
                    "pipeline": new.pipeline,
                    "params": new.params,
                    "params_hash": new.params_hash,
                    "queue": new.queue,
                    "priority": new.priority,
                    "status": (
                        RequestStatus.SUCCEEDED if reused else RequestStatus.REQUESTED
                    ).value,
                    "idempotency_key": new.idempotency_key,
                    "submitter": new.submitter,
                    "cacheable": new.cache.write,
                    "reused_request_id": reused,
                    "tasks_total": 0 if reused else len(new.task_params),
                    "created_at": now,
                    "started_at": now if reused else None,
                    "finished_at": now if reused else None,
                }
            )
        ids = list(
            conn.execute(
                t.requests.insert().returning(t.requests.c.id, sort_by_parameter_order=True),
                req_rows,
            ).scalars()
        )
        task_rows: list[dict[str, Any]] = []
        events: list[EventRow] = []
        queues: set[str] = set()
        for rid, (_, new, reused) in zip(ids, fresh, strict=True):
            if reused:
                events.append(
                    event_row(
                        now,
                        "request.submitted",
                        rid,
                        None,
                        new.pipeline,
                        new.queue,
                        {"tasks": 0, "submitter": new.submitter},
                    )
                )
                events.append(
                    event_row(
                        now,
                        "request.succeeded",
                        rid,
                        None,
                        new.pipeline,
                        new.queue,
                        {"reused_request_id": reused},
                    )
                )
                continue
            queues.add(new.queue)
            for seq, params in enumerate(new.task_params):
                task_rows.append(
                    {
                        "request_id": rid,
                        "seq": seq,
                        "pipeline": new.pipeline,
                        "queue": new.queue,
                        "priority": new.priority,
                        "params": params,
                        "status": TaskStatus.QUEUED.value,
                        "attempts": 0,
                        "max_attempts": new.max_attempts,
                        "timeout": new.timeout,
                        "available_at": now,
                        "created_at": now,
                        "progress_current": 0.0,
                    }
                )
            events.append(
                event_row(
                    now,
                    "request.submitted",
                    rid,
                    None,
                    new.pipeline,
                    new.queue,
                    {"tasks": len(new.task_params), "submitter": new.submitter},
                )
            )
        if task_rows:
            self._insert_tasks(conn, task_rows)
        self._insert_events(conn, events)
        for q in sorted(queues):
            self._notify(conn, f"queue:{q}")
        stored = {
            row.id: row
            for row in conn.execute(sa.select(t.requests).where(t.requests.c.id.in_(ids)))
        }
        for rid, (i, _, _) in zip(ids, fresh, strict=True):
            results[i] = Submitted(request_from_row(stored[rid]), created=True)
        return [r for r in results if r is not None]

    def _load_request(self, conn: Connection, row: Row[Any], with_tasks: bool = True) -> Request:
        tasks: list[Task] = []
        if with_tasks:
            tasks = [
                task_from_row(r)
                for r in conn.execute(
                    sa.select(t.tasks).where(t.tasks.c.request_id == row.id).order_by(t.tasks.c.seq)
                )
            ]
        return request_from_row(row, tasks)

    def get_request(self, request_id: int, with_tasks: bool = True) -> Request | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.requests).where(t.requests.c.id == request_id)).first()
            return None if row is None else self._load_request(conn, row, with_tasks)

    def list_requests(self, flt: RequestFilter) -> list[Request]:
        r = t.requests.c
        q = sa.select(t.requests).order_by(r.id.desc()).limit(max(1, min(flt.limit, 1000)))
        if flt.status:
            q = q.where(r.status == flt.status)
        if flt.pipeline:
            q = q.where(r.pipeline == flt.pipeline)
        if flt.queue:
            q = q.where(r.queue == flt.queue)
        if flt.submitter:
            q = q.where(r.submitter == flt.submitter)
        if flt.created_after is not None:
            q = q.where(r.created_at >= flt.created_after)
        if flt.created_before is not None:
            q = q.where(r.created_at < flt.created_before)
        if flt.before_id is not None:
            q = q.where(r.id < flt.before_id)
        with self._read() as conn:
            return [request_from_row(row) for row in conn.execute(q)]

    def cancel_request(self, request_id: int, now: float) -> Request:
        with self._write() as conn:
            self._locked_request(conn, request_id)
            sources = task_sources(TaskAction.CANCEL)
            rows = conn.execute(
                sa.text(
                    f"UPDATE tasks SET status = :target, finished_at = :now, "
                    f"lease_expires_at = NULL, error = 'cancelled' "
                    f"WHERE request_id = :rid AND status IN ({in_list(sources)}) "
                    f"RETURNING id, request_id, pipeline, queue, attempts, status"
                ),
                {"target": task_target(TaskAction.CANCEL).value, "now": now, "rid": request_id},
            ).all()
            events = [
                event_row(now, "task.cancelled", r.request_id, r.id, r.pipeline, r.queue)
                for r in rows
            ]
            self._insert_events(conn, events)
            self._settle_requests(conn, rows, now)
            if rows:
                self._notify(conn, "cancel")
            updated = conn.execute(sa.select(t.requests).where(t.requests.c.id == request_id)).one()
            return self._load_request(conn, updated)

    def retry_request(self, request_id: int, extra_attempts: int, now: float) -> Request:
        with self._write() as conn:
            req = self._locked_request(conn, request_id)
            status = RequestStatus(req.status)
            if status not in (RequestStatus.FAILED, RequestStatus.CANCELLED):
                raise Conflict(
                    f"request {request_id} is {status.value}: only a failed or cancelled "
                    "request can be retried"
                )
            sources = task_sources(TaskAction.REQUEUE)
            rows = conn.execute(
                sa.text(
                    f"UPDATE tasks SET status = :target, available_at = :now, "
                    f"finished_at = NULL, error = NULL, result = NULL, "
                    f"max_attempts = attempts + :extra "
                    f"WHERE request_id = :rid AND status IN ({in_list(sources)}) "
                    f"RETURNING id, pipeline, queue, status"
                ),
                {
                    "target": task_target(TaskAction.REQUEUE).value,
                    "now": now,
                    "rid": request_id,
                    "extra": max(1, extra_attempts),
                },
            ).all()
            counts = TaskCounts(total=req.tasks_total, succeeded=req.tasks_succeeded)
            new_status = derive_request_status(counts, started=req.started_at is not None)
            check_request_transition(status, new_status)
            conn.execute(
                t.requests.update()
                .where(t.requests.c.id == request_id)
                .values(
                    status=new_status.value,
                    tasks_failed=0,
                    tasks_cancelled=0,
                    finished_at=None,
                )
            )
            events = [
                event_row(now, "task.requeued", request_id, r.id, r.pipeline, r.queue) for r in rows
            ]
            events.append(
                event_row(
                    now,
                    f"request.{new_status.value}",
                    request_id,
                    None,
                    req.pipeline,
                    req.queue,
                    {"retried_tasks": len(rows)},
                )
            )
            self._insert_events(conn, events)
            self._notify(conn, f"queue:{req.queue}")
            updated = conn.execute(sa.select(t.requests).where(t.requests.c.id == request_id)).one()
            result = self._load_request(conn, updated)
        self.wakeup.fire()
        return result

    def _locked_request(self, conn: Connection, request_id: int) -> Row[Any]:
        q = sa.select(t.requests).where(t.requests.c.id == request_id)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"no request {request_id}")
        return row

    def _apply_changes(
        self, conn: Connection, changes: list[dict[str, Any]], now: float
    ) -> tuple[list[Any], list[Any]]:
        """Apply guarded changes to running tasks, record an event for each one applied,
        and count the finished ones in their requests. Returns the changed task rows and
        the requests' rows with their new counters."""
        rows = self._update_running(conn, changes)
        by_id = {c["id"]: c for c in changes}
        self._insert_events(
            conn,
            [
                event_row(
                    now,
                    by_id[r.id]["kind"],
                    r.request_id,
                    r.id,
                    r.pipeline,
                    r.queue,
                    json.loads(by_id[r.id]["data"]) if by_id[r.id]["data"] else None,
                )
                for r in rows
            ],
        )
        return rows, self._bump_counters(conn, rows)

    def _bump_counters(self, conn: Connection, rows: Sequence[Any]) -> list[Any]:
        delta: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for r in rows:
            col = _COUNTER_OF.get(r.status)
            if col is not None:
                delta[r.request_id][col] += 1
        if not delta:
            return []
        ids = sorted(delta)
        conn.execute(
            sa.text(
                "UPDATE requests SET tasks_succeeded = tasks_succeeded + :s, "
                "tasks_failed = tasks_failed + :f, tasks_cancelled = tasks_cancelled + :c "
                "WHERE id = :id"
            ),
            [{"id": i, "s": delta[i][0], "f": delta[i][1], "c": delta[i][2]} for i in ids],
        )
        return list(
            conn.execute(
                sa.select(t.requests).where(t.requests.c.id.in_(ids)).order_by(t.requests.c.id)
            ).all()
        )

    def _advance_requests(self, conn: Connection, counters: Sequence[Any], now: float) -> None:
        """Move each request to the status its task counters now give it."""
        events: list[EventRow] = []
        for row in counters:
            m: Mapping[str, Any] = row._mapping if isinstance(row, Row) else row  # type: ignore[assignment]
            old = RequestStatus(m["status"])
            new = derive_request_status(counts_from(m), m["started_at"] is not None)
            if new == old or new not in REQUEST_TRANSITIONS[old]:
                continue
            changed = conn.execute(
                sa.text(
                    f"UPDATE requests SET status = :new, finished_at = :fin "
                    f"WHERE id = :id AND status IN ({in_list(request_sources(new))})"
                ),
                {"new": new.value, "fin": now if new.terminal else None, "id": m["id"]},
            ).rowcount
            if changed:
                events.append(
                    event_row(now, f"request.{new.value}", m["id"], None, m["pipeline"], m["queue"])
                )
        self._insert_events(conn, events)

    def _settle_requests(self, conn: Connection, rows: Sequence[Any], now: float) -> None:
        self._advance_requests(conn, self._bump_counters(conn, rows), now)

    # -------------------------------------------------------------------- tasks
    def get_task(self, task_id: int) -> Task | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.tasks).where(t.tasks.c.id == task_id)).first()
            return None if row is None else task_from_row(row)

    def count_tasks(self, **where: Any) -> int:
        q = sa.select(sa.func.count()).select_from(t.tasks)
        for k, v in where.items():
            q = q.where(t.tasks.c[k] == v)
        with self._read() as conn:
            return int(conn.execute(q).scalar() or 0)

    def claim(
        self,
        worker_id: str,
        queues: Sequence[str],
        n: int,
        lease: float,
        now: float,
        limits: Mapping[str, int] | None = None,
    ) -> list[Task]:
        if n <= 0 or not queues:
            return []
        expires = now + lease

        def tx() -> list[Task]:
            with self._write() as conn:
                paused, running = self._claim_prelude(conn, list(limits or ()))
                open_queues = claimable_queues(queues, paused)
                if not open_queues:
                    return []
                slots = {p: max(0, lim - running.get(p, 0)) for p, lim in (limits or {}).items()}
                claimed: list[Task] = []
                for queue in open_queues:
                    if len(claimed) >= n:
                        break
                    if not slots:
                        claimed += self._claim_tasks(
                            conn, queue, n - len(claimed), [], worker_id, expires, now
                        )
                        continue
                    claimed += self._claim_limited(conn, queue, n - len(claimed), slots,
                                                   worker_id, expires, now)
                if claimed and not self.claim_records_events:
                    self._after_claim(conn, claimed, worker_id, now)
                return claimed

        return self._retrying(tx)

    def _claim_limited(
        self,
        conn: Connection,
        queue: str,
        want: int,
        slots: dict[str, int],
        worker_id: str,
        expires: float,
        now: float,
    ) -> list[Task]:
        """Claim from a queue while concurrency limits apply; `slots` (free slots of the
        limited pipelines) is used up as tasks are claimed. A pipeline that fills up is
        left out and the query asked again, so its backlog cannot crowd out the rest."""
        claimed: list[Task] = []
        while want > len(claimed):
            exclude = sorted(p for p, free in slots.items() if free <= 0)
            asked = want - len(claimed)
            candidates = self._candidates(conn, queue, asked, exclude, now)
            if not candidates:
                break
            picked = allot(candidates, slots)
            if picked:
                tasks = self._mark_claimed(conn, picked, worker_id, expires, now)
                for task in tasks:
                    if task.pipeline in slots:
                        slots[task.pipeline] -= 1
                claimed += tasks
            if len(candidates) < asked:
                break  # the queue has nothing more to offer
        return claimed

    def _claim_prelude(
        self, conn: Connection, limited: list[str]
    ) -> tuple[set[str], dict[str, int]]:
        """The paused queues and, for concurrency-limited pipelines (after taking the
        lock that serialises their claims), how many tasks of each are running."""
        paused = {
            r[0]
            for r in conn.execute(
                sa.text("SELECT name FROM queue_settings WHERE paused = :p"), {"p": True}
            )
        }
        running: dict[str, int] = {}
        if limited:
            self._lock_for_limits(conn)
            running = {
                p: int(c)
                for p, c in conn.execute(
                    sa.select(t.tasks.c.pipeline, sa.func.count())
                    .where(
                        t.tasks.c.status == TaskStatus.RUNNING.value,
                        t.tasks.c.pipeline.in_(limited),
                    )
                    .group_by(t.tasks.c.pipeline)
                )
            }
        return paused, running

    def _after_claim(
        self, conn: Connection, claimed: list[Task], worker_id: str, now: float
    ) -> None:
        events = [
            event_row(
                now,
                "task.running",
                c.request_id,
                c.id,
                c.pipeline,
                c.queue,
                {"attempt": c.attempts, "worker": worker_id},
            )
            for c in claimed
        ]
        rids = sorted({c.request_id for c in claimed})
        started = conn.execute(
            sa.text(
                f"UPDATE requests SET status = :running, started_at = :now "
                f"WHERE id IN :ids AND status = '{RequestStatus.REQUESTED.value}' "
                f"RETURNING id, pipeline, queue"
            ).bindparams(sa.bindparam("ids", expanding=True)),
            {"running": RequestStatus.RUNNING.value, "now": now, "ids": rids},
        ).all()
        events += [
            event_row(now, "request.running", r.id, None, r.pipeline, r.queue) for r in started
        ]
        self._insert_events(conn, events)

    def heartbeat(self, worker_id: str, lease: float, now: float, running: int) -> set[int]:
        with self._write() as conn:
            owned = {
                r[0]
                for r in conn.execute(
                    sa.text(
                        "UPDATE tasks SET lease_expires_at = :exp "
                        "WHERE lease_owner = :w AND status = 'running' RETURNING id"
                    ),
                    {"exp": now + lease, "w": worker_id},
                )
            }
            conn.execute(
                t.workers.update()
                .where(t.workers.c.id == worker_id)
                .values(last_heartbeat=now, running=running)
            )
        return owned

    def finish(self, worker_id: str, outcomes: Sequence[Outcome], now: float) -> list[int]:
        if not outcomes:
            return []
        # One outcome per task: a repeated id would be a worker's mistake, and must not
        # be recorded twice.
        outcomes = list({o.task_id: o for o in reversed(outcomes)}.values())  # first wins
        changes = []
        for o in outcomes:
            target = task_target(o.action)
            data: dict[str, Any] | None = None
            if o.error is not None or o.action == TaskAction.RETRY:
                data = {"error": o.error}
                if o.action == TaskAction.RETRY:
                    data["delay"] = round(o.delay, 3)
            changes.append(
                {
                    "id": o.task_id,
                    "status": target.value,
                    "result": dumps(o.result),
                    "error": o.error,
                    "available_at": now + o.delay if target == TaskStatus.QUEUED else None,
                    "finished_at": now if target.terminal else None,
                    "delta": -1 if o.action == TaskAction.RELEASE else 0,
                    "owner": worker_id,
                    "expires": None,
                    "kind": OUTCOME_EVENTS[o.action],
                    "data": dumps(data),
                }
            )

        def tx() -> list[Any]:
            with self._write() as conn:
                rows, counters = self._apply_changes(conn, changes, now)
                self._advance_requests(conn, counters, now)
                requeued = {r.queue for r in rows if r.status == TaskStatus.QUEUED.value}
                for q in sorted(requeued):
                    self._notify(conn, f"queue:{q}")
            if requeued:
                self.wakeup.fire()
            return rows

        return [r.id for r in self._retrying(tx)]

    def report_progress(self, worker_id: str, task_id: int, progress: Progress, now: float) -> bool:
        with self._write() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "UPDATE tasks SET progress_current = :c, progress_total = :t, "
                        "progress_message = :m WHERE id = :id AND status = 'running' "
                        "AND lease_owner = :w"
                    ),
                    {
                        "c": progress.current,
                        "t": progress.total,
                        "m": progress.message,
                        "id": task_id,
                        "w": worker_id,
                    },
                ).rowcount
            )

    def expire_leases(self, now: float, policies: Mapping[str, RetryPolicy]) -> list[int]:
        with self._write() as conn:
            lost = conn.execute(
                sa.text(
                    "SELECT id, attempts, max_attempts, pipeline, lease_owner, lease_expires_at "
                    "FROM tasks WHERE status = 'running' AND lease_expires_at < :now "
                    "ORDER BY id LIMIT 1000"
                ),
                {"now": now},
            ).all()
            if not lost:
                return []
            changes = []
            for r in lost:
                decision = decide_retry(
                    r.attempts, r.max_attempts, policies.get(r.pipeline, RetryPolicy())
                )
                target = task_target(decision.action)
                changes.append(
                    {
                        "id": r.id,
                        "status": target.value,
                        "result": None,
                        "error": f"lease expired: worker {r.lease_owner} stopped answering",
                        "available_at": now + decision.delay if not target.terminal else None,
                        "finished_at": now if target.terminal else None,
                        "delta": 0,
                        "owner": r.lease_owner,
                        "expires": r.lease_expires_at,
                        "kind": "task.lease_expired",
                        "data": dumps(
                            {
                                "attempt": r.attempts,
                                "then": decision.action.value,
                                "delay": round(decision.delay, 3),
                                "worker": r.lease_owner,
                            }
                        ),
                    }
                )
            rows, counters = self._apply_changes(conn, changes, now)
            self._advance_requests(conn, counters, now)
            for q in sorted({r.queue for r in rows}):
                self._notify(conn, f"queue:{q}")
        self.wakeup.fire()
        return [r.id for r in rows]

    # ------------------------------------------------------------------- queues
    def _set_paused(self, queue: str, paused: bool, now: float) -> None:
        with self._write() as conn:
            updated = conn.execute(
                t.queue_settings.update()
                .where(t.queue_settings.c.name == queue)
                .values(paused=paused, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    t.queue_settings.insert().values(name=queue, paused=paused, updated_at=now)
                )
            kind = "queue.paused" if paused else "queue.resumed"
            self._insert_events(conn, [event_row(now, kind, queue=queue)])
            if not paused:
                self._notify(conn, f"queue:{queue}")
        self.wakeup.fire()

    def pause(self, queue: str, now: float) -> None:
        self._set_paused(queue, True, now)

    def resume(self, queue: str, now: float) -> None:
        self._set_paused(queue, False, now)

    def paused_queues(self) -> set[str]:
        with self._read() as conn:
            return {
                r[0]
                for r in conn.execute(
                    sa.select(t.queue_settings.c.name).where(t.queue_settings.c.paused.is_(True))
                )
            }

    def queue_stats(self) -> list[QueueStats]:
        with self._read() as conn:
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            for queue, status, n in conn.execute(
                sa.select(t.tasks.c.queue, t.tasks.c.status, sa.func.count()).group_by(
                    t.tasks.c.queue, t.tasks.c.status
                )
            ):
                counts[queue][status] = n
            paused = {r.name: r.paused for r in conn.execute(sa.select(t.queue_settings))}
        names = sorted(set(counts) | {q for q in paused if q != "*"})
        return [
            QueueStats(
                name=q,
                paused=bool(paused.get(q)) or bool(paused.get("*")),
                queued=counts[q].get("queued", 0),
                running=counts[q].get("running", 0),
                succeeded=counts[q].get("succeeded", 0),
                failed=counts[q].get("failed", 0),
                cancelled=counts[q].get("cancelled", 0),
            )
            for q in names
        ]

    # ------------------------------------------------------------------ workers
    def register_worker(self, info: WorkerInfo, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                t.workers.insert().values(
                    id=info.id,
                    host=info.host,
                    pid=info.pid,
                    queues=list(info.queues),
                    concurrency=info.concurrency,
                    status="running",
                    running=0,
                    started_at=now,
                    last_heartbeat=now,
                )
            )
            self._insert_events(
                conn,
                [
                    event_row(
                        now,
                        "worker.started",
                        data={"worker": info.id, "host": info.host, "pid": info.pid},
                    )
                ],
            )

    def stop_worker(self, worker_id: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                t.workers.update()
                .where(t.workers.c.id == worker_id)
                .values(status="stopped", stopped_at=now, running=0)
            )
            self._insert_events(
                conn, [event_row(now, "worker.stopped", data={"worker": worker_id})]
            )

    def list_workers(self, alive_since: float | None = None) -> list[WorkerInfo]:
        q = sa.select(t.workers).order_by(t.workers.c.started_at.desc())
        if alive_since is not None:
            q = q.where(t.workers.c.status == "running", t.workers.c.last_heartbeat >= alive_since)
        with self._read() as conn:
            return [
                WorkerInfo(
                    id=r.id,
                    host=r.host,
                    pid=r.pid,
                    queues=tuple(r.queues),
                    concurrency=r.concurrency,
                    status=r.status,
                    running=r.running,
                    started_at=r.started_at,
                    last_heartbeat=r.last_heartbeat,
                    stopped_at=r.stopped_at,
                )
                for r in conn.execute(q)
            ]

    # ------------------------------------------------------------------- events
    def events(
        self, after_id: int = 0, request_id: int | None = None, limit: int = 1000
    ) -> list[Event]:
        q = sa.select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id).limit(limit)
        if request_id is not None:
            q = q.where(t.events.c.request_id == request_id)
        with self._read() as conn:
            return [
                Event(
                    id=r.id,
                    ts=r.ts,
                    kind=r.kind,
                    request_id=r.request_id,
                    task_id=r.task_id,
                    pipeline=r.pipeline,
                    queue=r.queue,
                    data=r.data,
                )
                for r in conn.execute(q)
            ]

    def listener(self) -> Listener:
        return self.wakeup.listener()


def allot(candidates: Sequence[tuple[int, str]], slots: Mapping[str, int]) -> list[int]:
    """Of the candidate (task id, pipeline) pairs, in claim order, those that fit in the
    free slots of concurrency-limited pipelines; unlimited pipelines always fit."""
    left = dict(slots)
    picked = []
    for task_id, pipeline in candidates:
        if pipeline in left:
            if left[pipeline] <= 0:
                continue
            left[pipeline] -= 1
        picked.append(task_id)
    return picked


def _describe(exc: Exception) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
