"""SQLite: the embedded default. One file in WAL mode; writers take the write lock when
their transaction begins (BEGIN IMMEDIATE), so concurrent writers queue instead of
failing on a lock upgrade, and a claim is one `UPDATE … RETURNING`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Row

from conveyor.store.base import Listener
from conveyor.store.rows import TASK_COLUMNS, task_from_row, typed_tasks
from conveyor.store.sql import SQLStore
from conveyor.tasks import Task

_RETURNING = ", ".join(TASK_COLUMNS)
_CLAIM_SET = (
    "status = 'running', attempts = attempts + 1, lease_owner = :w, "
    "lease_expires_at = :exp, started_at = :now, finished_at = NULL, error = NULL, "
    "progress_current = 0, progress_total = NULL, progress_message = NULL"
)


def _tasks(rows: Any) -> list[Task]:
    return sorted((task_from_row(r) for r in rows), key=lambda t: (-t.priority, t.id))


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


class SQLiteStore(SQLStore):
    dialect = "sqlite"

    def listener(self) -> Listener:
        if not self._path or self._path == ":memory:":
            return super().listener()
        return _SqliteListener(self._path, super().listener())

    def __init__(self, url: str) -> None:
        database = sa.engine.make_url(url).database
        self._path = database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            # Transactions are begun below, not by the driver.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            if conn.get_execution_options().get("conveyor_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        super().__init__(url, engine)
        self._writer = threading.RLock()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        # Writers of this process queue here and each starts the moment the one before it
        # commits. Left to SQLite's write lock, a writer that finds it taken sleeps in the
        # busy handler's growing steps (up to 100 ms) while others keep taking it: a
        # worker's outcomes could wait behind hundreds of its own claims.
        with self._writer, super()._write() as conn:
            yield conn

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
        return _tasks(
            conn.execute(
                typed_tasks(
                    f"UPDATE tasks SET {_CLAIM_SET} WHERE id IN ("
                    "SELECT id FROM tasks INDEXED BY ix_tasks_claim "
                    "WHERE status = 'queued' AND queue = :q AND available_at <= :now"
                    f"{extra} ORDER BY priority DESC, id LIMIT :n) RETURNING {_RETURNING}"
                ),
                {"q": queue, "now": now, "n": n, "w": worker_id, "exp": expires, **binds},
            ).all()
        )

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
        return _tasks(
            conn.execute(
                typed_tasks(
                    f"UPDATE tasks SET {_CLAIM_SET} WHERE id IN :ids AND status = 'queued' "
                    f"RETURNING {_RETURNING}"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"ids": ids, "w": worker_id, "exp": expires, "now": now},
            ).all()
        )

    def _update_running(self, conn: Connection, changes: list[dict[str, Any]]) -> list[Row[Any]]:
        # This transaction holds SQLite's write lock (BEGIN IMMEDIATE), so the guard can be
        # checked with one read and the updates applied with one executemany; the guard
        # stays in the UPDATE as well.
        by_id = {c["id"]: c for c in changes}
        current = conn.execute(
            sa.text(
                "SELECT id, request_id, pipeline, queue, attempts, status, lease_owner, "
                "lease_expires_at FROM tasks WHERE id IN (SELECT value FROM json_each(:ids))"
            ),
            {"ids": json.dumps(list(by_id))},
        ).all()
        applied = []
        rows = []
        for r in current:
            c = by_id[r.id]
            if r.status != "running" or r.lease_owner != c["owner"]:
                continue
            if c["expires"] is not None and r.lease_expires_at != c["expires"]:
                continue
            applied.append(c)
            rows.append(
                _Changed(
                    r.id, r.request_id, r.pipeline, r.queue, r.attempts + c["delta"], c["status"]
                )
            )
        if applied:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
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
