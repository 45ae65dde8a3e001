"""`conveyor bench`: how fast Conveyor enqueues, drains and picks up no-op tasks.

It works in a scratch database of its own (a temporary SQLite file, or a database it
creates and drops on the PostgreSQL server named by `--database`), so it never touches
real data. The drain runs in one worker process, started the way an operator would.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from conveyor.config import load_config
from conveyor.requests import NewRequest
from conveyor.store import Store, open_store
from conveyor.store.postgres import sqlalchemy_url
from conveyor.tasks import TaskAction


@dataclass(frozen=True)
class BenchOptions:
    tasks: int = 10_000
    per_request: int = 100
    concurrency: int = 64
    batch: int = 500
    database: str | None = None
    pickups: int = 200
    claim_scale: int = 0  # if set, also time claims with this many tasks queued


@contextmanager
def scratch_database(server: str | None) -> Iterator[str]:
    """A database URL that exists only for the benchmark."""
    if server is None or server.startswith("sqlite"):
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    name = f"conveyor_bench_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(sqlalchemy_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(sqlalchemy_url(server)).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _noop_batch(n_tasks: int, per_request: int) -> list[NewRequest]:
    batch = []
    left = n_tasks
    while left > 0:
        k = min(per_request, left)
        batch.append(
            NewRequest(
                pipeline="noop",
                params={"items": list(range(k))},
                task_params=[{"item": i} for i in range(k)],
                queue="default",
                priority=0,
                max_attempts=1,
                timeout=None,
            )
        )
        left -= k
    return batch


def enqueue(store: Store, n_tasks: int, per_request: int, chunk_tasks: int = 10_000) -> float:
    """Submit `n_tasks` no-op tasks; returns the seconds it took."""
    requests = _noop_batch(n_tasks, per_request)
    per_chunk = max(1, chunk_tasks // per_request)
    start = time.perf_counter()
    for i in range(0, len(requests), per_chunk):
        store.submit_many(requests[i : i + per_chunk], time.time())
    return time.perf_counter() - start


def _worker(url: str, concurrency: int, batch: int, burst: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CONVEYOR_DATABASE_URL=url, CONVEYOR_CONFIG="")
    env.pop("CONVEYOR_CONFIG")
    args = [
        sys.executable,
        "-m",
        "conveyor",
        "worker",
        "--concurrency",
        str(concurrency),
        "--batch",
        str(batch),
        "--queues",
        "default",
    ]
    if burst:
        args.append("--burst")
    return subprocess.Popen(
        args, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _span(store: Store) -> tuple[float, float, int]:
    engine: sa.Engine = store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT min(started_at), max(finished_at), count(*) FROM tasks "
                "WHERE status = 'succeeded'"
            )
        ).one()
    return float(row[0] or 0), float(row[1] or 0), int(row[2])


def drain(store: Store, url: str, opts: BenchOptions) -> dict[str, float]:
    start = time.perf_counter()
    proc = _worker(url, opts.concurrency, opts.batch, burst=True)
    _, stderr = proc.communicate(timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker failed: {stderr.decode(errors='replace')[-2000:]}")
    first, last, done = _span(store)
    if done != opts.tasks:
        raise RuntimeError(f"bench worker finished {done} of {opts.tasks} tasks")
    busy = max(last - first, 1e-9)
    return {
        "process_per_s": round(done / busy, 1),
        "drain_wall_s": round(wall, 3),
        "drain_busy_s": round(busy, 3),
    }


def pickup(store: Store, url: str, opts: BenchOptions) -> dict[str, float]:
    """Latency from a committed submit to the task starting, with an idle worker."""
    proc = _worker(url, 4, 4, burst=False)
    try:
        deadline = time.time() + 60
        while not store.list_workers(alive_since=time.time() - 30):
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("bench worker did not start")
            time.sleep(0.05)
        time.sleep(0.3)  # let it settle into waiting
        samples = []
        for _ in range(opts.pickups):
            sub = store.submit(_noop_batch(1, 1)[0], time.time())
            rid = sub.request.id
            created = sub.request.created_at
            while True:
                req = store.get_request(rid)
                assert req is not None
                if req.tasks and req.tasks[0].started_at is not None:
                    samples.append((req.tasks[0].started_at - created) * 1000)
                    break
                time.sleep(0.001)
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)
    samples.sort()
    return {
        "pickup_p50_ms": round(statistics.median(samples), 2),
        "pickup_p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
    }


def claim_latency(store: Store, backlog: int, rounds: int = 50, n: int = 100) -> float:
    """Median ms of one claim of `n` tasks plus their finish, with `backlog` queued."""
    from conveyor.tasks import Outcome

    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tasks = store.claim("bench", ["default"], n, 60, time.time())
        times.append((time.perf_counter() - t0) * 1000)
        store.finish("bench", [Outcome(t.id, TaskAction.SUCCEED) for t in tasks], time.time())
    return round(statistics.median(times), 3)


def run_bench(opts: BenchOptions, progress: Console | None = None) -> dict[str, Any]:
    def say(msg: str) -> None:
        if progress is not None:
            progress.print(msg)

    load_config()  # fail early on a broken config
    with scratch_database(opts.database) as url:
        store = open_store(url)
        try:
            store.upgrade()
            say(f"enqueueing {opts.tasks} no-op tasks ({opts.per_request} per request)")
            took = enqueue(store, opts.tasks, opts.per_request)
            result: dict[str, Any] = {
                "database": store.dialect,
                "tasks": opts.tasks,
                "per_request": opts.per_request,
                "concurrency": opts.concurrency,
                "batch": opts.batch,
                "enqueue_per_s": round(opts.tasks / took, 1),
            }
            say("draining with one worker process")
            result.update(drain(store, url, opts))
            if opts.pickups:
                say(f"timing pickup of {opts.pickups} single tasks")
                result.update(pickup(store, url, opts))
            if opts.claim_scale:
                say("timing claims with a small backlog")
                enqueue(store, 1_000 + 50 * 100, 100)
                result["claim_ms_backlog_1k"] = claim_latency(store, 1_000)
                say(f"enqueueing {opts.claim_scale} tasks for the large backlog")
                enqueue(store, opts.claim_scale, 1_000, chunk_tasks=50_000)
                result[f"claim_ms_backlog_{opts.claim_scale}"] = claim_latency(
                    store, opts.claim_scale
                )
            return result
        finally:
            store.close()
