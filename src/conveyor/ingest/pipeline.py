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

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from conveyor.ingest.offload import BlobSpec
from conveyor.ingest.prepare import (
    Outcome,
    Plan,
    Prepared,
    Stages,
    adopt_stages,
    init_process,
    prepare_in_process,
)
from conveyor.ingest.settings import SinkConfig, SpoolConfig
from conveyor.ingest.sinks import TableSpec, spec_of
from conveyor.ingest.sinks.kcidb import kcidb_specs
from conveyor.ingest.sinks.table import TableMapping
from conveyor.ingest.spool import FileError, Spool, Stage
from conveyor.ingest.writer import RowWriter, SinkRejected, SinkUnavailable, TableRows

log = logging.getLogger(__name__)
_FLUSH = object()  # to the writer: commit what you have now
_REPORT_EVERY = 0.5  # seconds between reports of counters and events
_MAX_EVENTS = 1000  # events waiting for the store; beyond, the oldest are dropped
_CHUNK = 32  # most files sent to a worker process at once

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
        self._items: deque[list[Prepared] | object | None] = deque()
        self._cond = threading.Condition()
        self._rows = self._size = 0
        self.max_rows, self.max_size = rows, size

    @staticmethod
    def _weight(item: list[Prepared] | object | None) -> tuple[int, int]:
        if not isinstance(item, list):
            return 0, 0
        return sum(max(1, p.count) for p in item), sum(p.size for p in item)

    def put(self, item: list[Prepared] | object | None) -> None:
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

    def get(self, timeout: float | None = None) -> list[Prepared] | object | None:
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
    files: list[Prepared] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    since: float = 0.0

    def add(self, p: Prepared) -> None:
        if not self.files:
            self.since = time.monotonic()
        self.files.append(p)
        self.rows += p.count
        self.size += p.size


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
        # files whose rows are committed, (name, rows) per batch, on their way to archive/
        self._committed: queue.SimpleQueue[list[tuple[str, int]] | None] = queue.SimpleQueue()

    def stop(self) -> None:
        self.stop_event.set()

    # -------------------------------------------------------------------- main loop
    def run(self, once: bool = False) -> IngestStats:
        """Ingest until stopped (or, with `once`, until the spool is empty).

        This thread scans and feeds the worker processes; a writer thread takes what they
        prepared through a bounded queue and commits it in batches, so preparing goes on
        while a batch commits; an archive thread then moves the committed files."""
        self.spool.ensure()
        pool, inline = self._workers()
        handoff = _Handoff(self.cfg.batch_rows, self.cfg.batch_bytes)
        writer = threading.Thread(target=self._write_loop, args=(handoff,), name="ingest-writer")
        writer.start()
        archiver = threading.Thread(target=self._archive_loop, name="ingest-archive")
        archiver.start()
        reporter = threading.Thread(target=self._report_loop, name="ingest-report", daemon=True)
        reporter.start()
        slots = max(2, 4 * self.cfg.workers)
        inflight: dict[Future[list[Prepared]], list[str]] = {}
        todo: list[str] = []
        next_scan = 0.0
        handed = False
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if not todo and not inflight and handed:
                    handoff.put(_FLUSH)  # a lull: write what is prepared now
                    handed = False
                    if once:
                        self._drained()
                if not todo and (now >= next_scan or (once and not inflight)):
                    with self._pending_lock:
                        # files that hit a transient failure wait an interval (in
                        # --once mode, for the next run)
                        self._deferred = {
                            n: t for n, t in self._deferred.items() if once or t > now
                        }
                        busy = self._pending | set(self._deferred)
                    ready, deleted = self.spool.scan(skip=busy)
                    todo = [r.name for r in ready]
                    if deleted:
                        self._empty(deleted)
                    next_scan = now + (0 if len(ready) >= 4096 else self.cfg.interval)
                    if once and not todo and not inflight:
                        break
                while todo and len(inflight) < slots:
                    # many small files go to a worker together; a short list is spread
                    # over every worker
                    size = max(1, min(_CHUNK, len(todo) // slots))
                    names, todo = todo[:size], todo[size:]
                    with self._pending_lock:
                        self._pending.update(names)
                    if pool is not None:
                        inflight[pool.submit(prepare_in_process, names)] = names
                    else:
                        assert inline is not None
                        fut: Future[list[Prepared]] = Future()
                        fut.set_result([inline.run(n) for n in names])
                        inflight[fut] = names
                if inflight:
                    done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in sorted(done, key=lambda f: inflight[f]):
                        self._hand(self._result(fut, inflight.pop(fut)), handoff)
                        handed = True
                elif not todo:
                    self.stop_event.wait(max(0.0, min(next_scan - time.monotonic(), 1.0)))
            # stopping (or done): what is prepared is written, the rest stays pending
            for fut, names in list(inflight.items()):
                self._hand(self._result(fut, names), handoff)
        finally:
            handoff.put(None)
            writer.join()
            self._committed.put(None)  # after the writer: every committed file is moved
            archiver.join()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if inline is not None and inline.offloader is not None:
                inline.offloader.close()
            self._reporting_done.set()
            self._wake_reporter.set()
            reporter.join(timeout=10)
        return self.stats

    def _workers(self) -> tuple[ProcessPoolExecutor | None, Stages | None]:
        workers = self.cfg.workers
        if workers == 0:
            return None, Stages(self.plan)
        # Forking is instant and safe while this process has one thread (`conveyor
        # ingest`); beside other threads (`conveyor up`) only a fresh interpreter is.
        if threading.active_count() == 1:
            warm = Stages(self.plan)  # the children inherit it built and warm
            warm.warm()
            return ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=adopt_stages,
                initargs=(warm, os.getpid()),
            ), None
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_process,
            initargs=(self.plan, os.getpid()),
        ), None

    def _hand(self, prepared: list[Prepared], handoff: _Handoff) -> None:
        kept = []
        for p in prepared:
            if p.outcome is Outcome.RETRY:
                self._defer(p.name)
                if p.error is not None:
                    log.warning(
                        "%s: %s (%s); will try again", p.name, p.error.reason, p.error.stage.value
                    )
                self._settled(p.name)
            else:
                kept.append(p)
        if kept:
            handoff.put(kept)  # blocks while the writer is behind: the backlog stays on disk

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
            if batch.files:
                timeout = max(0.0, batch.since + self.cfg.batch_seconds - time.monotonic())
            try:
                item = handoff.get(timeout=timeout)
            except queue.Empty:
                batch = self._flush(batch)
                continue
            if item is None:
                if batch.files:
                    self._flush(batch)
                return
            if item is _FLUSH:
                batch = self._flush(batch)
                continue
            assert isinstance(item, list)
            for p in item:
                if p.outcome is Outcome.FAILED:
                    assert p.error is not None
                    self._fail(p.name, p.error)
                    continue
                batch.add(p)
                if self._due(batch):
                    batch = self._flush(batch)
            # commit now when nothing more waits: the files prepared during this commit
            # make the next batch (group commit)
            if batch.files and handoff.empty():
                batch = self._flush(batch)

    @staticmethod
    def _result(fut: Future[list[Prepared]], names: list[str]) -> list[Prepared]:
        try:
            return fut.result()
        except Exception as exc:  # a worker process died, or a bug in a stage
            log.exception("preparing %s failed", ", ".join(names))
            err = FileError(Stage.READ, str(exc))
            return [Prepared(name, Outcome.RETRY, error=err) for name in names]

    def _due(self, batch: _Batch) -> bool:
        return bool(batch.files) and (
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
                self._commit(batch.files)
                break
            except SinkUnavailable as exc:
                with self._stats_lock:
                    self.stats.retried += 1
                log.warning(
                    "database unavailable (%s); %d files kept, retrying in %.1fs",
                    exc,
                    len(batch.files),
                    delay,
                )
                self._event("ingest.retry", {"files": len(batch.files), "reason": str(exc)})
                if self.stop_event.wait(delay):
                    for p in batch.files:  # stopping: the files stay pending
                        self._settled(p.name)
                    return _Batch()
                delay = min(delay * 2, self.backoff_max)
            except Exception:
                # Not the database's availability: a bug, or the disk. The writer must
                # live on; the files stay pending and are tried again on a later scan.
                log.exception("writing %d files failed; they stay pending", len(batch.files))
                for p in batch.files:
                    self._defer(p.name)
                    self._settled(p.name)
                return _Batch()
        return _Batch()

    def _commit(self, files: list[Prepared]) -> None:
        merged: dict[str, list[TableRows]] = {}
        for p in files:
            for table, table_rows in p.rows.items():
                merged.setdefault(table, []).append(table_rows)
        try:
            self.writer.commit_encoded(merged)
        except SinkRejected as exc:
            if len(files) == 1:
                self._fail(files[0].name, FileError(Stage.SINK, str(exc)))
                return
            # One file's rows were refused: find it by writing them one by one.
            for p in files:
                self._commit([p])
            return
        self._committed.put([(p.name, p.count) for p in files])

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
