"""The ingester: scans a spool, prepares files in worker processes, writes their rows
in batches through one writer, then moves the files.

Flow and bounds: at most `4 x workers` chunks of files are being prepared at once, at
most one batch's worth of prepared files (`batch_rows` rows, `batch_bytes` bytes) waits
for the writer while it commits, and the batch being committed is no larger, so memory
stays flat whatever the backlog. The writer commits as soon as it is free: what was
prepared meanwhile goes in its next transaction, so batches grow with the load and no
prepared file waits for a batch to fill. A file is archived only after the
transaction holding its rows commits. When the database fails the batch is kept and
tried again with back-off, and nothing new is taken meanwhile; the files stay pending.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from conveyor.ingest.offload import BlobSpec
from conveyor.ingest.prepare import (
    Chunk,
    Outcome,
    Plan,
    Prepared,
    Stages,
    gather,
)
from conveyor.ingest.settings import SinkConfig, SpoolConfig
from conveyor.ingest.sinks import TableSpec, spec_of
from conveyor.ingest.sinks.kcidb import kcidb_specs
from conveyor.ingest.sinks.table import TableMapping
from conveyor.ingest.spool import FileError, Spool, Stage
from conveyor.ingest.workers import Failed, WorkerPool
from conveyor.ingest.writer import RowWriter, SinkRejected, SinkUnavailable, TableRows

log = logging.getLogger(__name__)
_FLUSH = object()  # to the writer: commit what you have now
_REPORT_EVERY = 0.5  # seconds between reports of counters and events
_MAX_EVENTS = 1000  # events waiting for the store; beyond, the oldest are dropped
_CHUNK = 32  # most files sent to a worker process at once
_PER_WORKER = 4  # chunks in flight to each worker process
_STRIKES = 3  # a file whose preparing fails this many times (its worker dies) fails
_STOP_GRACE = 10.0  # seconds the workers have, when stopping, to finish their chunks

# counters(spool, {name: increment}, event kind, event data): keeps the counts and
# announces them (the application stores both).
Report = Callable[[str, Mapping[str, int], str, dict[str, Any]], None]


@dataclass
class IngestStats:
    files: int = 0  # archived
    rows: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # by stage
    empty: int = 0
    retried: int = 0  # database errors survived
    started: float = field(default_factory=time.monotonic)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "files": self.files,
            "rows": self.rows,
            "failed": dict(self.failed),
            "empty": self.empty,
            "retried": self.retried,
            "seconds": round(elapsed, 3),
            "files_per_s": round(self.files / elapsed, 1),
            "rows_per_s": round(self.rows / elapsed, 1),
        }


def table_specs(
    sink: SinkConfig, engine: sa.Engine
) -> tuple[dict[str, TableSpec], tuple[TableMapping, ...]]:
    """The target tables of a sink: KCIDB's, or the configured ones as they are in the
    database (reflected, so a missing table or column is reported before any file)."""
    if sink.type == "kcidb":
        return kcidb_specs(), ()
    meta = sa.MetaData()
    specs: dict[str, TableSpec] = {}
    mappings = []
    for target in sink.tables:
        try:
            table = sa.Table(target.table, meta, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise ValueError(
                f"sinks.{sink.name}: no table {target.table!r} in the database"
            ) from None
        missing = [c for c in target.columns.values() if c not in table.c]
        if missing:
            raise ValueError(
                f"sinks.{sink.name}: table {target.table!r} has no column {missing[0]!r}"
            )
        spec = spec_of(table, target.key)
        if not spec.key:
            raise ValueError(f"sinks.{sink.name}: table {target.table!r} needs a key (key = [...])")
        specs[target.table] = spec
        mappings.append(TableMapping(target.path, target.table, dict(target.columns)))
    return specs, tuple(mappings)


def make_plan(
    spool: SpoolConfig, sink: SinkConfig, engine: sa.Engine, blobs: BlobSpec | None
) -> Plan:
    tables, mappings = table_specs(sink, engine)
    return Plan(
        spool_dir=str(spool.dir),
        sink_name=sink.name,
        sink_type=sink.type,
        tables=tables,
        mappings=mappings,
        schema=sink.schema,
        transforms=spool.transforms,
        blobs=blobs,
        text_threshold=spool.text_threshold,
        offload_fields=spool.offload_fields,
        offload_timeout=spool.offload_timeout,
        offload_cache=spool.offload_cache,
        dialect=engine.dialect.name,
    )


class _Handoff:
    """Prepared files on their way from the workers to the writer, a worker's answer
    (a chunk of files) at a time, bounded by rows and bytes (one batch's worth): a put
    waits while the writer is behind, so the backlog stays on disk. A chunk that fits
    nowhere still passes when nothing else waits, and the markers (`_FLUSH`, `None`)
    always do."""

    def __init__(self, rows: int, size: int) -> None:
        self._items: deque[Chunk | object | None] = deque()
        self._cond = threading.Condition()
        self._rows = self._size = 0
        self.max_rows, self.max_size = rows, size

    @staticmethod
    def _weight(item: Chunk | object | None) -> tuple[int, int]:
        if not isinstance(item, Chunk):
            return 0, 0
        return max(1, item.count), item.size

    def put(self, item: Chunk | object | None) -> None:
        rows, size = self._weight(item)
        with self._cond:
            while (
                rows
                and self._items
                and (self._rows >= self.max_rows or self._size >= self.max_size)
            ):
                self._cond.wait()
            self._items.append(item)
            self._rows += rows
            self._size += size
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Chunk | object | None:
        """The oldest item; raises queue.Empty after `timeout` seconds with none."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            item = self._items.popleft()
            rows, size = self._weight(item)
            self._rows -= rows
            self._size -= size
            self._cond.notify_all()
            return item

    def empty(self) -> bool:
        with self._cond:
            return not self._items


@dataclass
class _Batch:
    chunks: list[Chunk] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    since: float = 0.0

    def add(self, chunk: Chunk) -> None:
        if not self.chunks:
            self.since = time.monotonic()
        self.chunks.append(chunk)
        self.rows += chunk.count
        self.size += chunk.size

    @property
    def files(self) -> int:
        return sum(len(c.files) for c in self.chunks)

    def names(self) -> list[str]:
        return [name for c in self.chunks for name in c.names]


class Ingester:
    def __init__(
        self,
        spool: SpoolConfig,
        plan: Plan,
        writer: RowWriter,
        report: Report | None = None,
        on_progress: Callable[[IngestStats], None] | None = None,
        backoff_max: float = 30.0,
    ) -> None:
        self.cfg = spool
        self.plan = plan
        self.writer = writer
        self.spool = Spool(spool.dir, spool.settle)
        self.report = report
        self.on_progress = on_progress
        self.backoff_max = backoff_max
        self.stats = IngestStats()
        self.stop_event = threading.Event()
        self._pending_counts: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=_MAX_EVENTS)
        self._wake_reporter = threading.Event()
        self._samples: deque[tuple[float, int]] = deque()
        self._reporting_done = threading.Event()
        self._pending: set[str] = set()
        self._pending_lock = threading.Condition()
        self._deferred: dict[str, float] = {}  # name -> when it may be tried again
        # name -> how many times the worker preparing it died (or a stage raised)
        self._strikes: Counter[str] = Counter()
        # files whose rows are committed, (name, rows) per batch, on their way to archive/
        self._committed: queue.SimpleQueue[list[tuple[str, int]] | None] = queue.SimpleQueue()
        # stages run in this process: every file's when there are no worker processes,
        # else only those of files whose rows the database refused (see _rejected)
        self._stages: Stages | None = None

    def stop(self) -> None:
        self.stop_event.set()

    # -------------------------------------------------------------------- main loop
    def run(self, once: bool = False) -> IngestStats:
        """Ingest until stopped (or, with `once`, until the spool is empty).

        This thread scans and feeds the worker processes; a writer thread takes what they
        prepared through a bounded queue and commits it in batches, so preparing goes on
        while a batch commits; an archive thread then moves the committed files."""
        self.spool.ensure()
        pool = self._workers()
        handoff = _Handoff(self.cfg.batch_rows, self.cfg.batch_bytes)
        writer = threading.Thread(target=self._write_loop, args=(handoff,), name="ingest-writer")
        writer.start()
        archiver = threading.Thread(target=self._archive_loop, name="ingest-archive")
        archiver.start()
        reporter = threading.Thread(target=self._report_loop, name="ingest-report", daemon=True)
        reporter.start()
        slots = max(2, _PER_WORKER * self.cfg.workers)
        todo: list[str] = []
        next_scan = 0.0
        handed = False
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                busy = pool.in_flight if pool is not None else 0
                if not todo and not busy and handed:
                    handoff.put(_FLUSH)  # a lull: write what is prepared now
                    handed = False
                    if once:
                        self._drained()
                if not todo and (now >= next_scan or (once and not busy)):
                    with self._pending_lock:
                        # files that hit a transient failure wait an interval (in
                        # --once mode, for the next run)
                        self._deferred = {
                            n: t for n, t in self._deferred.items() if once or t > now
                        }
                        taken = self._pending | set(self._deferred)
                    todo, deleted = self.spool.scan(skip=taken)
                    if deleted:
                        self._empty(deleted)
                    next_scan = now + (0 if len(todo) >= 4096 else self.cfg.interval)
                    if once and not todo and not busy:
                        break
                sent = 0
                while todo and (pool.capacity if pool is not None else slots - sent) > 0:
                    # many small files go to a worker together; a short list is spread
                    # over every worker
                    size = self._take(todo, max(1, min(_CHUNK, len(todo) // slots)))
                    names, todo = todo[:size], todo[size:]
                    sent += 1
                    with self._pending_lock:
                        self._pending.update(names)
                    if pool is not None:
                        pool.send(names)
                    else:
                        chunk = gather([self._own_stages().run(n) for n in names])
                        self._hand(chunk, handoff)
                        handed = True
                if pool is not None and pool.in_flight:
                    handed = self._take_results(pool, handoff) or handed
                elif not todo:
                    self.stop_event.wait(max(0.0, min(next_scan - time.monotonic(), 1.0)))
            # stopping (or done): what is prepared is written, the rest stays pending;
            # when stopping, what the workers do not finish within a grace period is
            # left to the next run
            grace = time.monotonic() + _STOP_GRACE
            while pool is not None and pool.in_flight:
                if self.stop_event.is_set() and time.monotonic() > grace:
                    for name in pool.abandon():
                        self._settled(name)
                    break
                self._take_results(pool, handoff)
        finally:
            # the worker processes exit while the last batch commits
            closer = threading.Thread(
                target=self._close_pool, args=(pool,), name="ingest-pool-close"
            )
            closer.start()
            handoff.put(None)
            writer.join()
            self._committed.put(None)  # after the writer: every committed file is moved
            archiver.join()
            closer.join()
            if self._stages is not None and self._stages.offloader is not None:
                self._stages.offloader.close()
            self._reporting_done.set()
            self._wake_reporter.set()
            reporter.join(timeout=10)
        return self.stats

    def _take_results(self, pool: WorkerPool, handoff: _Handoff) -> bool:
        """What the workers send back within half a second, handed on; whether any."""
        results = pool.results(timeout=0.5)
        for names, result in sorted(results):
            self._hand(self._chunk(names, result), handoff)
        return bool(results)

    def _workers(self) -> WorkerPool | None:
        if self.cfg.workers == 0:
            return None
        return WorkerPool(
            self.plan, self.cfg.workers, per_worker=_PER_WORKER, timeout=self.cfg.prepare_timeout
        )

    @staticmethod
    def _close_pool(pool: WorkerPool | None) -> None:
        if pool is not None:
            pool.close()

    def _own_stages(self) -> Stages:
        if self._stages is None:
            self._stages = Stages(self.plan)
        return self._stages

    def _hand(self, chunk: Chunk, handoff: _Handoff) -> None:
        failed = tuple(p for p in chunk.others if not self._settled_here(p))
        if chunk.files or failed:
            # blocks while the writer is behind: the backlog stays on disk
            handoff.put(
                dataclasses.replace(chunk, others=failed) if failed != chunk.others else chunk
            )

    def _settled_here(self, p: Prepared) -> bool:
        """A file whose outcome is RETRY is left pending for a later scan, an empty one
        deleted; True for these, False for a failed file (the writer moves it)."""
        if p.outcome is Outcome.EMPTY:
            try:
                deleted = self.spool.delete_empty(p.name)
            except OSError as exc:
                log.error("%s is empty but cannot be deleted: %s", p.name, exc)
                self._defer(p.name)
                deleted = 0
            finally:
                self._settled(p.name)
            if deleted:
                self._empty(deleted)
            return True
        if p.outcome is not Outcome.RETRY:
            return False
        self._defer(p.name)
        if p.error is not None:
            log.warning("%s: %s (%s); will try again", p.name, p.error.reason, p.error.stage.value)
        self._settled(p.name)
        return True

    def _defer(self, name: str) -> None:
        with self._pending_lock:
            self._deferred[name] = time.monotonic() + self.cfg.interval

    def _settled(self, name: str) -> None:
        with self._pending_lock:
            self._pending.discard(name)
            if not self._pending:
                self._pending_lock.notify_all()

    def _drained(self) -> None:
        """Wait until every file handed on is moved (or the writer gave up on it)."""
        with self._pending_lock:
            while self._pending and not self.stop_event.is_set():
                self._pending_lock.wait(0.2)

    def _empty(self, deleted: int) -> None:
        with self._stats_lock:
            self.stats.empty += deleted
        self._count({"empty": deleted})

    # -------------------------------------------------------------------- writer
    def _write_loop(self, handoff: _Handoff) -> None:
        batch = _Batch()
        while True:
            timeout = None
            if batch.chunks:
                timeout = max(0.0, batch.since + self.cfg.batch_seconds - time.monotonic())
            try:
                item = handoff.get(timeout=timeout)
            except queue.Empty:
                batch = self._flush(batch)
                continue
            if item is None:
                if batch.chunks:
                    self._flush(batch)
                return
            if item is _FLUSH:
                batch = self._flush(batch)
                continue
            assert isinstance(item, Chunk)
            for p in item.others:
                assert p.error is not None
                self._fail(p.name, p.error)
            if item.files:
                batch.add(item)
                if self._due(batch):
                    batch = self._flush(batch)
            # commit now when nothing more waits: the files prepared during this commit
            # make the next batch (group commit)
            if batch.chunks and handoff.empty():
                batch = self._flush(batch)

    def _take(self, todo: list[str], size: int) -> int:
        """How many of the first files of `todo` go to a worker together: a file whose
        preparing failed before goes alone, so that it fails alone."""
        if not self._strikes:
            return size
        for i, name in enumerate(todo[:size]):
            if name in self._strikes:
                return max(1, i)
        return size

    def _chunk(self, names: list[str], result: Chunk | Failed) -> Chunk:
        """What came back for `names`. A chunk its worker could not prepare is given
        back to the scan: the one a worker died on (or a stage raised on) is the
        suspect, and each of its files is tried again alone, failing at the stage
        `prepare` the `_STRIKES`th time; chunks that waited behind it are tried again as
        they are; and when workers die before they are ready, the files wait an
        interval (in --once mode, the next run)."""
        if isinstance(result, Chunk):
            if self._strikes:
                for name in names:
                    self._strikes.pop(name, None)
            return result
        reason = result.reason.strip().splitlines()[-1]
        if result.culprit:
            log.error("preparing %s failed: %s", ", ".join(names), result.reason)
        failed = []
        for name in names:
            if result.culprit:
                self._strikes[name] += 1
                tries = self._strikes[name]
                if tries >= _STRIKES:
                    del self._strikes[name]
                    why = f"preparing it failed {tries} times; the last time: {reason}"
                    failed.append(
                        Prepared(name, Outcome.FAILED, error=FileError(Stage.PREPARE, why))
                    )
                    continue
            if not result.ready:
                self._defer(name)
            self._settled(name)  # pending again: the next scan takes it
        return Chunk(others=tuple(failed))

    def _due(self, batch: _Batch) -> bool:
        return bool(batch.chunks) and (
            batch.rows >= self.cfg.batch_rows
            or batch.size >= self.cfg.batch_bytes
            or time.monotonic() - batch.since >= self.cfg.batch_seconds
        )

    def _fail(self, name: str, error: FileError) -> None:
        try:
            self.spool.fail(name, error)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error(
                "%s failed at %s but cannot be moved to failed/: %s", name, error.stage.value, exc
            )
            self._defer(name)
            return
        finally:
            self._settled(name)
        with self._stats_lock:
            self.stats.failed[error.stage.value] += 1
        log.warning(
            "%s failed at %s: %s %s", name, error.stage.value, error.path or "", error.reason
        )
        self._count({f"failed.{error.stage.value}": 1})
        self._event("ingest.file.failed", {"file": name, **error.as_json(name)})
        self._progress()

    # ------------------------------------------------------------------- writing
    def _flush(self, batch: _Batch) -> _Batch:
        """Commit the batch (trying again while the database is unavailable), then move
        its files. Returns a new, empty batch."""
        delay = 0.2
        while True:
            try:
                self._commit(batch.chunks)
                break
            except SinkUnavailable as exc:
                with self._stats_lock:
                    self.stats.retried += 1
                log.warning(
                    "database unavailable (%s); %d files kept, retrying in %.1fs",
                    exc,
                    batch.files,
                    delay,
                )
                self._event("ingest.retry", {"files": batch.files, "reason": str(exc)})
                if self.stop_event.wait(delay):
                    for name in batch.names():  # stopping: the files stay pending
                        self._settled(name)
                    return _Batch()
                delay = min(delay * 2, self.backoff_max)
            except Exception:
                # Not the database's availability: a bug, or the disk. The writer must
                # live on; the files stay pending and are tried again on a later scan.
                log.exception("writing %d files failed; they stay pending", batch.files)
                for name in batch.names():
                    self._defer(name)
                    self._settled(name)
                return _Batch()
        return _Batch()

    def _commit(self, chunks: list[Chunk]) -> None:
        merged: dict[str, list[TableRows]] = {}
        for chunk in chunks:
            for table, table_rows in chunk.rows.items():
                merged.setdefault(table, []).append(table_rows)
        try:
            self.writer.commit_encoded(merged)
        except SinkRejected as exc:
            self._rejected(chunks, exc)
            return
        self._committed.put([f for chunk in chunks for f in chunk.files])

    def _rejected(self, chunks: list[Chunk], exc: SinkRejected) -> None:
        """The database refused some of these rows: the files they came from are found
        by writing the chunks one by one, then a refused chunk's files one by one. A
        chunk's rows are merged, so its files are prepared again, here, one at a time
        (they are still pending, unchanged); the refused ones fail at the sink stage."""
        if len(chunks) > 1:
            for chunk in chunks:
                self._commit([chunk])
            return
        (chunk,) = chunks
        if len(chunk.files) == 1:
            self._fail(chunk.files[0][0], FileError(Stage.SINK, str(exc)))
            return
        for name in chunk.names:
            alone = gather([self._own_stages().run(name)])
            for p in alone.others:
                if not self._settled_here(p):
                    assert p.error is not None
                    self._fail(p.name, p.error)
            if alone.files:
                self._commit([alone])

    # ------------------------------------------------------------------ archiving
    def _archive_loop(self) -> None:
        """Committed files move to archive/ in this thread, so the writer goes on to the
        next batch meanwhile (a move is a system call or two, each file). A file stays
        pending, skipped by the scan, until it is moved."""
        while (files := self._committed.get()) is not None:
            self._archive(files)

    def _archive(self, files: list[tuple[str, int]]) -> None:
        done, rows = len(files), 0  # a vanished file counts as done, as its rows are in
        for name, count in files:
            try:
                self.spool.archive(name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # its rows are in: ingesting it again later changes nothing
                log.error("%s cannot be moved to archive/: %s; will try again", name, exc)
                self._defer(name)
                done -= 1
                continue
            finally:
                self._settled(name)
            rows += count
        with self._stats_lock:
            self.stats.files += done
            self.stats.rows += rows
        self._count({"files": done, "rows": rows})
        self._progress()

    # ------------------------------------------------------------------ visibility
    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.stats)

    def _count(self, counts: Mapping[str, int]) -> None:
        with self._stats_lock:
            self._pending_counts.update(counts)
        self._wake_reporter.set()

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        with self._stats_lock:
            self._events.append((kind, {"spool": self.cfg.name, **data}))
        self._wake_reporter.set()

    def _report_loop(self) -> None:
        """Counters and events reach the store from this thread, so a slow or locked
        store never holds up ingestion; counts wait here until they are stored."""
        while True:
            self._wake_reporter.wait(0.5)
            self._wake_reporter.clear()
            done = self._reporting_done.is_set()
            self._send_reports()
            if done:
                return
            # at most a couple of reports a second, however busy the spool
            self._reporting_done.wait(_REPORT_EVERY)

    def _per_minute(self) -> float:
        """Files archived per minute over about the last minute (since the start, at
        first)."""
        now = time.monotonic()
        self._samples.append((now, self.stats.files))
        while len(self._samples) > 1 and now - self._samples[1][0] >= 60:
            self._samples.popleft()
        t0, f0 = self._samples[0] if now - self._samples[0][0] > 1 else (self.stats.started, 0)
        return round((self.stats.files - f0) / max(now - t0, 1e-3) * 60, 1)

    def _send_reports(self) -> None:
        if self.report is None:
            return
        with self._stats_lock:
            events, self._events = list(self._events), deque(maxlen=_MAX_EVENTS)
            counts = dict(self._pending_counts)
            self._pending_counts.clear()
        try:
            for kind, data in events:
                self.report(self.cfg.name, {}, kind, data)
            if counts:
                self.report(
                    self.cfg.name,
                    counts,
                    "ingest.progress",
                    {
                        "spool": self.cfg.name,
                        "delta": counts,
                        "per_minute": self._per_minute(),
                        "total": self.stats.as_dict(),
                    },
                )
        except Exception as exc:  # visibility must never stop ingestion
            log.warning("cannot record ingest counters and events: %s", exc)
            with self._stats_lock:  # the counts are kept for the next report
                self._pending_counts.update(counts)


def open_ingester(
    spool: SpoolConfig,
    sink: SinkConfig,
    database_url: str,
    blobs: BlobSpec | None,
    report: Report | None = None,
    on_progress: Callable[[IngestStats], None] | None = None,
) -> Ingester:
    """An ingester for a spool and its sink, writing to `sink.database` (else
    `database_url`); the caller closes `ingester.writer` when done."""
    from conveyor.ingest.writer import make_engine

    engine = make_engine(sink.database or database_url, sink.lock_timeout)
    try:
        plan = make_plan(spool, sink, engine, blobs)
    except BaseException:
        engine.dispose()
        raise
    return Ingester(spool, plan, RowWriter(engine, plan.tables), report, on_progress)
