"""SQLite: the embedded default. One file in WAL mode; writers take the write lock when
their transaction begins (BEGIN IMMEDIATE), so concurrent writers queue instead of
failing on a lock upgrade, and a claim is one `UPDATE … RETURNING`."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Row

from conveyor.requests import RequestStatus
from conveyor.store.base import Listener, Unavailable
from conveyor.store.rows import (
    CLAIMED_COLUMNS,
    EventRow,
    claimed_tasks,
    describe_error,
    dumps,
)
from conveyor.store.sql import SQLStore
from conveyor.store.sqlbase import KEEP_LOG, counter_deltas
from conveyor.store.turns import writer_queue
from conveyor.tasks import Task

# The worker's hot verbs (claim, finish) run their statements on the transaction's
# sqlite3 cursor, as the PostgreSQL store does on psycopg's: each goes through
# SQLAlchemy's statement machinery otherwise, which costs several times the statement.
_RETURNING = ", ".join(CLAIMED_COLUMNS)
_CLAIM_SET = (
    "status = 'running', attempts = attempts + 1, lease_owner = :w, "
    "lease_expires_at = :exp, started_at = :now, finished_at = NULL, error = NULL, "
    "result = NULL, progress_current = 0, progress_total = NULL, progress_message = NULL"
)
_INSERT_EVENT = (
    "INSERT INTO events (ts, kind, request_id, task_id, pipeline, queue, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _cursor(conn: Connection) -> sqlite3.Cursor:
    """The sqlite3 cursor of the transaction `conn` is in."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw.cursor()


def _tasks(rows: list[Any]) -> list[Task]:
    return sorted(claimed_tasks(rows, params_text=True), key=lambda t: (-t.priority, t.id))


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class _Changed(NamedTuple):
    id: int
    request_id: int
    pipeline: str
    queue: str
    attempts: int
    status: str


def _excluded(exclude: list[str]) -> tuple[str, dict[str, Any]]:
    if not exclude:
        return "", {}
    names = {f"x{i}": p for i, p in enumerate(exclude)}
    return f" AND pipeline NOT IN ({', '.join(':' + k for k in names)})", names


def _is_uri(url: sa.URL) -> bool:
    """Whether the driver takes the URL's database as a SQLite URI (`?uri=true`)."""
    return bool(sa.util.asbool(url.query.get("uri", False)))


def database_file(url: str | sa.URL) -> str | None:
    """The local file a SQLite URL's database is, None for one in memory (or a URI
    naming another host). With `uri=true` the database may be a `file:` URI
    (`sqlite:///file:/srv/c.db?uri=true&mode=rwc`): its path, percent-decoded; without
    it, `file:x.db` is a file of that name, as the driver takes it."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    if not database or database == ":memory:":
        return None
    if not (_is_uri(parsed) and database.startswith("file:")):
        return database
    path = database.removeprefix("file:")
    if parsed.query.get("mode") == "memory" or path in ("", ":memory:"):
        return None
    if path.startswith("//"):  # file://host/path: a file here only for no host or localhost
        host, _, rest = path[2:].partition("/")
        if host not in ("", "localhost"):
            return None
        path = "/" + rest
    return urllib.parse.unquote(path)


class _SqliteListener:
    """SQLite has no notifications: watch the file's change counter (`PRAGMA
    data_version`, a read of shared memory in WAL mode) every few milliseconds, and wake
    at once for changes made in this process."""

    INTERVAL = 0.01

    def __init__(self, database: tuple[str, bool], local: Listener) -> None:
        """`database`: the name to open, and whether it is a URI."""
        self._local = local
        name, uri = database
        self._db = sqlite3.connect(name, timeout=5, check_same_thread=False, uri=uri)
        self._version = self._read()

    def _read(self) -> int:
        try:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return -1

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self._local.wait(max(0.0, min(self.INTERVAL, left))):
                return True
            version = self._read()
            if version != self._version:
                self._version = version
                return True
            if left <= 0:
                return False

    def close(self) -> None:
        self._local.close()
        self._db.close()


def sqlite_engine(url: str, lock_timeout: float, foreign_keys: bool) -> sa.Engine:
    """An engine for a SQLite file, as Conveyor's store and the ingest writers use it:
    WAL, and writers that take the write lock when their transaction begins (BEGIN
    IMMEDIATE; `conveyor_readonly` connections begin deferred), after their turn in the
    file's `WriterQueue` (not for a database named by a `file:` URI), waiting up to
    `lock_timeout` seconds in all for other writers. BEGIN runs on the driver's
    connection, so a lock time-out there raises sqlite3.OperationalError."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    queue = None
    if database and database != ":memory:" and not _is_uri(parsed):
        # absolute: the pool connects again later, perhaps from another directory
        database = os.path.realpath(database)
        parsed = parsed.set(database=database)
        queue = writer_queue(database)
    engine = sa.create_engine(
        parsed, connect_args={"timeout": lock_timeout, "check_same_thread": False}
    )
    busy_ms = int(lock_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Transactions are begun below, not by the driver.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        if foreign_keys:
            cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # on the driver's connection: every transaction passes here
        raw = conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        if conn.get_execution_options().get("conveyor_readonly"):
            raw.execute("BEGIN")
            return
        info = conn.connection.info
        if queue is None or "conveyor_turn" in info:
            raw.execute("BEGIN IMMEDIATE")
            return
        turn, waited = queue.take(lock_timeout)
        try:
            info["conveyor_turn"] = turn  # given up when the connection goes back to the pool
        except BaseException:
            queue.release(turn)
            raise
        if waited < 0.01:
            raw.execute("BEGIN IMMEDIATE")
            return
        # SQLite's own wait gets what is left of the time-out
        raw.execute(f"PRAGMA busy_timeout={max(1, busy_ms - int(waited * 1000))}")
        try:
            raw.execute("BEGIN IMMEDIATE")
        finally:
            raw.execute(f"PRAGMA busy_timeout={busy_ms}")

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        turn = record.info.pop("conveyor_turn", None)
        if queue is not None and turn is not None:
            queue.release(turn)

    return engine


class SQLiteStore(SQLStore):
    dialect = "sqlite"

    def listener(self) -> Listener:
        if self._file is None:
            return super().listener()
        return _SqliteListener(self._connect_to, super().listener())

    def __init__(self, url: str, lock_timeout: float = 60.0) -> None:
        """`lock_timeout`: how long a statement waits for another process's lock before
        the verb fails as unavailable."""
        self._file = database_file(url)
        if self._file is not None:
            Path(self._file).parent.mkdir(parents=True, exist_ok=True)
        self._lock_timeout = lock_timeout
        engine = sqlite_engine(url, lock_timeout, foreign_keys=True)
        # what the driver opens (a path made absolute, or a URI with its options), as
        # the listener opens it too
        (name,), opts = engine.dialect.create_connect_args(engine.url)
        self._connect_to = (str(name), bool(opts.get("uri", False)))
        super().__init__(url, engine)
        self._writer = threading.RLock()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # Writers of this process queue here and each starts the moment the one before it
        # commits. Left to SQLite's write lock, a writer that finds it taken sleeps in the
        # busy handler's growing steps (up to 100 ms) while others keep taking it: a
        # worker's outcomes could wait behind hundreds of its own claims. Then the turns
        # of the file's writers of all engines and processes (`turns.WriterQueue`).
        with self._writer:
            try:
                with super()._write() as conn:
                    yield conn
            except sqlite3.OperationalError as exc:
                # raised by statements run on the driver's cursor (the hot verbs) and by
                # BEGIN: the database is locked, read-only, out of space or gone
                raise Unavailable(describe_error(exc)) from exc

    def upgrade(self) -> None:
        try:
            super().upgrade()
        except sqlite3.OperationalError as exc:  # from BEGIN, run on the driver's connection
            raise Unavailable(describe_error(exc)) from exc

    @contextmanager
    def _migrating(self) -> Iterator[sa.Engine]:
        # Migrations that rebuild a table (SQLite's way to change one) drop it while
        # others still refer to it: they run with foreign keys off, and check them
        # themselves. (An in-memory database stays on this engine: another would see a
        # database of its own, or one that goes with it.)
        if self._file is None:
            yield self.engine
            return
        engine = sqlite_engine(self.url, self._lock_timeout, foreign_keys=False)
        try:
            yield engine
        finally:
            engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with super()._read() as conn:
                yield conn
        except sqlite3.OperationalError as exc:  # from BEGIN, run on the driver's connection
            raise Unavailable(describe_error(exc)) from exc

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
        extra, binds = _excluded(exclude)
        cur = _cursor(conn)
        try:
            rows = cur.execute(
                f"UPDATE tasks SET {_CLAIM_SET} WHERE id IN ("
                "SELECT id FROM tasks INDEXED BY ix_tasks_claim "
                "WHERE status = 'queued' AND queue = :q AND available_at <= :now"
                f"{extra} ORDER BY priority DESC, id LIMIT :n) RETURNING {_RETURNING}",
                {"q": queue, "now": now, "n": n, "w": worker_id, "exp": expires, **binds},
            ).fetchall()
        finally:
            cur.close()
        return _tasks(rows)

    def _candidates(
        self, conn: Connection, queue: str, n: int, exclude: list[str], now: float
    ) -> list[tuple[int, str]]:
        extra, binds = _excluded(exclude)
        rows = conn.execute(
            sa.text(
                "SELECT id, pipeline FROM tasks INDEXED BY ix_tasks_claim "
                "WHERE status = 'queued' AND queue = :q AND available_at <= :now"
                f"{extra} ORDER BY priority DESC, id LIMIT :n"
            ),
            {"q": queue, "now": now, "n": n, **binds},
        ).all()
        return [(r[0], r[1]) for r in rows]

    def _mark_claimed(
        self, conn: Connection, ids: list[int], worker_id: str, expires: float, now: float
    ) -> list[Task]:
        cur = _cursor(conn)
        try:
            rows = cur.execute(
                f"UPDATE tasks SET {_CLAIM_SET} WHERE id IN (SELECT value FROM json_each(:ids)) "
                f"AND status = 'queued' RETURNING {_RETURNING}",
                {"ids": json.dumps(ids), "w": worker_id, "exp": expires, "now": now},
            ).fetchall()
        finally:
            cur.close()
        return _tasks(rows)

    def _claim_prelude(
        self, conn: Connection, limited: list[str]
    ) -> tuple[set[str], dict[str, int]]:
        if limited:
            return super()._claim_prelude(conn, limited)
        cur = _cursor(conn)
        try:
            return {r[0] for r in cur.execute("SELECT name FROM queue_settings WHERE paused")}, {}
        finally:
            cur.close()

    def _after_claim(
        self, conn: Connection, claimed: list[Task], worker_id: str, now: float
    ) -> None:
        rids = sorted({c.request_id for c in claimed})
        cur = _cursor(conn)
        try:
            started = cur.execute(
                f"UPDATE requests SET status = ?, started_at = ? WHERE id IN ({_marks(len(rids))}) "
                f"AND status = ? RETURNING id, pipeline, queue",
                [RequestStatus.RUNNING.value, now, *rids, RequestStatus.REQUESTED.value],
            ).fetchall()
            events: list[tuple[Any, ...]] = [
                (
                    now,
                    "task.running",
                    c.request_id,
                    c.id,
                    c.pipeline,
                    c.queue,
                    dumps({"attempt": c.attempts, "worker": worker_id}),
                )
                for c in claimed
            ]
            events += [(now, "request.running", r[0], None, r[1], r[2], None) for r in started]
            cur.executemany(_INSERT_EVENT, events)
        finally:
            cur.close()

    def _insert_events(self, conn: Connection, rows: list[EventRow]) -> None:
        if not rows:
            return
        cur = _cursor(conn)
        try:
            cur.executemany(
                _INSERT_EVENT,
                [
                    (
                        r["ts"],
                        r["kind"],
                        r["request_id"],
                        r["task_id"],
                        r["pipeline"],
                        r["queue"],
                        dumps(r["data"]),
                    )
                    for r in rows
                ],
            )
        finally:
            cur.close()

    def _keep_logs(self, conn: Connection, logs: list[dict[str, Any]]) -> None:
        cur = _cursor(conn)
        try:
            cur.executemany(KEEP_LOG, logs)
        finally:
            cur.close()

    def _apply_changes(
        self, conn: Connection, changes: list[dict[str, Any]], now: float
    ) -> tuple[list[Any], list[Any]]:
        rows = self._update_running(conn, changes)
        by_id = {c["id"]: c for c in changes}
        cur = _cursor(conn)
        try:
            cur.executemany(
                _INSERT_EVENT,
                [
                    (
                        now,
                        by_id[r.id]["kind"],
                        r.request_id,
                        r.id,
                        r.pipeline,
                        r.queue,
                        by_id[r.id]["data"],
                    )
                    for r in rows
                ],
            )
        finally:
            cur.close()
        return rows, self._bump_counters(conn, rows)

    def _bump_counters(self, conn: Connection, rows: Sequence[Any]) -> list[Any]:
        deltas = counter_deltas(rows)
        if not deltas:
            return []
        cur = _cursor(conn)
        try:
            cur.executemany(
                "UPDATE requests SET tasks_succeeded = tasks_succeeded + ?, "
                "tasks_failed = tasks_failed + ?, tasks_cancelled = tasks_cancelled + ? "
                "WHERE id = ?",
                [(s, f, c, i) for i, s, f, c in deltas],
            )
            cur.row_factory = sqlite3.Row
            return cur.execute(
                f"SELECT * FROM requests WHERE id IN ({_marks(len(deltas))}) ORDER BY id",
                [d[0] for d in deltas],
            ).fetchall()
        finally:
            cur.close()

    def _update_running(self, conn: Connection, changes: list[dict[str, Any]]) -> list[Row[Any]]:
        # This transaction holds SQLite's write lock (BEGIN IMMEDIATE), so the guard can be
        # checked with one read and the updates applied with one executemany; the guard
        # stays in the UPDATE as well.
        by_id = {c["id"]: c for c in changes}
        cursor = _cursor(conn)
        try:
            current = cursor.execute(
                "SELECT id, request_id, pipeline, queue, attempts, status, lease_owner, "
                "lease_expires_at FROM tasks WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(by_id)),),
            ).fetchall()
        finally:
            cursor.close()
        applied = []
        rows = []
        for tid, rid, pipeline, queue, attempts, status, owner, lease_expires_at in current:
            c = by_id[tid]
            if status != "running" or owner != c["owner"]:
                continue
            if c["expires"] is not None and lease_expires_at != c["expires"]:
                continue
            if c["attempt"] is not None and attempts != c["attempt"]:
                continue  # an earlier attempt's outcome, the task claimed again since
            applied.append(c)
            rows.append(_Changed(tid, rid, pipeline, queue, attempts + c["delta"], c["status"]))
        if applied:
            cursor = _cursor(conn)
            try:
                cursor.executemany(
                    "UPDATE tasks SET status = :status, result = :result, error = :error, "
                    "available_at = COALESCE(:available_at, available_at), "
                    "finished_at = :finished_at, attempts = attempts + :delta, "
                    "lease_expires_at = NULL WHERE id = :id AND status = 'running' "
                    "AND lease_owner = :owner AND (:attempt IS NULL OR attempts = :attempt)",
                    applied,
                )
            finally:
                cursor.close()
        return rows  # type: ignore[return-value]
