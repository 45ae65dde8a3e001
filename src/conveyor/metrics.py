"""`/metrics` in the Prometheus text format.

Two kinds of figures, so that any number of API processes answer alike:

- what the database holds (queue depths, tasks started, succeeded, failed and retried
  per pipeline, task durations, lease expiries, workers alive, ingest totals) is read at
  scrape time by a collector, with cheap aggregate queries whose answer is reused for
  `[metrics] cache` seconds; every process reads the same database, so every process
  answers the same;
- what each process sees (API requests, their latencies) is counted in that process.
  With several server processes (`conveyor serve --workers N`) the counts go to
  prometheus_client's multiprocess files in a directory `serve` makes, and a scrape of
  any process sums them over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import Scope

from conveyor.app import Conveyor
from conveyor.stats import (
    DURATION_BUCKETS,
    IngestTotals,
    PipelineTotals,
    Recent,
    StatusCount,
)
from conveyor.store import Unavailable
from conveyor.store.base import WorkerInfo

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def enable_multiprocess(directory: str) -> None:
    """Count this process's (and its forked children's) figures in files under
    `directory`. Call before forking the server processes."""
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import values

    # prometheus_client picks how values are kept when it is first imported.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ApiMetrics:
    """This process's API figures. With a multiprocess directory they are written to it
    (and read back from it by a scrape); else they live in this object's registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared = multiprocess_dir() is not None
        own = None if self.shared else self.registry
        self.requests = Counter(
            "conveyor_api_requests",
            "HTTP requests answered, by method, route and status code.",
            ["method", "route", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "conveyor_api_request_duration_seconds",
            "Seconds from receiving an HTTP request to the end of its answer, by route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, database: Collector) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        if self.shared:
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Forward(self.registry))
        registry.register(database)
        return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def route_label(scope: Scope) -> str:
    """The path with each path parameter's value put back as `{name}`: the route's
    template, however deeply its router was included."""
    if scope.get("route") is None:
        return "unmatched"
    path = str(scope.get("path", ""))
    for name, value in dict(scope.get("path_params") or {}).items():
        text = str(value)
        at = path.rfind("/" + text)
        if text and at >= 0:
            path = f"{path[:at]}/{{{name}}}{path[at + 1 + len(text) :]}"
    return path


@dataclass(frozen=True)
class Snapshot:
    """The database's figures at one moment."""

    counts: list[StatusCount]
    totals: list[PipelineTotals]
    lease_expiries: int
    workers: list[WorkerInfo]
    paused: list[tuple[str, bool]]
    ingest: list[IngestTotals] = field(default_factory=list)


def snapshot(app: Conveyor) -> Snapshot:
    return Snapshot(
        counts=app.status_counts(),
        totals=app.pipeline_totals(),
        lease_expiries=app.lease_expiries(),
        workers=app.workers(alive_only=True),
        paused=[(q.name, q.paused) for q in app.queues()],
        ingest=app.ingest_totals(),
    )


class DatabaseCollector(Collector):
    """The figures the database holds, read when scraped (reused for `ttl` seconds)."""

    def __init__(self, app: Conveyor, ttl: float) -> None:
        self.app = app
        self.recent: Recent[Snapshot] = Recent(ttl)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("conveyor_database_up", "1 when the database answered the scrape.")
        try:
            snap = self.recent.get(lambda: snapshot(self.app))
        except Unavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(snap)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot (pure)."""
    depth = GaugeMetricFamily(
        "conveyor_queue_tasks", "Tasks in each queue, by status.", labels=["queue", "status"]
    )
    per_queue: dict[tuple[str, str], int] = {}
    requests = GaugeMetricFamily(
        "conveyor_requests",
        "Requests by pipeline and status.",
        labels=["pipeline", "status"],
    )
    per_pipeline: dict[tuple[str, str], int] = {}
    for c in snap.counts:
        if c.kind == "task":
            per_queue[(c.queue, c.status)] = per_queue.get((c.queue, c.status), 0) + c.n
        else:
            key = (c.pipeline, c.status)
            per_pipeline[key] = per_pipeline.get(key, 0) + c.n
    for (queue, status), n in sorted(per_queue.items()):
        depth.add_metric([queue, status], n)
    for (pipeline, status), n in sorted(per_pipeline.items()):
        requests.add_metric([pipeline, status], n)
    yield depth
    yield requests

    paused = GaugeMetricFamily(
        "conveyor_queue_paused", "1 while a queue is paused.", labels=["queue"]
    )
    for name, is_paused in snap.paused:
        paused.add_metric([name], 1 if is_paused else 0)
    yield paused

    described = {
        "started": "Task attempts started, by pipeline.",
        "succeeded": "Tasks that succeeded, by pipeline.",
        "failed": "Tasks that failed for good (no attempts left), by pipeline.",
        "retried": "Task attempts after a task's first (retries, expired leases), by pipeline.",
    }
    for what, doc in described.items():
        fam = CounterMetricFamily(f"conveyor_tasks_{what}", doc, labels=["pipeline"])
        for p in snap.totals:
            fam.add_metric([p.pipeline], getattr(p, what))
        yield fam

    durations = HistogramMetricFamily(
        "conveyor_task_duration_seconds",
        "Seconds the last attempt of each finished task ran, by pipeline.",
        labels=["pipeline"],
    )
    for p in snap.totals:
        counts = p.duration_counts or (0,) * len(DURATION_BUCKETS)
        buckets = [(_le(b), float(n)) for b, n in zip(DURATION_BUCKETS, counts, strict=False)]
        buckets.append(("+Inf", float(p.duration_count)))
        durations.add_metric([p.pipeline], buckets, p.duration_sum)
    yield durations

    yield CounterMetricFamily(
        "conveyor_lease_expiries",
        "Leases that expired: a worker stopped answering while it ran a task.",
        value=snap.lease_expiries,
    )
    alive = GaugeMetricFamily(
        "conveyor_workers_alive", "Workers that sent a heartbeat recently.", value=len(snap.workers)
    )
    yield alive
    running = GaugeMetricFamily(
        "conveyor_worker_running_tasks", "Tasks each live worker is running.", labels=["worker"]
    )
    for w in snap.workers:
        running.add_metric([w.id], w.running)
    yield running

    if snap.ingest:
        for what, doc in (
            ("files", "Spool files ingested, by source."),
            ("records", "Records ingested, by source."),
            ("failed", "Spool files that failed to ingest, by source."),
        ):
            fam = CounterMetricFamily(f"conveyor_ingest_{what}", doc, labels=["source"])
            for i in snap.ingest:
                fam.add_metric([i.source], getattr(i, what))
            yield fam
        pending = GaugeMetricFamily(
            "conveyor_ingest_pending", "Spool files waiting, by source.", labels=["source"]
        )
        for i in snap.ingest:
            pending.add_metric([i.source], i.pending)
        yield pending


def _le(bound: float) -> str:
    return repr(float(bound))
