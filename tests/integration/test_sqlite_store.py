"""SQLite-only behaviour of the store: another process holding the database's write lock
makes the worker's verbs fail as unavailable (they are retried), never crash them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from store_helpers import new_request

from conveyor.store import Unavailable
from conveyor.store.sqlite import SQLiteStore
from conveyor.tasks import Outcome, TaskAction


def test_verbs_fail_as_unavailable_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(f"sqlite:///{path}", lock_timeout=0.2)
    store.upgrade()
    store.submit(new_request(items=[1, 2]), time.time())
    [task] = store.claim("w", ["default"], 1, 60, time.time())
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock, held by another connection
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="locked"):
            store.claim("w", ["default"], 1, 60, time.time())
        with pytest.raises(Unavailable, match="locked"):
            store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time())
        assert time.monotonic() - started < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    # once the lock is free, nothing was lost or half-done
    assert store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time()) == [task.id]
    [second] = store.claim("w", ["default"], 5, 60, time.time())
    assert second.params["items"] == 2
    store.close()


def test_upgrade_fails_as_unavailable_while_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN IMMEDIATE")
    store = SQLiteStore(f"sqlite:///{path}", lock_timeout=0.2)
    try:
        with pytest.raises(Unavailable, match="locked"):
            store.upgrade()
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.upgrade()  # once free, it goes through
    assert store.claim("w", ["default"], 1, 60, time.time()) == []
    store.close()
