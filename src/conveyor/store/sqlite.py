"""SQLite: the embedded default. One file in WAL mode; writers take the write lock when
their transaction begins (BEGIN IMMEDIATE), so concurrent writers queue instead of
failing on a lock upgrade, and a claim is one `UPDATE … RETURNING`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import threading
import time
import weakref
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
from conveyor.store.sqlbase import counter_deltas
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


class _SqliteListener:
    """SQLite has no notifications: watch the file's change counter (`PRAGMA
    data_version`, a read of shared memory in WAL mode) every few milliseconds, and wake
    at once for changes made in this process."""

    INTERVAL = 0.01

    def __init__(self, path: str, local: Listener) -> None:
        self._local = local
        self._db = sqlite3.connect(path, timeout=5, check_same_thread=False)
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


class WriterQueue:
    """Where the writers of every process sharing a database file (`serve --workers`,
    `worker --processes`, an ingester, a CLI beside them) wait for their turn: an
    exclusive flock(2) on a file beside the database, `<database>-lock`, taken before
    BEGIN IMMEDIATE and given up once the transaction is over; within a process, a
    thread lock first (one queue per file and process: `writer_queue`).

    Left to SQLite, a writer that finds the write lock taken sleeps in its busy handler's
    growing steps (1, 2, 5, 10 ms and on), while the holder is done in a fraction of a
    millisecond. Here it tries again after 0.1 ms, then at most every 1 ms.

    `take` waits up to its `timeout` in all, then fails as SQLite's own wait does
    ("database is locked"). After such a time-out, until the lock file is next locked,
    writers wait for it only `STUCK_WAIT` and then go on to SQLite's own wait: a process
    stopped while holding its turn must not cost every write a time-out. Where the lock
    file cannot be opened or locked (a read-only folder, something other than a file in
    its place, a file system without flock), writers go straight to SQLite's wait, as
    without it. Written by hand: the wait is on every write's path, and a lock-file
    library's polling steps are tens of milliseconds."""

    STUCK_WAIT = 0.1

    def __init__(self, database: str) -> None:
        self.database = database
        self._file = _LockFile(database)
        weakref.finalize(self, self._file.close)
        self._lock = threading.Lock()
        # The fields below change only while `_lock` is held.
        self._held = False  # by a thread of this process
        self._locked = False  # and the lock file with it
        self._stuck = False  # the last wait for the lock file ran out of time

    def _forked(self) -> None:
        """In a child just forked, where a thread of the parent may have been waiting
        for the turn or holding it: the child's copy of the lock file is closed (the
        parent's lock stays the parent's until it gives the turn up), and the thread
        lock is a new one."""
        self._file.forget()
        self._lock = threading.Lock()
        self._held = self._locked = False

    def take(self, timeout: float) -> float:
        """Wait for the turn; the seconds waited. Raises sqlite3.OperationalError when
        the wait runs out of time."""
        started = time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            raise sqlite3.OperationalError("database is locked (by a writer of this process)")
        try:
            fd = self._file.open()
            if fd is not None:
                wait = self.STUCK_WAIT if self._stuck else timeout
                self._locked = self._flock(fd, started + wait, timeout)
        except BaseException:
            self._lock.release()
            raise
        self._held = True
        return time.monotonic() - started

    def _flock(self, fd: int, deadline: float, timeout: float) -> bool:
        """Whether the lock file was locked; False: going on without it."""
        pause = 0.0001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._stuck = False
                return True
            except BlockingIOError:
                pass
            except OSError:
                self._file.close()  # no flock here: not tried again
                return False
            if time.monotonic() >= deadline:
                if self._stuck:
                    return False
                self._stuck = True
                raise sqlite3.OperationalError(
                    f"database is locked (another process has held its turn to write for "
                    f"{timeout:g} s)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    def release(self) -> None:
        """Give the turn up: the transaction is over."""
        if not self._held:
            return
        self._held = False
        try:
            if self._locked:
                self._locked = False
                self._file.unlock()
        finally:
            self._lock.release()


class _LockFile:
    """A queue's lock file, opened on first use and kept open: a turn costs two flock
    calls. Apart from the queue, so that closing it when the queue goes needs no
    reference to the queue."""

    def __init__(self, database: str) -> None:
        self.path = f"{database}-lock"
        self.database = database
        self.fd: int | None = None
        self.tried = False

    def open(self) -> int | None:
        if not self.tried:
            self.tried = True
            self.fd = self._open()
        return self.fd

    def _open(self) -> int | None:
        # Read-only: flock needs no more, and a database shared between users may have a
        # lock file another user made. Not through a symbolic link, and never blocking
        # (a FIFO in its place); only a regular file will do.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                try:
                    mode = os.stat(self.database).st_mode & 0o666
                except OSError:
                    mode = 0o644
                fd = os.open(self.path, flags | os.O_CREAT, mode)  # as SQLite's -wal, -shm
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def unlock(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def forget(self) -> None:
        """Close this process's copy without unlocking (a forked child's)."""
        fd, self.fd, self.tried = self.fd, None, False
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


_QUEUES: weakref.WeakValueDictionary[str, WriterQueue] = weakref.WeakValueDictionary()
_QUEUES_LOCK = threading.Lock()


def writer_queue(database: str) -> WriterQueue:
    """The process's queue for a database file: every engine on the file shares it."""
    path = os.path.abspath(database)
    with _QUEUES_LOCK:
        queue = _QUEUES.get(path)
        if queue is None:
            queue = _QUEUES[path] = WriterQueue(path)
        return queue


def _after_fork() -> None:
    global _QUEUES_LOCK
    _QUEUES_LOCK = threading.Lock()  # a thread of the parent may have held it
    for queue in list(_QUEUES.values()):
        queue._forked()


os.register_at_fork(after_in_child=_after_fork)


def sqlite_engine(url: str, lock_timeout: float, foreign_keys: bool) -> sa.Engine:
    """An engine for a SQLite file, as Conveyor's store and the ingest writers use it:
    WAL, and writers that take the write lock when their transaction begins (BEGIN
    IMMEDIATE; `conveyor_readonly` connections begin deferred), after their turn in the
    file's `WriterQueue`, waiting up to `lock_timeout` seconds in all for other
    writers. BEGIN runs on the driver's connection, so a lock time-out there raises
    sqlite3.OperationalError."""
    engine = sa.create_engine(
        url, connect_args={"timeout": lock_timeout, "check_same_thread": False}
    )
    database = engine.url.database
    queue = (
        writer_queue(database)
        if database and database != ":memory:" and not database.startswith("file:")
        else None
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
        if queue is None or info.get("conveyor_turn"):
            raw.execute("BEGIN IMMEDIATE")
            return
        waited = queue.take(lock_timeout)
        try:
            info["conveyor_turn"] = True  # given up when the connection goes back to the pool
        except BaseException:
            queue.release()
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
        if queue is not None and record.info.pop("conveyor_turn", False):
            queue.release()

    return engine


class SQLiteStore(SQLStore):
    dialect = "sqlite"

    def listener(self) -> Listener:
        if not self._path or self._path == ":memory:":
            return super().listener()
        return _SqliteListener(self._path, super().listener())

    def __init__(self, url: str, lock_timeout: float = 60.0) -> None:
        """`lock_timeout`: how long a statement waits for another process's lock before
        the verb fails as unavailable."""
        database = sa.engine.make_url(url).database
        self._path = database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlite_engine(url, lock_timeout, foreign_keys=True)
        super().__init__(url, engine)
        self._writer = threading.RLock()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # Writers of this process queue here and each starts the moment the one before it
        # commits. Left to SQLite's write lock, a writer that finds it taken sleeps in the
        # busy handler's growing steps (up to 100 ms) while others keep taking it: a
        # worker's outcomes could wait behind hundreds of its own claims. The writers of
        # other processes are queued with in the engine (`WriterQueue`).
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
                    "AND lease_owner = :owner",
                    applied,
                )
            finally:
                cursor.close()
        return rows  # type: ignore[return-value]
