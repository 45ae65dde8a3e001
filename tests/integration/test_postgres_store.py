"""PostgreSQL only: what the store does when its connection is lost inside the statements
it sends on psycopg's own connection (the claim's pipelined prelude and bulk statements),
where SQLAlchemy does not see the error first."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from store_helpers import LEASE, T0, claim, submit

from conveyor.store import Store, Unavailable, open_store
from conveyor.store.postgres import _LIMITS_LOCK, sqlalchemy_url


def _backends_waiting_for_the_limits_lock(conn: sa.Connection) -> list[int]:
    return [
        int(pid)
        for (pid,) in conn.exec_driver_sql(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND NOT l.granted "
            f"AND l.objid = {_LIMITS_LOCK} AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    ]


def terminate_the_others(conn: sa.Connection) -> int:
    """Terminate every backend of the database but `conn`'s own; how many."""
    return len(
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).all()
    )


def assert_the_next_claim_gets_the_task(store: Store) -> None:
    (task,) = claim(store, "w2", limits={"p": 1})
    assert task.lease_owner == "w2" and task.attempts == 1


def assert_no_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert logged == [], [r.getMessage() for r in logged]


def test_claim_whose_connection_is_terminated_mid_pipeline(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend of a claim with concurrency limits is terminated while the claim's
    pipelined prelude waits for the limits lock: the claim fails as `Unavailable`, the
    broken connection is thrown away without a traceback in the log, nothing is claimed,
    and the next claim on the same store gets the task."""
    store = open_store(pg_url)
    holder_engine = sa.create_engine(sqlalchemy_url(pg_url))
    watcher = sa.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    holder = holder_engine.connect()
    try:
        submit(store, pipeline="p", items=["a"])
        holder.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LIMITS_LOCK})")
        result: dict[str, Any] = {}

        def claim_limited() -> None:
            try:
                result["tasks"] = store.claim("w1", ["default"], 1, LEASE, T0, limits={"p": 1})
            except Exception as exc:  # the test asserts on it below
                result["error"] = exc

        caplog.set_level(logging.WARNING)
        thread = threading.Thread(target=claim_limited)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            with watcher.connect() as conn:
                while not (pids := _backends_waiting_for_the_limits_lock(conn)):
                    assert time.monotonic() < deadline, "the claim never waited for the lock"
                    time.sleep(0.02)
                for pid in pids:
                    conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        finally:
            holder.rollback()
            thread.join(timeout=20)
        assert not thread.is_alive()

        assert "tasks" not in result, result
        assert isinstance(result["error"], Unavailable), repr(result["error"])
        assert_no_traceback_logged(caplog)

        assert_the_next_claim_gets_the_task(store)
    finally:
        holder.close()
        holder_engine.dispose()
        watcher.dispose()
        store.close()


def test_claims_after_every_pooled_connection_was_terminated(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every backend is terminated while two of the store's connections wait in its
    pool (what a database restart does): the next claim fails as `Unavailable` with no
    traceback in the log, and that failure retires the other pooled connection too, so
    the claim after it reconnects and gets the task."""
    store = open_store(pg_url)
    watcher = sa.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        submit(store, pipeline="p", items=["a"])
        with store.engine.connect(), store.engine.connect():
            pass  # both go back to the pool, alive
        with watcher.connect() as conn:
            assert terminate_the_others(conn) >= 2
        caplog.set_level(logging.WARNING)
        with pytest.raises(Unavailable):
            store.claim("w1", ["default"], 1, LEASE, T0, limits={"p": 1})
        assert_no_traceback_logged(caplog)
        assert_the_next_claim_gets_the_task(store)
    finally:
        watcher.dispose()
        store.close()


def test_claims_while_every_backend_is_terminated_again_and_again(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """For two seconds every backend is terminated every few milliseconds while claims
    with concurrency limits run: each claim either works or fails as `Unavailable`, the
    log holds no traceback (a connection lost between a pipeline's results and its sync
    used to fail the pool's reset with one), and once the drill stops claims work."""
    store = open_store(pg_url)
    watcher = sa.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        submit(store, pipeline="p", items=list(range(1000)))
        caplog.set_level(logging.WARNING)
        stop = time.monotonic() + 2.0
        terminated = 0

        def terminate() -> None:
            nonlocal terminated
            with watcher.connect() as conn:
                while time.monotonic() < stop:
                    terminated += terminate_the_others(conn)
                    time.sleep(0.005)

        thread = threading.Thread(target=terminate)
        thread.start()
        claimed: list[int] = []
        unavailable = 0
        try:
            while time.monotonic() < stop and len(claimed) < 900:  # 100 left for the end
                try:
                    got = store.claim("w1", ["default"], 1, LEASE, T0, limits={"p": 1000})
                    claimed += [t.id for t in got]
                except Unavailable:
                    unavailable += 1
        finally:
            thread.join()
        assert terminated > 0 and unavailable > 0
        assert_no_traceback_logged(caplog)

        assert len(set(claimed)) == len(claimed)
        more = claim(store, "w2", n=5, limits={"p": 1000})
        assert len(more) == 5 and not set(t.id for t in more) & set(claimed)
    finally:
        watcher.dispose()
        store.close()


def _waiting_on_a_lock(conn: sa.Connection) -> list[int]:
    return [
        int(pid)
        for (pid,) in conn.exec_driver_sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
    ]


def test_a_cancel_that_deadlocks_with_a_finishing_worker_is_run_again(pg_url: str) -> None:
    """A finish locks a task, then its request; a cancel locks the request, then its
    tasks. Crossed, PostgreSQL aborts one of them: the cancel, which waited first. It is
    run again, and the request ends cancelled, not with a 503 the caller must retry."""
    store = open_store(pg_url)
    store.upgrade()
    other = sa.create_engine(sqlalchemy_url(pg_url))
    watcher = sa.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    try:
        rid = submit(store, items=["a", "b"])
        (task, _) = claim(store, "w1", n=2)
        result: dict[str, Any] = {}
        with other.connect() as finishing:
            # the finish's first half: the task row is locked
            finishing.exec_driver_sql(f"UPDATE tasks SET error = 'x' WHERE id = {task.id}")

            def cancel() -> None:
                try:
                    result["request"] = store.cancel_request(rid, T0 + 1)
                except Exception as exc:  # the test asserts on it below
                    result["error"] = exc

            thread = threading.Thread(target=cancel)
            thread.start()
            deadline = time.monotonic() + 10
            with watcher.connect() as conn:
                while not _waiting_on_a_lock(conn):  # the cancel waits for the task row
                    assert time.monotonic() < deadline, "the cancel never waited"
                    time.sleep(0.02)
            # the finish's second half: its request, which the cancel holds
            finishing.exec_driver_sql(f"UPDATE requests SET started_at = 1 WHERE id = {rid}")
            finishing.commit()
            thread.join(timeout=20)
        assert not thread.is_alive()
        assert "error" not in result, repr(result.get("error"))
        assert result["request"].status.value == "cancelled"
        assert {t.status.value for t in result["request"].tasks} == {"cancelled"}
    finally:
        other.dispose()
        watcher.dispose()
        store.close()
