"""The store on SQLAlchemy: the verbs over requests and tasks that SQLite and PostgreSQL
share. The dialect modules supply the claim, the bulk writes and the wake-ups."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from conveyor.artifacts import Artifact
from conveyor.queues import claimable_queues
from conveyor.requests import (
    NewRequest,
    Request,
    RequestStatus,
    TaskCounts,
    check_request_transition,
    derive_request_status,
)
from conveyor.store import schema as t
from conveyor.store.base import (
    Conflict,
    NotFound,
    Submitted,
)
from conveyor.store.outbox import OutboxVerbs
from conveyor.store.retention import RetentionVerbs
from conveyor.store.rows import (
    OUTCOME_EVENTS,
    EventRow,
    allot,
    dumps,
    event_row,
    in_list,
    request_from_row,
    stored_text,
    task_from_row,
)
from conveyor.store.stats import SQLStats
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


class SQLStore(SQLStats, OutboxVerbs, RetentionVerbs):
    # ----------------------------------------------------------------- requests
    def submit(self, new: NewRequest, now: float) -> Submitted:
        # One request's answer shows its tasks; bulk callers (submit_many) need not.
        return self._submit([new], now, with_tasks=True)[0]

    def submit_many(
        self, batch: Sequence[NewRequest], now: float, with_tasks: bool = False
    ) -> list[Submitted]:
        return self._submit(batch, now, with_tasks=with_tasks)

    def _submit(self, batch: Sequence[NewRequest], now: float, with_tasks: bool) -> list[Submitted]:
        try:
            with self._write() as conn:
                out = self._submit_many(conn, batch, now, with_tasks)
        except sa.exc.IntegrityError:
            # A concurrent submit with the same idempotency key won the race: answer
            # with what it stored.
            with self._write() as conn:
                out = self._submit_many(conn, batch, now, with_tasks)
        if any(s.created for s in out):
            self.wakeup.fire()
        return out

    def _submit_many(
        self, conn: Connection, batch: Sequence[NewRequest], now: float, with_tasks: bool
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
        tasks: dict[int, list[Task]] = defaultdict(list)
        if with_tasks and task_rows:
            for row in conn.execute(
                sa.select(t.tasks)
                .where(t.tasks.c.request_id.in_(ids))
                .order_by(t.tasks.c.request_id, t.tasks.c.seq)
            ):
                tasks[row.request_id].append(task_from_row(row))
        for rid, (i, _, _) in zip(ids, fresh, strict=True):
            results[i] = Submitted(request_from_row(stored[rid], tasks[rid]), created=True)
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

    def get_request_artifacts(self, request_id: int) -> tuple[Request, list[Artifact]] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.requests).where(t.requests.c.id == request_id)).first()
            if row is None:
                return None
            return self._load_request(conn, row), self._artifacts(conn, request_id=request_id)

    def cancel_request(self, request_id: int, now: float) -> Request:
        # A deadlock with a writer that takes the same rows the other way round is
        # rolled back whole: run again.
        def tx() -> Request:
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
                updated = conn.execute(
                    sa.select(t.requests).where(t.requests.c.id == request_id)
                ).one()
                return self._load_request(conn, updated)

        return self._retrying(tx)

    def retry_request(self, request_id: int, extra_attempts: int, now: float) -> Request:
        def tx() -> Request:
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
                    event_row(now, "task.requeued", request_id, r.id, r.pipeline, r.queue)
                    for r in rows
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
                updated = conn.execute(
                    sa.select(t.requests).where(t.requests.c.id == request_id)
                ).one()
                result = self._load_request(conn, updated)
            self.wakeup.fire()
            return result

        return self._retrying(tx)

    def _locked_request(self, conn: Connection, request_id: int) -> Row[Any]:
        q = sa.select(t.requests).where(t.requests.c.id == request_id)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"no request {request_id}")
        return row

    # -------------------------------------------------------------------- tasks
    def get_task(self, task_id: int) -> Task | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.tasks).where(t.tasks.c.id == task_id)).first()
            return None if row is None else task_from_row(row)

    def attempt_logs(self, task_id: int) -> dict[int, str]:
        c = t.attempt_logs.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(c.attempt, c.text).where(c.task_id == task_id).order_by(c.attempt)
            ).all()
            return {r.attempt: r.text for r in rows}

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
                    claimed += self._claim_limited(
                        conn, queue, n - len(claimed), slots, worker_id, expires, now
                    )
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
            tasks, exhausted = self._claim_allotted(
                conn, queue, asked, exclude, slots, worker_id, expires, now
            )
            for task in tasks:
                if task.pipeline in slots:
                    slots[task.pipeline] -= 1
            claimed += tasks
            if exhausted or sorted(p for p, free in slots.items() if free <= 0) == exclude:
                break  # nothing more to offer, or nothing newly full to leave out
        return claimed

    def _claim_allotted(
        self,
        conn: Connection,
        queue: str,
        n: int,
        exclude: list[str],
        slots: Mapping[str, int],
        worker_id: str,
        expires: float,
        now: float,
    ) -> tuple[list[Task], bool]:
        """Claim up to n tasks of the queue within the free slots; also says whether the
        queue ran out of candidates."""
        candidates = self._candidates(conn, queue, n, exclude, now)
        picked = allot(candidates, slots)
        tasks = self._mark_claimed(conn, picked, worker_id, expires, now) if picked else []
        return tasks, len(candidates) < n

    def _claim_prelude(
        self, conn: Connection, limited: list[str]
    ) -> tuple[set[str], dict[str, int]]:
        """The paused queues and, for concurrency-limited pipelines, how many tasks of
        each are running. Dialects whose writers run side by side first take a lock that
        serialises claims of limited pipelines; SQLite's write lock already does."""
        paused = {
            r[0]
            for r in conn.execute(
                sa.text("SELECT name FROM queue_settings WHERE paused = :p"), {"p": True}
            )
        }
        running: dict[str, int] = {}
        if limited:
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
        """Record the claimed tasks' `task.running` events and start their requests
        (`request.running`), for dialects whose claim statement does not."""
        raise NotImplementedError

    def next_available(self, queues: Sequence[str]) -> float | None:
        with self._read() as conn:
            paused = {
                r[0]
                for r in conn.execute(
                    sa.select(t.queue_settings.c.name).where(t.queue_settings.c.paused.is_(True))
                )
            }
            open_queues = claimable_queues(queues, paused)
            if not open_queues:
                return None
            value = conn.execute(
                sa.select(sa.func.min(t.tasks.c.available_at)).where(
                    t.tasks.c.status == TaskStatus.QUEUED.value,
                    t.tasks.c.queue.in_(open_queues),
                )
            ).scalar()
        return None if value is None else float(value)

    # How a dialect locks rows it is about to update, in the order it reads them, so
    # two writers of the same rows queue instead of deadlocking.
    _lock_in_order = ""

    def heartbeat(
        self,
        worker_id: str,
        lease: float,
        now: float,
        running: int,
        held: Collection[int] | None = None,
    ) -> set[int]:
        only, binds = "", {}
        if held is not None:
            only = "AND id IN :held "
            binds["held"] = sorted(held)

        def tx() -> set[int]:
            with self._write() as conn:
                renew = sa.text(
                    "UPDATE tasks SET lease_expires_at = :exp WHERE id IN ("
                    f"SELECT id FROM tasks WHERE lease_owner = :w AND status = 'running' {only}"
                    f"ORDER BY id{self._lock_in_order}) "
                    "AND lease_owner = :w AND status = 'running' RETURNING id"
                )
                if held is not None:
                    renew = renew.bindparams(sa.bindparam("held", expanding=True))
                owned = {
                    r[0] for r in conn.execute(renew, {"exp": now + lease, "w": worker_id, **binds})
                }
                conn.execute(
                    t.workers.update()
                    .where(t.workers.c.id == worker_id)
                    .values(last_heartbeat=now, running=running)
                )
            return owned

        return self._retrying(tx)

    def finish(self, worker_id: str, outcomes: Sequence[Outcome], now: float) -> list[int]:
        if not outcomes:
            return []
        # One outcome per task: a repeated id would be a worker's mistake, and must not
        # be recorded twice.
        outcomes = list({o.task_id: o for o in reversed(outcomes)}.values())  # first wins
        outcomes.sort(key=lambda o: o.task_id)  # rows are then locked in id order
        changes = []
        for o in outcomes:
            target = task_target(o.action)
            data: dict[str, Any] | None = None
            if o.error is not None or o.action == TaskAction.RETRY:
                data = {"error": stored_text(o.error)}
                if o.action == TaskAction.RETRY:
                    data["delay"] = round(o.delay, 3)
            changes.append(
                {
                    "id": o.task_id,
                    "status": target.value,
                    "result": dumps(o.result),
                    "error": stored_text(o.error),
                    "available_at": now + o.delay if target == TaskStatus.QUEUED else None,
                    "finished_at": now if target.terminal else None,
                    "delta": -1 if o.action == TaskAction.RELEASE else 0,
                    "owner": worker_id,
                    "expires": None,
                    "attempt": o.attempt,
                    "kind": OUTCOME_EVENTS[o.action],
                    "data": dumps(data),
                }
            )

        logs = [
            {
                "task_id": o.task_id,
                "attempt": o.attempt,
                "text": stored_text(o.log),
                "now": now if o.logged_at is None else o.logged_at,
            }
            for o in outcomes
            if o.log
        ]

        def tx() -> list[Any]:
            with self._write() as conn:
                rows, counters = self._apply_changes(conn, changes, now)
                if logs:
                    self._keep_logs(conn, logs)
                self._advance_requests(conn, counters, now)
                requeued = {r.queue for r in rows if r.status == TaskStatus.QUEUED.value}
                for q in sorted(requeued):
                    self._notify(conn, f"queue:{q}")
            if requeued:
                self.wakeup.fire()
            return rows

        return [r.id for r in self._retrying(tx)]

    def report_progress(
        self,
        worker_id: str,
        task_id: int,
        progress: Progress,
        now: float,
        attempt: int | None = None,
    ) -> bool:
        with self._write() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "UPDATE tasks SET progress_current = :c, progress_total = :t, "
                        "progress_message = :m WHERE id = :id AND status = 'running' "
                        "AND lease_owner = :w" + ("" if attempt is None else " AND attempts = :a")
                    ),
                    {
                        "c": progress.current,
                        "t": progress.total,
                        "m": stored_text(progress.message),
                        "id": task_id,
                        "w": worker_id,
                        "a": attempt,
                    },
                ).rowcount
            )

    def expire_leases(self, now: float, policies: Mapping[str, RetryPolicy]) -> list[int]:
        def tx() -> list[int]:
            with self._write() as conn:
                lost = conn.execute(
                    sa.text(
                        "SELECT id, attempts, max_attempts, pipeline, lease_owner, "
                        "lease_expires_at FROM tasks WHERE status = 'running' "
                        "AND lease_expires_at < :now "
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
                            "attempt": r.attempts,
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

        return self._retrying(tx)
