"""`conveyor bench-dashboard`: how fast the dashboard renders with a large history.

It makes a scratch database (created and dropped on the PostgreSQL server `--database`
names, or a temporary SQLite file), migrates it, and fills it in bulk (COPY on
PostgreSQL) with `requests` requests of `tasks_per_request` tasks each, spread over the
last 30 days: most finished (succeeded, some failed or cancelled), the newest still
queued or running, with their events and a few workers. Then it logs in to the
dashboard of an app over that database, in this process through ASGI (httpx), and
times the server render of three pages over `rounds` rounds: the overview, a filtered
requests page and a request's detail. The dashboard's short cache of the throughput
figures is turned off, so every round runs every query.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from conveyor.app import Conveyor
from conveyor.bench import scratch_database
from conveyor.config import builtin_config_path, load_config
from conveyor.store import open_store
from conveyor.store import schema as t
from conveyor.tokens import Role

PIPELINES = ("spotbot", "noop", "sleep")
QUEUES = ("production", "default", "urgent", "test")
SPAN = 30 * 86400.0


@dataclass(frozen=True)
class DashBenchOptions:
    database: str | None = None
    requests: int = 100_000
    tasks_per_request: int = 3
    rounds: int = 20
    seed: int = 7


@dataclass(frozen=True)
class Rows:
    requests: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    events: list[dict[str, Any]]


def make_rows(n: int, per: int, now: float, seed: int) -> Iterator[Rows]:
    """The history, in chunks of up to 10,000 requests (ids from 1, oldest first)."""
    rng = random.Random(seed)
    task_id = 0
    event_id = 0
    chunk = 10_000
    for lo in range(0, n, chunk):
        reqs: list[dict[str, Any]] = []
        tasks: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for rid in range(lo + 1, min(n, lo + chunk) + 1):
            created = now - SPAN + SPAN * (rid - 1) / n
            pipeline = PIPELINES[rid % len(PIPELINES)]
            queue = QUEUES[(rid // 7) % len(QUEUES)]
            fresh = rid > n - max(1, n // 200)  # the newest 0.5 %: still at work
            roll = rng.random()
            final = "succeeded" if roll < 0.9 else "failed" if roll < 0.97 else "cancelled"
            counts = {"succeeded": 0, "failed": 0, "cancelled": 0}
            started_any = False
            for seq in range(per):
                task_id += 1
                if fresh:
                    status = "running" if seq == 0 and rid % 3 == 0 else "queued"
                elif final == "succeeded" or seq > 0:
                    status = "succeeded" if final != "cancelled" or seq > 0 else "cancelled"
                else:
                    status = final
                if status in counts:
                    counts[status] += 1
                started = created + rng.uniform(0.1, 60) if status != "queued" else None
                started_any = started_any or started is not None
                finished = (
                    started + rng.uniform(0.05, 300)
                    if started is not None and status not in ("running",)
                    else None
                )
                if status == "cancelled" and started is None:
                    finished = created + 1
                tasks.append(
                    {
                        "id": task_id,
                        "request_id": rid,
                        "seq": seq,
                        "pipeline": pipeline,
                        "queue": queue,
                        "priority": 0,
                        "params": json.dumps({"item": seq, "site": f"site-{rid % 40}"}),
                        "status": status,
                        "attempts": 0 if status == "queued" else 2 if status == "failed" else 1,
                        "max_attempts": 2,
                        "timeout": None,
                        "available_at": created,
                        "lease_owner": f"bench-w{rid % 8}" if status == "running" else None,
                        "lease_expires_at": now + 30 if status == "running" else None,
                        "progress_current": 1.0 if status == "succeeded" else 0.0,
                        "progress_total": 1.0,
                        "progress_message": None,
                        "result": json.dumps({"exit_code": 0}) if status == "succeeded" else None,
                        "error": "exit code 3" if status == "failed" else None,
                        "created_at": created,
                        "started_at": started,
                        "finished_at": finished,
                    }
                )
                if finished is not None and status in ("succeeded", "failed"):
                    event_id += 1
                    events.append(
                        _event(event_id, finished, f"task.{status}", rid, task_id, pipeline, queue)
                    )
            status = final if not fresh else ("running" if started_any else "requested")
            done = [tk["finished_at"] for tk in tasks[-per:] if tk["finished_at"] is not None]
            reqs.append(
                {
                    "id": rid,
                    "pipeline": pipeline,
                    "params": json.dumps(
                        {
                            "logs_to_process": [
                                f"/data/field/{rid}/{i}/rawbinlog.bin" for i in range(per)
                            ],
                            "site": f"site-{rid % 40}",
                        }
                    ),
                    "params_hash": f"{rid:064x}",
                    "queue": queue,
                    "priority": 0,
                    "status": status,
                    "idempotency_key": None,
                    "submitter": f"etl-{rid % 12}",
                    "cacheable": True,
                    "reused_request_id": None,
                    "tasks_total": per,
                    "tasks_succeeded": counts["succeeded"],
                    "tasks_failed": counts["failed"],
                    "tasks_cancelled": counts["cancelled"],
                    "created_at": created,
                    "started_at": created + 0.1 if started_any else None,
                    "finished_at": max(done) if (done and not fresh) else None,
                }
            )
            event_id += 1
            events.append(
                _event(
                    event_id,
                    created,
                    "request.submitted",
                    rid,
                    None,
                    pipeline,
                    queue,
                    {"tasks": per},
                )
            )
        yield Rows(reqs, tasks, events)


def _event(
    eid: int,
    ts: float,
    kind: str,
    rid: int,
    task_id: int | None,
    pipeline: str,
    queue: str,
    data: Any = None,
) -> dict[str, Any]:
    return {
        "id": eid,
        "ts": ts,
        "kind": kind,
        "request_id": rid,
        "task_id": task_id,
        "pipeline": pipeline,
        "queue": queue,
        "data": None if data is None else json.dumps(data),
    }


def fill(url: str, opts: DashBenchOptions, now: float) -> dict[str, float]:
    """Write the history; seconds it took per table kind."""
    engine = sa.create_engine(_sa_url(url))
    start = time.perf_counter()
    counts = {"requests": 0, "tasks": 0, "events": 0}
    try:
        with engine.begin() as conn:
            for rows in make_rows(opts.requests, opts.tasks_per_request, now, opts.seed):
                for table, batch in (
                    (t.requests, rows.requests),
                    (t.tasks, rows.tasks),
                    (t.events, rows.events),
                ):
                    _write(conn, table, batch)
                    counts[table.name] += len(batch)
            for w in range(8):
                conn.execute(
                    t.workers.insert().values(
                        id=f"bench-w{w}",
                        host=f"node-{w // 2}",
                        pid=1000 + w,
                        queues=list(QUEUES),
                        concurrency=8,
                        status="running",
                        running=1,
                        started_at=now - 3600,
                        last_heartbeat=now,
                    )
                )
            if conn.dialect.name == "postgresql":
                for name in ("requests", "tasks", "events"):
                    conn.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                        f"(SELECT max(id) FROM {name}))"
                    )
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return {"fill_seconds": round(time.perf_counter() - start, 1), **counts}


def _sa_url(url: str) -> str:
    from conveyor.store.postgres import sqlalchemy_url

    return sqlalchemy_url(url) if url.startswith("postgres") else url


def _write(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    if conn.dialect.name != "postgresql":
        decoded = [
            {
                k: (json.loads(v) if k in ("params", "result", "data") and v is not None else v)
                for k, v in r.items()
            }
            for r in rows
        ]
        conn.execute(table.insert(), decoded)
        return
    raw: Any = conn.connection.dbapi_connection  # psycopg's: COPY it
    with raw.cursor() as cur, cur.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row([r[c] for c in cols])


async def _time_pages(
    app: Conveyor, token: str, pages: dict[str, str], rounds: int
) -> dict[str, Any]:
    from conveyor.api import create_app

    asgi = create_app(app)
    transport = httpx.ASGITransport(app=asgi)
    results: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.local") as c:
            form = await c.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf is not None
            r = await c.post("/login", data={"token": token, "csrf": csrf.group(1), "next": "/"})
            if r.status_code != 303:
                raise RuntimeError(f"cannot log in to the dashboard: {r.status_code}")
            for name, path in pages.items():
                times = []
                for _ in range(rounds + 1):
                    start = time.perf_counter()
                    r = await c.get(path)
                    times.append((time.perf_counter() - start) * 1000)
                    if r.status_code != 200:
                        raise RuntimeError(f"{path} answered {r.status_code}")
                first, rest = times[0], sorted(times[1:])
                results[name] = {
                    "path": path,
                    "first_ms": round(first, 1),
                    "median_ms": round(statistics.median(rest), 1),
                    "p90_ms": round(rest[int(0.9 * (len(rest) - 1))], 1),
                    "min_ms": round(rest[0], 1),
                    "max_ms": round(rest[-1], 1),
                    "bytes": len(r.content),
                }
    finally:
        asgi.state.hub.close()
    return results


def run_dashboard_bench(
    opts: DashBenchOptions, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    note = say or (lambda _m: None)
    now = time.time()
    with scratch_database(opts.database) as url, tempfile.TemporaryDirectory() as tmp:
        store = open_store(url)
        store.upgrade()
        store.close()
        note(f"filling {opts.requests} requests, {opts.requests * opts.tasks_per_request} tasks")
        filled = fill(url, opts, now)
        note(f"filled in {filled['fill_seconds']} s; timing {opts.rounds} rounds")
        config = load_config(
            builtin_config_path(),
            env={"CONVEYOR_DATABASE_URL": url, "CONVEYOR_ARTIFACTS": str(Path(tmp) / "artifacts")},
        )
        config = replace(config, dashboard=replace(config.dashboard, stats_cache=0.0))
        app = Conveyor(config)
        try:
            _, token = app.create_token("bench", Role.READ)
            middle = opts.requests // 2
            day = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(now - 20 * 86400))
            pages = {
                "overview": "/",
                "requests_filtered": "/requests?status=failed&pipeline=spotbot&queue=production",
                "requests_time_range": f"/requests?submitter=etl-3&until={day}",
                "request_detail": f"/requests/{middle}",
            }
            timed = asyncio.run(_time_pages(app, token, pages, opts.rounds))
        finally:
            app.close()
    return {
        "database": "postgresql" if url.startswith("postgres") else "sqlite",
        **filled,
        "rounds": opts.rounds,
        "pages": timed,
    }
