"""Figures an operator watches: counts by status, throughput over time, rates per queue,
and per-pipeline totals for metrics. The records the store answers with, and pure
functions that roll them up.

Times are seconds since the epoch; hours and days are UTC.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

_T = TypeVar("_T")

HOUR = 3600.0
DAY = 86400.0
RATE_WINDOW = 900.0  # a queue's rate: tasks finished per minute over the last 15 minutes
RATE_BUCKET = 300.0
# Task durations (seconds) at which the metrics' histograms cut.
DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


@dataclass(frozen=True)
class StatusCount:
    """How many of something (`kind`: "task" or "request") are in a status, by queue and
    pipeline."""

    kind: str
    queue: str
    pipeline: str
    status: str
    n: int


@dataclass(frozen=True)
class ActivityRow:
    """Tasks of a queue and pipeline that ended in `status` (succeeded or failed) in the
    bucket that starts at `start`."""

    start: float
    queue: str
    pipeline: str
    status: str
    n: int


@dataclass(frozen=True)
class PipelineTotals:
    """Everything a pipeline's tasks have done, as stored: attempts started, tasks that
    succeeded and failed, attempts that were retried (every attempt after a task's
    first), and the durations of finished attempts, counted into `DURATION_BUCKETS`."""

    pipeline: str
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    duration_counts: tuple[int, ...] = ()  # cumulative, one per bucket
    duration_count: int = 0
    duration_sum: float = 0.0


@dataclass(frozen=True)
class IngestTotals:
    """What one ingest source (a spool directory) has done so far."""

    source: str
    files: int = 0  # files ingested
    records: int = 0  # records they held
    failed: int = 0  # files set aside as failed
    pending: int = 0  # files waiting in the spool
    per_minute: float = 0.0  # files ingested per minute, lately


@dataclass(frozen=True)
class Bar:
    start: float
    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.succeeded + self.failed


@dataclass(frozen=True)
class CountTable:
    """Counts by status for each row name (a queue or a pipeline)."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def get(self, name: str, status: str) -> int:
        return self.rows.get(name, {}).get(status, 0)

    def total(self, status: str) -> int:
        return sum(r.get(status, 0) for r in self.rows.values())


def count_table(counts: Iterable[StatusCount], kind: str, by: str) -> CountTable:
    """Counts of `kind` ("task" or "request") by status, one row per queue or pipeline
    (`by`: "queue" or "pipeline"), rows sorted by name."""
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in counts:
        if c.kind == kind:
            rows[c.queue if by == "queue" else c.pipeline][c.status] += c.n
    return CountTable({k: dict(rows[k]) for k in sorted(rows)})


def bars(rows: Iterable[ActivityRow], now: float, width: float, count: int) -> list[Bar]:
    """`count` bars of `width` seconds, the last one holding `now`, oldest first."""
    last = (now // width) * width
    first = last - (count - 1) * width
    ok = [0] * count
    bad = [0] * count
    for r in rows:
        i = int((r.start - first) // width)
        if 0 <= i < count:
            if r.status == "failed":
                bad[i] += r.n
            else:
                ok[i] += r.n
    return [Bar(first + i * width, ok[i], bad[i]) for i in range(count)]


def rates(rows: Iterable[ActivityRow], now: float, window: float = RATE_WINDOW) -> dict[str, float]:
    """Tasks finished per minute in each queue over about the last `window` seconds:
    the buckets that overlap it, over the time they span."""
    since = now - window
    done: dict[str, int] = defaultdict(int)
    first = now
    for r in rows:
        if r.start + RATE_BUCKET > since:
            done[r.queue] += r.n
            first = min(first, r.start)
    span = max(window, now - first)
    return {q: n / (span / 60.0) for q, n in done.items()}


def failure_rate(bars_: Sequence[Bar]) -> float | None:
    """The share of finished tasks that failed over these bars (None: none finished)."""
    total = sum(b.total for b in bars_)
    return None if not total else sum(b.failed for b in bars_) / total


class Recent(Generic[_T]):
    """A figure reused for `ttl` seconds after it was computed (0: never reused). Several
    threads asking at once while it is stale compute it once."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._value: _T | None = None

    def get(self, compute: Callable[[], _T]) -> _T:
        with self._lock:
            now = self.clock()
            if self._at is not None and self._value is not None and now - self._at < self.ttl:
                return self._value
            value = compute()
            self._at, self._value = self.clock(), value
            return value
