"""PostgreSQL drops every connection while a worker drains a backlog: the worker
reconnects and goes on, and every task ends succeeded exactly once (a task whose claim
committed unseen runs again after its lease expires; none is lost, none succeeds twice).

The server itself keeps running (other tests share it): the drill terminates every
backend of the test's database, which is what clients see of a restart or a failover."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import sqlalchemy as sa
from e2e_support import E2E_DIR, Processes, events_of, run_many, wait_for

from conftest import cli_env, write_config
from conveyor.store import Store, Unavailable, open_store
from conveyor.store.postgres import sqlalchemy_url

TASKS = 800


def _terminate_backends(url: str) -> int:
    """Kill every connection to the database of `url` but this one; how many."""
    engine = sa.create_engine(sqlalchemy_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return len(
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).all()
            )
    finally:
        engine.dispose()


def _succeeded(store: Store) -> int:
    """Succeeded tasks; the test's own connections are dropped by the drill too."""
    for _ in range(3):
        try:
            return store.count_tasks(status="succeeded")
        except Unavailable:
            time.sleep(0.1)
    return store.count_tasks(status="succeeded")


def test_worker_rides_out_dropped_database_connections(tmp_path: Path, pg_url: str) -> None:
    out = tmp_path / "ran"
    out.mkdir()
    config = write_config(
        tmp_path,
        """
        [conveyor]
        poll_interval = 0.2

        [pipelines.record]
        executor = "python"
        handler = "e2e_handlers:record_slowly"
        split = "items"
        retries = 2
        """,
    )
    pythonpath = os.pathsep.join(filter(None, [str(E2E_DIR), os.environ.get("PYTHONPATH")]))
    env = cli_env(pg_url, config, PYTHONPATH=pythonpath)
    store = open_store(pg_url)
    procs = Processes(tmp_path, marker=f"{tmp_path}/")
    try:
        params = tmp_path / "params.json"
        params.write_text(json.dumps({"out_dir": str(out), "items": list(range(TASKS))}))
        (result,) = run_many([["submit", "record", str(params)]], env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        rid = int(result.stdout)

        worker = procs.start("worker", "--concurrency", "8", "--lease", "3", env=env, cwd=tmp_path)
        wait_for(
            lambda: _succeeded(store) >= TASKS // 10,
            60,
            "the drain to get going",
            interval=0.1,
        )
        # Drop every connection five times while the backlog drains.
        killed = 0
        for _ in range(5):
            killed += _terminate_backends(pg_url)
            time.sleep(0.4)
        assert killed > 0
        assert _succeeded(store) < TASKS, "the drain ended before the drill"

        wait_for(
            lambda: _succeeded(store) == TASKS,
            90,
            f"all {TASKS} tasks to succeed",
            interval=0.2,
        )
        assert worker.poll() is None, "the worker died:\n" + procs.output(worker)
        worker.send_signal(signal.SIGTERM)
        assert procs.wait(worker, 20) == 0, procs.output(worker)
        output = procs.output(worker)
        assert "Traceback" not in output, output

        req = store.get_request(rid)
        assert req is not None and req.status.value == "succeeded"
        task_ids = {t.id for t in req.tasks}
        succeeded = [e.task_id for e in events_of(store, rid) if e.kind == "task.succeeded"]
        assert sorted(succeeded) == sorted(task_ids), "each task succeeds exactly once"
        runs = [int(x) for f in out.glob("worker-*.ids") for x in f.read_text().split()]
        assert set(runs) == task_ids, "every task ran"
        # A task runs twice only when its claim (or outcome) committed unseen; then its
        # attempts say so.
        reruns = {tid for tid in set(runs) if runs.count(tid) > 1}
        for t in req.tasks:
            if t.id in reruns:
                assert t.attempts >= 2
    finally:
        procs.close()
        store.close()
