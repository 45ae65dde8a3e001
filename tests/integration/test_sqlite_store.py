"""SQLite-only behaviour of the store: another process holding the database's write lock
makes the worker's verbs fail as unavailable (they are retried), never crash them; the
writers of several processes take turns, each starting as soon as the one before it is
done."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_helpers import new_request

from conveyor.store import Unavailable
from conveyor.store.sqlite import SQLiteStore, WriterQueue
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


# Writers of several processes sharing the file take turns on `<database>-lock`.

_HOLDER = """
import sqlite3, sys, time
from conveyor.store.sqlite import WriterQueue
path, hold, lock_only = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
with WriterQueue(path + "-lock", 60).turn():
    if not lock_only:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
    print("held", flush=True)
    time.sleep(hold)
    if not lock_only:
        db.execute("COMMIT")
    print(time.time(), flush=True)
"""


def _hold(path: Path, seconds: float, lock_only: bool = False) -> subprocess.Popen[str]:
    """Another process writing to `path` as a Conveyor process does (its turn, then the
    write lock) and holding both for `seconds`; or, with `lock_only`, holding only the
    turn (a stuck process)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(seconds), "1" if lock_only else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def _released(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return float(out.strip())


def _store_with_task(path: Path, lock_timeout: float = 60.0) -> SQLiteStore:
    store = SQLiteStore(f"sqlite:///{path}", lock_timeout=lock_timeout)
    store.upgrade()
    store.submit(new_request(items=[1, 2]), time.time())
    return store


def test_a_writer_waiting_for_another_process_starts_as_soon_as_it_commits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    store = _store_with_task(path)
    holder = _hold(path, 0.25)
    [task] = store.claim("w", ["default"], 1, 60, time.time())
    done = time.time()
    released = _released(holder)
    assert done >= released  # it did wait for the other process
    # SQLite's own busy handler, sleeping 1, 2, 5 ... 25, 50 ms between tries, would
    # have tried again 78 ms after a 250 ms hold ended
    assert done - released < 0.04
    assert task.params["items"] == 1
    store.close()


def test_a_stopped_process_holding_only_the_turn_delays_one_write_by_the_lock_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    store = _store_with_task(path, lock_timeout=0.3)
    holder = _hold(path, 10, lock_only=True)
    try:
        started = time.monotonic()
        [task] = store.claim("w", ["default"], 1, 60, time.time())
        assert 0.3 <= time.monotonic() - started < 3
        # the next writes do not wait for it again
        started = time.monotonic()
        assert store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time())
        [second] = store.claim("w", ["default"], 1, 60, time.time())
        assert time.monotonic() - started < 0.25
        assert second.params["items"] == 2
    finally:
        holder.kill()
        holder.wait()
    store.close()


def test_writes_go_on_where_the_lock_file_cannot_be_made(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    (tmp_path / "c.db-lock").mkdir()  # in the way: cannot be opened as a file
    store = _store_with_task(path)
    [task] = store.claim("w", ["default"], 1, 60, time.time())
    assert store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time()) == [task.id]
    store.close()


def test_a_forked_process_takes_its_turn_apart_from_its_parent(tmp_path: Path) -> None:
    queue = WriterQueue(str(tmp_path / "c.db-lock"), 60)
    entered = tmp_path / "entered"
    with queue.turn():  # the lock file is open in this process when it forks
        pid = os.fork()
        if pid == 0:  # the child: its turn must wait for the parent's to end
            try:
                with queue.turn():
                    entered.write_text(repr(time.time()))
            finally:
                os._exit(0)
        time.sleep(0.2)
        left = time.time()
    os.waitpid(pid, 0)
    assert float(entered.read_text()) >= left
