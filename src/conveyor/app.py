"""The application object: the one place the CLI, the API and the dashboard go through.
It checks what is asked, turns it into store verbs, and holds no state of its own but
the config, the store and the artifacts."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from conveyor.artifacts import (
    Artifact,
    ArtifactError,
    ArtifactKind,
    ArtifactMissing,
    ArtifactStore,
    LocalArtifacts,
    Readable,
    latest_outputs,
    open_artifact_store,
)
from conveyor.config import Config
from conveyor.events import Event
from conveyor.group_commit import SubmitBatcher
from conveyor.ingest.loader import (
    LoadError,
    LoadResult,
    SqliteMapping,
    file_key,
    load_sqlite,
    task_key,
)
from conveyor.ingest.offload import BlobSpec
from conveyor.ingest.pipeline import Ingester, IngestStats, open_ingester
from conveyor.ingest.settings import BUILTIN_KCIDB, SinkConfig, SpoolConfig
from conveyor.ingest.spool import pending_files
from conveyor.ingest.writer import describe, make_engine
from conveyor.jsonvalues import problem_in
from conveyor.logs import AttemptLog
from conveyor.pipelines import ParamsError, Pipeline, json_path
from conveyor.queues import ALL_QUEUES, QueueStats
from conveyor.requests import CachePolicy, NewRequest, Request
from conveyor.retention import Pruned
from conveyor.stats import (
    DURATION_BUCKETS,
    ActivityRow,
    IngestTotals,
    PipelineTotals,
    StatusCount,
)
from conveyor.store import (
    NotFound,
    RequestFilter,
    Store,
    Submitted,
    Unavailable,
    WorkerInfo,
    open_store,
)
from conveyor.tasks import RetryPolicy, Task
from conveyor.tokens import Role, Token, hash_secret, needs_touch, new_token, plausible

log = logging.getLogger(__name__)


class UnknownPipeline(LookupError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        names = ", ".join(sorted(known)) or "none configured"
        super().__init__(f"unknown pipeline {name!r} (known: {names})")
        self.name = name


class UnknownSink(LookupError):
    pass


class WaitTimeout(TimeoutError):
    def __init__(self, request: Request, timeout: float) -> None:
        super().__init__(f"request {request.id} still {request.status.value} after {timeout:g}s")
        self.request = request


@dataclass(frozen=True)
class SubmitOptions:
    queue: str | None = None
    priority: int | None = None
    idempotency_key: str | None = None
    submitter: str | None = None
    cache: CachePolicy = field(default_factory=CachePolicy)


class Conveyor:
    def __init__(
        self, config: Config, store: Store | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.store = store or open_store(config.database_url)
        self.artifacts = LocalArtifacts(config.artifacts_dir)
        self.clock = clock
        self._batcher: SubmitBatcher | None = None
        self._artifact_store: ArtifactStore | None = None
        self._artifact_lock = threading.Lock()

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        if self._artifact_store is not None:
            self._artifact_store.close()
        self.store.close()

    @property
    def artifact_store(self) -> ArtifactStore:
        """Where outputs are kept (opened on first use)."""
        with self._artifact_lock:
            if self._artifact_store is None:
                s = self.config.artifact_settings
                self._artifact_store = open_artifact_store(
                    s.url,
                    timeout=s.timeout,
                    retries=s.retries,
                    endpoint_url=s.endpoint_url,
                    region=s.region,
                    profile=s.profile,
                )
            return self._artifact_store

    # pipelines --------------------------------------------------------------
    def pipeline(self, name: str) -> Pipeline:
        try:
            return self.config.pipelines[name]
        except KeyError:
            raise UnknownPipeline(name, list(self.config.pipelines)) from None

    def pipelines(self) -> list[Pipeline]:
        return [self.config.pipelines[name] for name in sorted(self.config.pipelines)]

    @property
    def retry_policies(self) -> Mapping[str, RetryPolicy]:
        return {name: p.retry for name, p in self.config.pipelines.items()}

    @property
    def concurrency_limits(self) -> Mapping[str, int]:
        return {n: p.concurrency for n, p in self.config.pipelines.items() if p.concurrency}

    # requests ---------------------------------------------------------------
    def prepare(self, pipeline_name: str, params: Any, opts: SubmitOptions) -> NewRequest:
        """Check a submission and build what the store takes; raises UnknownPipeline or
        ParamsError (naming the JSON path)."""
        pipeline = self.pipeline(pipeline_name)
        check_json(params)
        task_params = pipeline.check_params(params)
        return NewRequest(
            pipeline=pipeline.name,
            params=params,
            task_params=task_params,
            queue=opts.queue or pipeline.queue,
            priority=pipeline.priority if opts.priority is None else opts.priority,
            max_attempts=pipeline.retry.max_attempts,
            timeout=pipeline.timeout,
            idempotency_key=opts.idempotency_key,
            submitter=opts.submitter,
            cache=opts.cache,
            cache_ttl=pipeline.cache,
        )

    def submit(self, pipeline: str, params: Any, opts: SubmitOptions | None = None) -> Submitted:
        new = self.prepare(pipeline, params, opts or SubmitOptions())
        return self.store.submit(new, self.clock())

    def submit_grouped(
        self, pipeline: str, params: Any, opts: SubmitOptions | None = None
    ) -> Future[Submitted]:
        """Check the submission now, store it together with the other submissions
        waiting at the same moment (one transaction for all; see `group_commit`). For
        servers answering many clients at once."""
        new = self.prepare(pipeline, params, opts or SubmitOptions())
        if self._batcher is None:
            self._batcher = SubmitBatcher(self.store, self.clock)
        return self._batcher.submit(new)

    def get(self, request_id: int, with_tasks: bool = True) -> Request:
        req = self.store.get_request(request_id, with_tasks=with_tasks)
        if req is None:
            raise NotFound(f"no request {request_id}")
        return req

    def list_requests(self, flt: RequestFilter) -> list[Request]:
        return self.store.list_requests(flt)

    def cancel(self, request_id: int) -> Request:
        return self.store.cancel_request(request_id, self.clock())

    def retry(self, request_id: int) -> Request:
        req = self.get(request_id, with_tasks=False)
        extra = (
            self.config.pipelines[req.pipeline].retry.max_attempts
            if (req.pipeline in self.config.pipelines)
            else 1
        )
        return self.store.retry_request(request_id, extra, self.clock())

    def wait(
        self,
        request_id: int,
        timeout: float | None,
        on_update: Callable[[Request], None] | None = None,
        poll: float = 0.5,
    ) -> Request:
        """Block until the request is finished; raises WaitTimeout."""
        start = time.monotonic()
        delay = min(0.05, poll)
        listener = self.store.listener()
        try:
            while True:
                req = self.get(request_id)
                if on_update is not None:
                    on_update(req)
                if req.status.terminal:
                    return req
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    raise WaitTimeout(req, timeout or 0)
                listener.wait(delay if left is None else min(delay, left))
                delay = min(delay * 2, poll)
        finally:
            listener.close()

    # tasks ------------------------------------------------------------------
    def task(self, task_id: int) -> Task:
        found = self.store.get_task(task_id)
        if found is None:
            raise NotFound(f"no task {task_id}")
        return found

    def task_logs(self, task_id: int) -> tuple[Task, dict[int, AttemptLog]]:
        """The task, and the log of each attempt that has one, oldest first: a file, or
        for a quiet attempt the text the database keeps."""
        task = self.task(task_id)
        return task, self._logs(task)

    def _logs(self, task: Task) -> dict[int, AttemptLog]:
        kept = self.store.attempt_logs(task.id)
        files = self.artifacts.attempts_logged(task.request_id, task.id, task.attempts)
        return {n: self._attempt_log(task, n, kept) for n in sorted(set(files).union(kept))}

    def _attempt_log(self, task: Task, attempt: int, kept: dict[int, str]) -> AttemptLog:
        text = kept.get(attempt)
        path = self.artifacts.log_path(task.request_id, task.id, attempt)
        return AttemptLog(attempt, path, None if text is None else text.encode())

    def log(self, task_id: int, attempt: int | None = None) -> AttemptLog:
        """An attempt's log (default: the latest attempt's); NotFound if it has none."""
        return self.task_log(self.task(task_id), attempt)

    def task_log(self, task: Task, attempt: int | None = None) -> AttemptLog:
        """`log` of a task at hand."""
        logs = self._logs(task)
        if not logs:
            raise NotFound(f"task {task.id} has no log yet")
        chosen = attempt if attempt is not None else max(logs)
        if chosen not in logs:
            raise NotFound(f"task {task.id} has no log for attempt {chosen}")
        return logs[chosen]

    # artifacts --------------------------------------------------------------
    def task_artifacts(self, task_id: int) -> list[Artifact]:
        """What the task kept: its latest attempt's outputs and every attempt's log."""
        self.task(task_id)  # NotFound for an unknown task
        return latest_outputs(self.store.list_artifacts(task_id=task_id))

    def get_with_outputs(self, request_id: int) -> tuple[Request, dict[int, list[Artifact]]]:
        """A request with its tasks and each task's artifacts (one read)."""
        found = self.store.get_request_artifacts(request_id)
        if found is None:
            raise NotFound(f"no request {request_id}")
        req, artifacts = found
        return req, _by_task(artifacts)

    def artifact(self, task_id: int, name: str) -> Artifact:
        """One of the task's artifacts by name (an output before a log of that name)."""
        found = [a for a in self.task_artifacts(task_id) if a.name == name]
        found.sort(key=lambda a: (a.kind != ArtifactKind.OUTPUT, -a.attempt))
        if not found:
            raise NotFound(f"task {task_id} has no artifact {name!r}")
        return found[0]

    def open_artifact(self, artifact: Artifact) -> Readable:
        return self.artifact_store.open(artifact.key)

    def artifact_link(self, artifact: Artifact) -> str | None:
        """A time-limited download link, when `[artifacts] presign` asks for them and the
        store can make them; None: download through Conveyor."""
        seconds = self.config.artifact_settings.presign
        return self.artifact_store.link(artifact.key, seconds) if seconds > 0 else None

    # retention --------------------------------------------------------------
    def prune(
        self,
        older_than: float,
        batch: int = 500,
        on_batch: Callable[[Pruned], None] | None = None,
    ) -> Pruned:
        """Delete requests that finished more than `older_than` seconds ago, with all
        that was recorded and kept about them: the rows first, a batch per transaction,
        then each batch's files (logs, work dirs, stored outputs) once it committed."""
        cutoff = self.clock() - older_than
        total = Pruned()
        while True:
            done = self.store.prune(cutoff, batch)
            if not done.requests:
                break
            self._forget_files(done)
            total += done
            if on_batch is not None:
                on_batch(done)
        self.store.prune_unattached(cutoff)
        return total

    def prunable(self, older_than: float) -> Pruned:
        """What `prune(older_than)` would delete."""
        return self.store.count_prunable(self.clock() - older_than)

    def _forget_files(self, done: Pruned) -> None:
        for rid in done.request_ids:
            for kind in ("logs", "work"):
                shutil.rmtree(self.artifacts.root / kind / str(int(rid)), ignore_errors=True)
        for key in done.artifact_keys:
            try:
                self.artifact_store.delete(key)
            except ArtifactMissing:
                pass
            except ArtifactError as exc:
                # The row is gone already: the object is an orphan, not a dangling link.
                log.warning("could not delete artifact %s: %s", key, exc)

    # queues and workers -------------------------------------------------------
    def pause(self, queue: str | None = None) -> None:
        self.store.pause(queue or ALL_QUEUES, self.clock())

    def resume(self, queue: str | None = None) -> None:
        self.store.resume(queue or ALL_QUEUES, self.clock())

    def queues(self) -> list[QueueStats]:
        stats = {q.name: q for q in self.store.queue_stats()}
        paused = self.store.paused_queues()
        everything = ALL_QUEUES in paused
        ordered = list(self.config.queue_order) + sorted(set(stats) - set(self.config.queue_order))
        return [
            stats.get(name) or QueueStats(name=name, paused=everything or name in paused)
            for name in ordered
        ]

    def queue(self, name: str) -> QueueStats:
        """One queue's state (`*`: whether everything is paused)."""
        if name == ALL_QUEUES:
            return QueueStats(name=name, paused=ALL_QUEUES in self.store.paused_queues())
        found = next((q for q in self.queues() if q.name == name), None)
        return found or QueueStats(name=name, paused=False)

    def workers(self, alive_only: bool = False) -> list[WorkerInfo]:
        since = self.clock() - 3 * self.config.lease if alive_only else None
        return self.store.list_workers(alive_since=since)

    def events(
        self, after_id: int = 0, request_id: int | None = None, limit: int = 1000
    ) -> list[Event]:
        return self.store.events(after_id, request_id, limit)

    def latest_event_id(self) -> int:
        return self.store.latest_event_id()

    # figures (the dashboard and the metrics) ---------------------------------
    def status_counts(self) -> list[StatusCount]:
        return self.store.status_counts()

    def activity(self, window: float, width: float) -> list[ActivityRow]:
        """Tasks that succeeded or failed in the last `window` seconds (from the start
        of a bucket), counted in `width`-second buckets."""
        since = (self.clock() - window) // width * width
        return self.store.activity(since, width)

    def pipeline_totals(self) -> list[PipelineTotals]:
        return self.store.pipeline_totals(DURATION_BUCKETS)

    def lease_expiries(self) -> int:
        return self.store.count_events("task.lease_expired")

    def ingest_totals(self) -> list[IngestTotals]:
        """Each ingest source's totals, for the dashboard and the metrics: every
        configured spool and every spool that has counters. None while there is none:
        both then show nothing about ingestion."""
        counters = self.store.ingest_counters()
        names = sorted(set(self.config.spools) | set(counters))
        if not names:
            return []
        rates = self.store.ingest_rates(self.clock() - 300)
        out = []
        for name in names:
            c = counters.get(name, {})
            spool = self.config.spools.get(name)
            out.append(
                IngestTotals(
                    source=name,
                    files=c.get("files", 0),
                    records=c.get("rows", 0),
                    failed=sum(v for k, v in c.items() if k.startswith("failed.")),
                    pending=pending_files(spool.dir) if spool is not None else 0,
                    per_minute=round(rates.get(name, 0.0), 1),
                )
            )
        return out

    def failed_tasks(
        self, limit: int = 50, before_id: int | None = None, text: str | None = None
    ) -> list[Task]:
        return self.store.failed_tasks(limit, before_id, text)

    def ready(self) -> None:
        """Raises Unavailable when the database cannot be reached."""
        self.store.ping()

    # ingestion ------------------------------------------------------------------
    def sink(self, name: str) -> SinkConfig:
        found = self.config.sinks.get(name)
        if found is not None:
            return found
        if name == BUILTIN_KCIDB.name:
            return BUILTIN_KCIDB
        known = sorted({*self.config.sinks, BUILTIN_KCIDB.name})
        raise UnknownSink(f"unknown sink {name!r} (known: {', '.join(known)})")

    def ingester(
        self, spool: SpoolConfig, on_progress: Callable[[IngestStats], None] | None = None
    ) -> Ingester:
        """An ingester for the spool, its counters and events kept in this store."""
        if spool.blobs is not None:
            blobs = BlobSpec(url=str(spool.blobs))
        else:  # the artifact store, wherever it is (a directory, or S3)
            a = self.config.artifact_settings
            blobs = BlobSpec(
                url=a.url,
                timeout=a.timeout,
                retries=a.retries,
                endpoint_url=a.endpoint_url,
                region=a.region,
                profile=a.profile,
            )
        return open_ingester(
            spool,
            self.sink(spool.sink),
            self.config.database_url,
            blobs,
            report=self.record_ingest,
            on_progress=on_progress,
        )

    def record_ingest(
        self, spool: str, counts: Mapping[str, int], kind: str, data: dict[str, Any]
    ) -> None:
        self.store.record_ingest(spool, counts, self.clock(), kind, data)

    def load_sqlite(
        self,
        file: Path,
        mapping: SqliteMapping,
        request_id: int | None = None,
        task_id: int | None = None,
        database: str | None = None,
        stop: Callable[[], str | None] | None = None,
    ) -> LoadResult:
        """Load a SQLite result file into the database, all or nothing; loading the same
        task's (or, with no task, the same file's) output again replaces it. `stop`:
        see `ingest.loader.load_sqlite` (LoadStopped)."""
        engine = make_engine(database or self.config.database_url)
        key = task_key(task_id) if task_id is not None else file_key(file)
        try:
            return load_sqlite(engine, file, mapping, key, self.clock(), request_id, task_id, stop)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sqlite3.OperationalError) as exc:
            # sqlite3's own come from BEGIN, run on the driver's connection, or from reading
            # the result file: locked, unreadable; worth trying again
            raise Unavailable(describe(exc)) from exc
        except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
            # refused elsewhere than in a table's rows (those say which): in a line, not
            # with the statement's parameters
            raise LoadError(f"{file}: the database refused the load: {describe(exc)}") from exc
        finally:
            engine.dispose()

    def ingest_counters(self) -> dict[str, dict[str, int]]:
        """Per spool: files (archived), rows, empty, failed.<stage> — for /metrics."""
        return self.store.ingest_counters()

    # API tokens -------------------------------------------------------------------
    def create_token(self, name: str, role: Role) -> tuple[Token, str]:
        """A new token: its record, and the token itself, which is shown only now."""
        new, secret = new_token(name, role)
        return self.store.create_token(new, self.clock()), secret

    def list_tokens(self) -> list[Token]:
        return self.store.list_tokens()

    def revoke_token(self, name_or_id: str) -> Token:
        return self.store.revoke_token(name_or_id, self.clock())

    def session_token(self, token_hash: str) -> Token | None:
        """The active token a login session was opened with, or None (revoked since)."""
        token = self.store.token_by_hash(token_hash)
        return token if token is not None and token.active else None

    def authenticate(self, secret: str) -> Token | None:
        """The active token this is, or None; notes when the token was last used."""
        if not plausible(secret):
            return None
        token = self.store.token_by_hash(hash_secret(secret))
        if token is None or not token.active:
            return None
        now = self.clock()
        if needs_touch(token, now):
            self.store.touch_token(token.id, now)
        return token


def _by_task(artifacts: Sequence[Artifact]) -> dict[int, list[Artifact]]:
    by_task: dict[int, list[Artifact]] = {}
    for a in artifacts:
        by_task.setdefault(a.task_id, []).append(a)
    return {tid: latest_outputs(found) for tid, found in by_task.items()}


def check_json(value: Any) -> None:
    """Params are stored as JSON: refuse what the stores cannot keep exactly
    (`jsonvalues`), naming where it is."""
    found = problem_in(value)
    if found is not None:
        raise ParamsError(json_path(found[0]), found[1])
