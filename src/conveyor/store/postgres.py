"""PostgreSQL: for production and for many workers on many machines.

Claims take `FOR UPDATE SKIP LOCKED` over the partial index of queued tasks, so workers
never wait for each other; bulk writes use COPY and `unnest`; a committed submit, retry or
resume sends NOTIFY, and idle workers LISTEN (polling stays as the fallback)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import psycopg
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy.engine import Connection

from conveyor.store.base import Listener
from conveyor.store.rows import CLAIMED_COLUMNS, EventRow, claimed_tasks, describe_error
from conveyor.store.sql import SQLStore
from conveyor.tasks import Task

log = logging.getLogger(__name__)

CHANNEL = "conveyor"
_LIMITS_LOCK = 0x636F6E76  # an advisory-lock key of Conveyor's own
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_TASK_COLUMNS = (
    "request_id bigint, seq int, pipeline text, queue text, priority int, params json, "
    "status text, attempts int, max_attempts int, timeout float8, available_at float8, "
    "created_at float8, progress_current float8"
)
_INSERT_TASKS = (
    "INSERT INTO tasks (request_id, seq, pipeline, queue, priority, params, status, attempts, "
    "max_attempts, timeout, available_at, created_at, progress_current) "
    "SELECT request_id, seq, pipeline, queue, priority, params, status, attempts, "
    "max_attempts, timeout, available_at, created_at, progress_current "
    f"FROM json_to_recordset(%(rows)s::json) AS x({_TASK_COLUMNS})"
)
_INSERT_EVENTS = (
    "INSERT INTO events (ts, kind, request_id, task_id, pipeline, queue, data) "
    "SELECT ts, kind, request_id, task_id, pipeline, queue, data "
    "FROM json_to_recordset(%(rows)s::json) AS x(ts float8, kind text, request_id bigint, "
    "task_id bigint, pipeline text, queue text, data json)"
)


@contextmanager
def _driver(conn: Connection) -> Iterator[psycopg.Connection[Any]]:
    """The transaction's own psycopg connection, for statements sent past SQLAlchemy.

    Its errors come out wrapped as SQLAlchemy's own would, so the store maps them as it
    maps the others (`Unavailable`, conflicts run again). A connection that whatever
    went wrong left broken, or stuck in pipeline mode (the server went away between a
    pipeline's last result and its sync; an interrupt), is invalidated here: handed
    back to the pool as it is, its rollback and the pool's reset would fail again, with
    a traceback in the log. A lost connection also marks the pool's others, as
    SQLAlchemy does on a disconnect it sees itself: they are from before it too, and
    are replaced as they come out (see `PostgresStore.__init__`)."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    try:
        yield raw
    except BaseException as exc:
        lost = raw.broken or raw.closed
        invalid = lost or raw.info.pipeline_status != pq.PipelineStatus.OFF
        if invalid:
            if lost:
                conn.engine.pool._invalidate(conn.connection, exc, _checkin=False)
            conn.invalidate(exc)
        if isinstance(exc, psycopg.Error):
            raise sa.exc.DBAPIError.instance(
                None, None, exc, psycopg.Error, connection_invalidated=invalid
            ) from exc
        raise


def _claim_sql(picked: str) -> str:
    """The claim of the `picked` ids, its events and the start of the requests it
    touches, as one statement; `= ANY(ARRAY(...))` keeps both updates on primary keys."""
    return (
        f"WITH picked AS ({picked}), "
        "claimed AS (UPDATE tasks t SET status = 'running', attempts = t.attempts + 1, "
        "lease_owner = %(w)s, lease_expires_at = %(exp)s, started_at = %(now)s, "
        "finished_at = NULL, error = NULL, result = NULL, progress_current = 0, "
        "progress_total = NULL, progress_message = NULL "
        "WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) "
        f"RETURNING {', '.join('t.' + c for c in CLAIMED_COLUMNS)}), "
        "started AS (UPDATE requests r SET status = 'running', started_at = %(now)s "
        "WHERE r.id = ANY(ARRAY(SELECT DISTINCT request_id FROM claimed)) "
        "AND r.status = 'requested' RETURNING r.id, r.pipeline, r.queue), "
        "ev AS (INSERT INTO events (ts, kind, request_id, task_id, pipeline, queue, data) "
        "SELECT %(now)s, 'request.running', id, NULL, pipeline, queue, NULL FROM started "
        "UNION ALL SELECT %(now)s, 'task.running', request_id, id, pipeline, queue, "
        "json_build_object('attempt', attempts, 'worker', %(w)s::text) FROM claimed) "
        "SELECT * FROM claimed ORDER BY priority DESC, id"
    )


def sqlalchemy_url(url: str) -> str:
    """Accept libpq-style URLs (`postgresql://user@host:port/db`) as well as
    SQLAlchemy's, and always use psycopg 3."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class _Changed(NamedTuple):
    id: int
    request_id: int
    pipeline: str
    queue: str
    attempts: int
    status: str


class PostgresStore(SQLStore):
    dialect = "postgresql"
    _lock_in_order = " FOR UPDATE"
    claim_records_events = True

    def __init__(self, url: str) -> None:
        engine = sa.create_engine(
            sqlalchemy_url(url),
            pool_size=8,
            max_overflow=8,
            # No ping at check-out (a round trip on every call): a connection found dead
            # invalidates the whole pool, so after a database restart one call per
            # process fails as `Unavailable` (the API answers 503, workers retry) and
            # the next ones reconnect.
            # JIT compilation costs more than any of Conveyor's short statements saves.
            connect_args={"connect_timeout": 10, "options": "-c jit=off"},
        )
        super().__init__(url, engine)

    # Bulk inserts send the rows as one JSON document that the server unpacks: one
    # round trip, and the per-row work happens in C on both sides.
    def _insert_tasks(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        self._raw(conn, _INSERT_TASKS, {"rows": _ENCODE(rows)}, fetch=False)

    def _insert_events(self, conn: Connection, rows: list[EventRow]) -> None:
        if rows:
            self._raw(conn, _INSERT_EVENTS, {"rows": _ENCODE(rows)}, fetch=False)

    def _notify(self, conn: Connection, topic: str) -> None:
        conn.execute(sa.text("SELECT pg_notify(:ch, :topic)"), {"ch": CHANNEL, "topic": topic})

    def _claim_prelude(
        self, conn: Connection, limited: list[str]
    ) -> tuple[set[str], dict[str, int]]:
        # The lock must be held before the counting statement starts (under READ
        # COMMITTED a statement sees the data as of its own start), so they are two
        # statements, sent together in one round trip (psycopg's pipeline mode).
        with _driver(conn) as raw, raw.pipeline(), raw.cursor() as lock, raw.cursor() as cur:
            # A claim reads only through indexes, in their order. With statistics from
            # before a burst of submits the planner may think a scan or a sort of the
            # whole backlog is cheaper; it never is.
            lock.execute("SET LOCAL enable_sort = off")
            lock.execute("SET LOCAL enable_seqscan = off")
            if limited:
                lock.execute("SELECT pg_advisory_xact_lock(%s)", (_LIMITS_LOCK,))
                cur.execute(
                    "SELECT (SELECT coalesce(array_agg(name), '{}') FROM queue_settings "
                    "WHERE paused), (SELECT coalesce(json_object_agg(pipeline, n), '{}') FROM "
                    "(SELECT pipeline, count(*) AS n FROM tasks WHERE status = 'running' "
                    "AND pipeline = ANY(%s) GROUP BY pipeline) AS c)",
                    (limited,),
                )
            else:
                cur.execute(
                    "SELECT coalesce(array_agg(name), '{}'), NULL FROM queue_settings WHERE paused"
                )
            row = cur.fetchone()
        assert row is not None
        return set(row[0]), {k: int(v) for k, v in (row[1] or {}).items()}

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
        # Candidates are locked at their own level; the window that shares out the free
        # slots runs one level up (FOR UPDATE and windows cannot share a level).
        extra = " AND pipeline <> ALL(%(x)s)" if exclude else ""
        picked = (
            "SELECT id FROM (SELECT id, priority, pipeline, row_number() OVER "
            "(PARTITION BY pipeline ORDER BY priority DESC, id) AS rn "
            "FROM (SELECT id, priority, pipeline FROM tasks "
            "WHERE status = 'queued' AND queue = %(q)s "
            f"AND available_at <= %(now)s{extra} ORDER BY priority DESC, id LIMIT %(n)s "
            "FOR UPDATE SKIP LOCKED) AS cand) AS ranked "
            "LEFT JOIN json_each_text(%(slots)s::json) AS s ON s.key = ranked.pipeline "
            "WHERE s.key IS NULL OR ranked.rn <= s.value::int"
        )
        params = {
            "q": queue,
            "now": now,
            "n": n,
            "w": worker_id,
            "exp": expires,
            "x": exclude,
            "slots": _ENCODE(dict(slots)),
        }
        tasks = claimed_tasks(self._raw(conn, _claim_sql(picked), params))
        # Fewer than n tasks claimed with nothing left out for lack of slots means the
        # queue has no more to offer.
        return tasks, len(tasks) < n and not any(
            sum(1 for t in tasks if t.pipeline == p) >= free for p, free in slots.items()
        )

    def _raw(
        self, conn: Connection, sql: str, params: dict[str, Any], fetch: bool = True
    ) -> list[tuple[Any, ...]]:
        """Run PostgreSQL-only SQL on the transaction's psycopg connection and return plain
        tuples: the claim path makes thousands of rows a second and needs nothing more."""
        with _driver(conn) as raw, raw.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if fetch else []

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
        extra = " AND pipeline <> ALL(%(x)s)" if exclude else ""
        picked = (
            "SELECT id FROM tasks WHERE status = 'queued' AND queue = %(q)s "
            f"AND available_at <= %(now)s{extra} ORDER BY priority DESC, id LIMIT %(n)s "
            "FOR UPDATE SKIP LOCKED"
        )
        params = {"q": queue, "now": now, "n": n, "w": worker_id, "exp": expires, "x": exclude}
        return claimed_tasks(self._raw(conn, _claim_sql(picked), params))

    def _candidates(
        self, conn: Connection, queue: str, n: int, exclude: list[str], now: float
    ) -> list[tuple[int, str]]:
        extra = " AND pipeline <> ALL(%(x)s)" if exclude else ""
        rows = self._raw(
            conn,
            "SELECT id, pipeline FROM tasks WHERE status = 'queued' AND queue = %(q)s "
            f"AND available_at <= %(now)s{extra} ORDER BY priority DESC, id LIMIT %(n)s "
            "FOR UPDATE SKIP LOCKED",
            {"q": queue, "now": now, "n": n, "x": exclude},
        )
        return [(r[0], r[1]) for r in rows]

    def _mark_claimed(
        self, conn: Connection, ids: list[int], worker_id: str, expires: float, now: float
    ) -> list[Task]:
        picked = "SELECT id FROM tasks WHERE id = ANY(%(ids)s::bigint[]) AND status = 'queued'"
        params = {"ids": ids, "w": worker_id, "exp": expires, "now": now}
        return claimed_tasks(self._raw(conn, _claim_sql(picked), params))

    def _apply_changes(
        self, conn: Connection, changes: list[dict[str, Any]], now: float
    ) -> tuple[list[Any], list[Any]]:
        # Guarded update, events and request counters in one statement: the database
        # does the per-row work.
        ids = [c["id"] for c in changes]
        row = self._raw(
            conn, _APPLY_CHANGES, {"changes": _ENCODE(changes), "ids": ids, "now": now}
        )[0]
        return [_Changed(*r) for r in row[0]], sorted(row[1], key=lambda r: r["id"])

    def listener(self) -> Listener:
        return _PgListener(libpq_url(self.url))


class _PgListener:
    """LISTEN on a connection of its own. If that connection is lost it says "maybe
    work" and reconnects on the next wait, so the worker falls back to polling."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10)
            self._conn.execute(f"LISTEN {CHANNEL}")
        return self._conn

    def wait(self, timeout: float) -> bool:
        try:
            conn = self._connect()
            got = False
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                got = True
            if got:
                # drain whatever else is pending without waiting
                for _ in conn.notifies(timeout=0.0):
                    pass
            return got
        except psycopg.Error as exc:
            log.warning(
                "lost the notification connection (%s); polling until it is back",
                describe_error(exc),
            )
            self.close()
            time.sleep(min(timeout, 1.0))
            return True

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


# The changes travel as one JSON array (cheaper to send than eleven arrays).
_APPLY_CHANGES = (
    "WITH v AS (SELECT * FROM json_to_recordset(%(changes)s::json) "
    "AS v(id bigint, status text, result text, error text, available_at float8, "
    "finished_at float8, delta int, owner text, expires float8, attempt int, kind text, "
    "data text)), "
    "upd AS (UPDATE tasks t SET status = v.status, result = CAST(v.result AS json), "
    "error = v.error, available_at = COALESCE(v.available_at, t.available_at), "
    "finished_at = v.finished_at, attempts = t.attempts + v.delta, "
    "lease_expires_at = NULL FROM v "
    "WHERE t.id = v.id AND t.id = ANY(%(ids)s::bigint[]) "
    "AND t.status = 'running' AND t.lease_owner = v.owner "
    "AND (v.expires IS NULL OR t.lease_expires_at = v.expires) "
    "AND (v.attempt IS NULL OR t.attempts = v.attempt) "
    "RETURNING t.id, t.request_id, t.pipeline, t.queue, t.attempts, t.status), "
    "ev AS (INSERT INTO events (ts, kind, request_id, task_id, pipeline, queue, data) "
    "SELECT %(now)s, v.kind, upd.request_id, upd.id, upd.pipeline, upd.queue, "
    "CAST(v.data AS json) FROM upd JOIN v ON v.id = upd.id ORDER BY upd.id), "
    "cnt AS (SELECT request_id, "
    "count(*) FILTER (WHERE status = 'succeeded') AS s, "
    "count(*) FILTER (WHERE status = 'failed') AS f, "
    "count(*) FILTER (WHERE status = 'cancelled') AS c "
    "FROM upd GROUP BY request_id), "
    "req AS (UPDATE requests r SET tasks_succeeded = r.tasks_succeeded + cnt.s, "
    "tasks_failed = r.tasks_failed + cnt.f, "
    "tasks_cancelled = r.tasks_cancelled + cnt.c FROM cnt "
    "WHERE r.id = cnt.request_id AND cnt.s + cnt.f + cnt.c > 0 "
    "RETURNING r.id, r.status, r.pipeline, r.queue, r.tasks_total, "
    "r.tasks_succeeded, r.tasks_failed, r.tasks_cancelled, r.started_at) "
    "SELECT (SELECT coalesce(json_agg(json_build_array(id, request_id, pipeline, "
    "queue, attempts, status)), '[]') FROM upd), "
    "(SELECT coalesce(json_agg(req), '[]') FROM req)"
)
