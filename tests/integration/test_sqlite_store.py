"""SQLite-only behaviour of the store: another process holding the database's write lock
makes the worker's verbs fail as unavailable (they are retried), never crash them; the
writers of several processes take turns, each starting as soon as the one before it is
done."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store_helpers import T0, new_request

from conveyor.store import Unavailable
from conveyor.store.sqlite import SQLiteStore
from conveyor.store.turns import writer_queue
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
from conveyor.store.turns import writer_queue
path, hold, lock_only = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
queue = writer_queue(path)
turn, _ = queue.take(60)
if not lock_only:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(hold)
if not lock_only:
    db.execute("COMMIT")
done = time.monotonic()
queue.release(turn)
print(done, flush=True)
"""


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start another process writing to a database as a Conveyor process does (its
    turn, then the write lock) and holding both for some seconds; or, `lock_only`,
    holding only the turn (a process stopped at the wrong moment). Each is gone after
    the test."""
    started: list[subprocess.Popen[str]] = []

    def start(path: Path, seconds: float, lock_only: bool = False) -> subprocess.Popen[str]:
        args = [str(path), str(seconds), "1" if lock_only else "0"]
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, *args], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _committed(proc: subprocess.Popen[str]) -> float:
    """When the holder's write was over (time.monotonic, before it gave its turn up)."""
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return float(out.strip())


def _store_with_tasks(path: Path, lock_timeout: float = 60.0, n: int = 2) -> SQLiteStore:
    store = SQLiteStore(f"sqlite:///{path}", lock_timeout=lock_timeout)
    store.upgrade()
    store.submit(new_request(items=list(range(1, n + 1))), time.time())
    return store


def _late(store: SQLiteStore, path: Path, hold: Callable[..., subprocess.Popen[str]]) -> float:
    """How long after another process's write is over a write of `store` that waited
    for it is done (the median of three). The holds are such that SQLite's own busy
    handler, sleeping 1, 2, 5 ... 50, 100 ms between tries, would try again about 90 ms
    after each ends."""
    late = []
    for seconds in (0.24, 0.34, 0.44):
        holder = hold(path, seconds)
        [task] = store.claim("w", ["default"], 1, 60, time.time())
        done = time.monotonic()
        committed = _committed(holder)
        assert done >= committed  # it did wait for the other process
        assert store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time())
        late.append(done - committed)
    return sorted(late)[1]


def test_a_writer_waiting_for_another_process_starts_as_soon_as_it_commits(
    tmp_path: Path, hold: Callable[..., subprocess.Popen[str]]
) -> None:
    path = tmp_path / "c.db"
    store = _store_with_tasks(path, n=3)
    try:
        assert _late(store, path, hold) < 0.06
    finally:
        store.close()


def test_a_process_stopped_holding_its_turn_fails_the_writes_waiting_and_delays_none_after(
    tmp_path: Path, hold: Callable[..., subprocess.Popen[str]]
) -> None:
    path = tmp_path / "c.db"
    store = _store_with_tasks(path, lock_timeout=0.3, n=5)
    patient = SQLiteStore(f"sqlite:///{path}")  # the same turns, a longer time-out
    try:
        holder = hold(path, 30, lock_only=True)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="locked"):
            store.claim("w", ["default"], 1, 60, time.time())
        assert 0.3 <= time.monotonic() - started < 3
        # the next writes wait a moment only, and then for SQLite's lock, which is free
        started = time.monotonic()
        [task] = store.claim("w", ["default"], 1, 60, time.time())
        assert store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time())
        assert time.monotonic() - started < 1
        holder.kill()
        holder.wait()
        # with the stopped process gone, writes take their turns again
        assert store.claim("w", ["default"], 1, 60, time.time())
        assert _late(patient, path, hold) < 0.06
    finally:
        patient.close()
        store.close()


def test_a_write_waiting_behind_another_writer_fails_within_the_lock_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    first = _store_with_tasks(path, lock_timeout=0.5)
    second = SQLiteStore(f"sqlite:///{path}", lock_timeout=0.5)
    other = sqlite3.connect(path, isolation_level=None)
    failed: list[BaseException] = []

    def first_write() -> None:
        try:
            first.claim("w", ["default"], 1, 60, time.time())
        except Unavailable as exc:
            failed.append(exc)

    ahead = threading.Thread(target=first_write)
    try:
        other.execute("BEGIN IMMEDIATE")  # held by a client that takes no turns
        ahead.start()  # takes the turn, then waits for SQLite's lock
        time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="locked"):
            second.claim("w", ["default"], 1, 60, time.time())
        # its wait for the turn and SQLite's wait share the one time-out
        assert time.monotonic() - started < 0.9
        ahead.join(5)
        assert len(failed) == 1
        other.execute("ROLLBACK")
        assert second.claim("w", ["default"], 1, 60, time.time())
    finally:
        other.close()
        ahead.join(5)
        first.close()
        second.close()


def test_a_write_that_waited_for_its_turn_waits_for_sqlite_only_what_is_left(
    tmp_path: Path, hold: Callable[..., subprocess.Popen[str]]
) -> None:
    path = tmp_path / "c.db"
    store = _store_with_tasks(path, lock_timeout=0.5)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        hold(path, 0.2, lock_only=True)  # another process's turn, for 0.2 s
        other.execute("BEGIN IMMEDIATE")  # and SQLite's lock, held by a client without turns
        started = time.monotonic()
        with pytest.raises(Unavailable, match="locked"):
            store.claim("w", ["default"], 1, 60, time.time())
        # 0.2 s for the turn, then 0.3 s for SQLite's lock: 0.5 s in all, not 0.7 (the
        # bound as loose as that allows: the tests share the machine's two cores)
        assert 0.45 <= time.monotonic() - started < 0.69
    finally:
        other.close()
        store.close()


@pytest.mark.parametrize("in_the_way", ["link", "fifo"])
def test_writes_go_on_where_the_lock_file_cannot_be_used(tmp_path: Path, in_the_way: str) -> None:
    path = tmp_path / "c.db"
    lock = tmp_path / "c.db-lock"
    if in_the_way == "link":
        lock.symlink_to(tmp_path / "elsewhere")  # not followed: nothing made there
    else:
        os.mkfifo(lock)  # opening it for reading would wait for a writer
    done: list[list[int]] = []

    def write() -> None:  # in a thread: were opening the fifo to wait, the test would fail
        store = _store_with_tasks(path)
        try:
            [task] = store.claim("w", ["default"], 1, 60, time.time())
            done.append(store.finish("w", [Outcome(task.id, TaskAction.SUCCEED)], time.time()))
        finally:
            store.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(20)
    assert done and len(done[0]) == 1
    assert not (tmp_path / "elsewhere").exists()


def test_a_process_forked_while_holding_the_turn_takes_its_own_after_the_parent(
    tmp_path: Path,
) -> None:
    queue = writer_queue(os.path.realpath(tmp_path / "c.db"))
    entered = tmp_path / "entered"
    ready_r, ready_w = os.pipe()
    turn, _ = queue.take(10)  # this process holds the turn (its lock file open)
    pid = os.fork()
    if pid == 0:  # the child: its turn comes once the parent has given up its own
        try:
            os.write(ready_w, b"x")
            mine, _ = queue.take(3)
            entered.write_text(repr(time.monotonic()))
            queue.release(mine)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"  # the child is about to wait
        time.sleep(0.2)
        left = time.monotonic()
    finally:
        queue.release(turn)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert float(entered.read_text()) >= left


INDEXES = (
    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name"
)


def test_an_existing_database_keeps_its_rows_and_indexes_and_never_reuses_an_id(
    tmp_path: Path,
) -> None:
    # A database made before ids were AUTOINCREMENT, with work in it, is upgraded in
    # place: its rows, foreign keys and (partial, DESC) indexes stay as they were.
    from conveyor.store.migrate import upgrade

    path = tmp_path / "old.db"
    store = SQLiteStore(f"sqlite:///{path}")
    upgrade(store.engine, "0004")
    store.submit(new_request(items=[1, 2, 3]), T0)
    tasks = store.claim("w", ["default"], 3, 60, T0)
    store.finish("w", [Outcome(t.id, TaskAction.SUCCEED) for t in tasks[:2]], T0 + 1)
    db = sqlite3.connect(path)
    with db:
        # a reader of events had got further than the events kept (they were pruned)
        db.execute("INSERT INTO event_cursors (name, event_id, updated_at) VALUES ('n', 900, 0)")
        # a loader's row whose header is gone (loaders write with foreign keys off): not
        # this upgrade's business
        columns = [r[1] for r in db.execute("PRAGMA table_info(annotation)")]
        values = {c: 0 for c in columns if c != "id"} | {"header_ref": 12345}
        db.execute(
            f"INSERT INTO annotation ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            list(values.values()),
        )
    indexes_before = db.execute(INDEXES).fetchall()
    rows_before = {
        t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
        for t in ("requests", "tasks", "events")
    }

    store.upgrade()

    for table in ("requests", "tasks", "events", "api_tokens", "artifacts", "notifications"):
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        assert "PRIMARY KEY AUTOINCREMENT" in sql, sql
    assert db.execute(INDEXES).fetchall() == indexes_before
    for table, rows in rows_before.items():
        assert db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() == rows
    for table in ("requests", "tasks", "artifacts"):
        assert db.execute(f"PRAGMA foreign_key_check({table})").fetchall() == []
    # the store goes on where it was, and hands out ids above any it gave before
    assert store.finish("w", [Outcome(tasks[2].id, TaskAction.SUCCEED)], T0 + 2) == [tasks[2].id]
    assert store.latest_event_id() > 900
    again = store.submit(new_request(items=[4]), T0 + 3).request
    assert again.id == 2 and again.tasks[0].id == 4
    store.close()
    db.close()


@pytest.mark.parametrize(
    ("database", "where"),
    [
        ("file:{dir}/data%20base/c.db?uri=true", "data base/c.db"),
        ("file://localhost{dir}/data%20base/c.db?uri=true&mode=rwc", "data base/c.db"),
        ("file:rel/c.db?uri=true", "cwd/rel/c.db"),
        ("file:sub/c.db", "cwd/file:sub/c.db"),  # no uri=true: a file of that very name
    ],
    ids=["path", "localhost", "relative", "not-a-uri"],
)
def test_a_database_named_by_a_file_uri_is_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str, where: str
) -> None:
    # The file's folder is made where the URL says, and nothing else beside the working
    # directory; a change made through another store wakes the listener.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    url = "sqlite:///" + database.format(dir=tmp_path)
    store = SQLiteStore(url)
    store.upgrade()
    other = SQLiteStore(url)
    listener = store.listener()
    try:
        rid = other.submit(new_request(items=[1]), time.time()).request.id
        assert listener.wait(5)
        found = store.get_request(rid, with_tasks=False)
        assert found is not None and found.params == {"items": [1]}
        assert (tmp_path / where).is_file()
        assert {p.name for p in tmp_path.iterdir()} <= {"cwd", "data base"}
        assert [p.name for p in cwd.iterdir()] in ([], [where.split("/")[1]])
    finally:
        listener.close()
        other.close()
        store.close()


def test_a_shared_in_memory_uri_makes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("sqlite:///file:memdb-conveyor?mode=memory&cache=shared&uri=true")
    try:
        store.upgrade()
        rid = store.submit(new_request(items=[1]), time.time()).request.id
        assert store.get_request(rid, with_tasks=False) is not None
        listener = store.listener()
        listener.close()
        assert list(tmp_path.iterdir()) == []
    finally:
        store.close()
