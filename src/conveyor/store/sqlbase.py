"""The store's foundation on SQLAlchemy: transactions, the hooks each dialect fills in,
the bookkeeping every task change shares (events, request counters and statuses), and the
verbs over queues, workers and events."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from conveyor.events import Event
from conveyor.queues import QueueStats
from conveyor.requests import (
    REQUEST_TRANSITIONS,
    Request,
    RequestStatus,
    derive_request_status,
    request_sources,
)
from conveyor.store import schema as t
from conveyor.store import tokens as token_sql
from conveyor.store.base import (
    Listener,
    Refused,
    RequestFilter,
    Unavailable,
    WorkerInfo,
)
from conveyor.store.rows import (
    EventRow,
    LocalWakeup,
    counts_from,
    describe_error,
    event_from_row,
    event_row,
    in_list,
    request_from_row,
)
from conveyor.tasks import (
    Task,
    TaskStatus,
)
from conveyor.tokens import NewToken, Token

_T = TypeVar("_T")
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
_READ_ONLY = "25006"  # read_only_sql_transaction
_COUNTER_OF = {
    TaskStatus.SUCCEEDED.value: 0,
    TaskStatus.FAILED.value: 1,
    TaskStatus.CANCELLED.value: 2,
}


def counter_deltas(rows: Sequence[Any]) -> list[tuple[int, int, int, int]]:
    """(request id, succeeded, failed, cancelled) to add, by request id, for task rows
    that just reached those statuses."""
    delta: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        col = _COUNTER_OF.get(r.status)
        if col is not None:
            delta[r.request_id][col] += 1
    return [(i, d[0], d[1], d[2]) for i, d in sorted(delta.items())]


# A quiet attempt's log, kept with its outcome whether or not the outcome still applies
# (the attempt ran all the same), as long as its task is there. The attempt's number,
# when the outcome names none, is the one the task is on. A log kept already for the
# same attempt (one that was handed back, then ran again under its number) is added to,
# unless it is the same log, taken at the same time (its outcome written again).
KEEP_LOG = (
    "INSERT INTO attempt_logs (task_id, attempt, text, created_at) "
    "SELECT id, COALESCE(:attempt, attempts), :text, :now FROM tasks WHERE id = :task_id "
    "ON CONFLICT (task_id, attempt) DO UPDATE SET text = attempt_logs.text || excluded.text, "
    "created_at = excluded.created_at WHERE attempt_logs.created_at <> excluded.created_at"
)


class _Retryable(Unavailable):
    """The database aborted the transaction for a deadlock or a serialisation conflict;
    it was rolled back whole. Verbs run through `_retrying` run it again; elsewhere it
    is a transient unavailability the caller already handles."""


class SQLBase:
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
            raise Unavailable(describe_error(exc)) from exc
        except sa.exc.DataError as exc:
            raise Refused(describe_error(exc)) from exc
        except sa.exc.InternalError as exc:
            if getattr(exc.orig, "sqlstate", None) == _READ_ONLY:  # a standby, after failover
                self.engine.dispose()  # new connections, to wherever the primary is now
                raise Unavailable(describe_error(exc)) from exc
            raise

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
            raise Unavailable(describe_error(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))

    def upgrade(self) -> None:
        from conveyor.store.migrate import upgrade

        try:
            with self._migrating() as engine:
                upgrade(engine)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise Unavailable(describe_error(exc)) from exc

    @contextmanager
    def _migrating(self) -> Iterator[sa.Engine]:
        """The engine migrations run on: the store's own, unless a dialect needs other
        connection settings for them."""
        yield self.engine

    # dialect hooks ------------------------------------------------------------
    def _insert_tasks(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute(t.tasks.insert(), rows)

    def _insert_events(self, conn: Connection, rows: list[EventRow]) -> None:
        if rows:
            conn.execute(t.events.insert(), rows)

    def _notify(self, conn: Connection, topic: str) -> None:
        """Tell waiting workers (in other processes too) once `conn` commits."""

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
        owner, the attempt it is about (unless None) and, for lease expiry, the expiry
        that was seen. Returns the rows changed (id, request_id, pipeline, queue,
        attempts, status)."""
        raise NotImplementedError

    def _keep_logs(self, conn: Connection, logs: list[dict[str, Any]]) -> None:
        """Keep quiet attempts' logs (`task_id`, `attempt`, `text`, `now` each)."""
        conn.execute(sa.text(KEEP_LOG), logs)

    def _apply_changes(
        self, conn: Connection, changes: list[dict[str, Any]], now: float
    ) -> tuple[list[Any], list[Any]]:
        """Apply guarded changes to running tasks, record an event for each one applied,
        and count the finished ones in their requests. Returns the changed task rows and
        the requests' rows with their new counters."""
        raise NotImplementedError

    def _bump_counters(self, conn: Connection, rows: Sequence[Any]) -> list[Any]:
        """Count finished tasks in their requests; returns those requests' rows."""
        deltas = counter_deltas(rows)
        if not deltas:
            return []
        conn.execute(
            sa.text(
                "UPDATE requests SET tasks_succeeded = tasks_succeeded + :s, "
                "tasks_failed = tasks_failed + :f, tasks_cancelled = tasks_cancelled + :c "
                "WHERE id = :id"
            ),
            [{"id": i, "s": s, "f": f, "c": c} for i, s, f, c in deltas],
        )
        return list(
            conn.execute(
                sa.select(t.requests)
                .where(t.requests.c.id.in_([d[0] for d in deltas]))
                .order_by(t.requests.c.id)
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

    # ---------------------------------------------------------------- ingestion
    def record_ingest(
        self, spool: str, counts: Mapping[str, int], now: float, kind: str, data: Any
    ) -> None:
        with self._write() as conn:
            if counts:
                conn.execute(
                    sa.text(
                        "INSERT INTO ingest_counters (spool, name, value, updated_at) "
                        "VALUES (:spool, :name, :value, :now) ON CONFLICT (spool, name) "
                        "DO UPDATE SET value = ingest_counters.value + excluded.value, "
                        "updated_at = excluded.updated_at"
                    ),
                    [
                        {"spool": spool, "name": k, "value": v, "now": now}
                        for k, v in counts.items()
                    ],
                )
            self._insert_events(conn, [event_row(now, kind, data=data)])

    def ingest_counters(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._read() as conn:
            for spool, name, value in conn.execute(
                sa.select(
                    t.ingest_counters.c.spool, t.ingest_counters.c.name, t.ingest_counters.c.value
                )
            ):
                out.setdefault(spool, {})[name] = int(value)
        return out

    def ingest_rates(self, since: float) -> dict[str, float]:
        ev = t.events
        out: dict[str, float] = {}
        with self._read() as conn:
            top = conn.execute(sa.select(sa.func.max(ev.c.id))).scalar() or 0
            rows = conn.execute(
                sa.select(ev.c.data)
                .where(ev.c.id > top - 10_000, ev.c.kind == "ingest.progress", ev.c.ts >= since)
                .order_by(ev.c.id)
            )
            for (data,) in rows:
                if isinstance(data, dict) and isinstance(data.get("spool"), str):
                    out[data["spool"]] = float(data.get("per_minute") or 0.0)
        return out

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
            return [event_from_row(r) for r in conn.execute(q)]

    def latest_event_id(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.max(t.events.c.id))).scalar() or 0)

    def listener(self) -> Listener:
        return self.wakeup.listener()

    # ----------------------------------------------------------------- requests
    def list_requests(self, flt: RequestFilter) -> list[Request]:
        r = t.requests.c
        # (up to 5000: a caller may ask one more than a page to learn whether another follows)
        q = sa.select(t.requests).order_by(r.id.desc()).limit(max(1, min(flt.limit, 5000)))
        for column, value in (
            (r.status, flt.status),
            (r.pipeline, flt.pipeline),
            (r.queue, flt.queue),
            (r.submitter, flt.submitter),
        ):
            if value:
                q = q.where(column == value)
        if flt.created_after is not None:
            q = q.where(r.created_at >= flt.created_after)
        if flt.created_before is not None:
            q = q.where(r.created_at < flt.created_before)
        if flt.before_id is not None:
            q = q.where(r.id < flt.before_id)
        if flt.text:
            q = q.where(
                sa.func.lower(sa.cast(r.params, sa.Text)).like(params_pattern(flt.text), escape="!")
            )
        with self._read() as conn:
            return [request_from_row(row) for row in conn.execute(q)]

    # --------------------------------------------------------------- API tokens
    def create_token(self, new: NewToken, now: float) -> Token:
        try:
            with self._write() as conn:
                return token_sql.insert_token(conn, new, now)
        except sa.exc.IntegrityError:
            raise token_sql.name_taken(new.name) from None

    def token_by_hash(self, token_hash: str) -> Token | None:
        with self._read() as conn:
            return token_sql.token_by_hash(conn, token_hash)

    def list_tokens(self) -> list[Token]:
        with self._read() as conn:
            return token_sql.all_tokens(conn)

    def revoke_token(self, name_or_id: str, now: float) -> Token:
        with self._write() as conn:
            return token_sql.revoke(conn, name_or_id, now)

    def touch_token(self, token_id: int, now: float) -> None:
        with self._write() as conn:
            token_sql.touch(conn, token_id, now)


def params_pattern(text: str) -> str:
    """A LIKE pattern (escape character `!`) for `text` inside stored params. Params are
    stored as JSON text, so the text is matched in its JSON-encoded form: quotes,
    backslashes and non-ASCII characters are escaped there just as they are in storage,
    and both databases compare the same ASCII text."""
    encoded = json.dumps(text)[1:-1].lower()
    escaped = encoded.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return f"%{escaped}%"
