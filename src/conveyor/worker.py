"""The worker: claims tasks in batches, runs them concurrently, keeps their leases alive,
and reports outcomes in batches. It fetches, decides (pure functions in `tasks`), and
persists; nothing else.

Threads: the main loop (claims, cancellations, time-outs, lease expiry), a command loop
that runs all the plain command attempts at once (`executors.loop`, with a launcher
process per four slots), `concurrency` runners that execute the other attempts (Python
handlers, SSH, commands with outputs to keep), a finisher that records outcomes in
batches (so claiming and recording overlap), a heartbeat and a listener for database
notifications.
Runners and the loop share the worker's slots.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from conveyor.app import Conveyor
from conveyor.executors import ExecResult, Executors, TaskContext, reported
from conveyor.executors.loop import CommandLoop, Job, Slots, usable
from conveyor.outputs import Publisher
from conveyor.pipelines import Pipeline
from conveyor.queues import order_queues
from conveyor.store import Unavailable, WorkerInfo
from conveyor.tasks import Outcome, Progress, Task, TaskAction, decide_retry

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerOptions:
    queues: Sequence[str] = ()  # empty: every configured queue
    concurrency: int = 4
    lease: float | None = None  # seconds; None: the config's
    burst: bool = False
    batch: int | None = None  # most tasks claimed at once; None: as many as there is room for
    # Most tasks claimed beyond the free slots (None: eight times `concurrency`), and how
    # soon one must be expected to start for it to be claimed ahead (see `claim_ahead`):
    # the time bound is what keeps other workers from waiting on tasks held here.
    ahead: int | None = None
    ahead_wait: float = 0.05
    poll_interval: float | None = None
    grace: float = 30.0  # on SIGTERM, how long running tasks may take before release
    # Outcomes are written together (group commit): after one arrives, the writer waits
    # while more keep coming, each within `linger` of the last, up to `linger_max` in all.
    linger: float = 0.002
    linger_max: float = 0.01


def claim_ahead(mean_duration: float | None, concurrency: int, most: int, wait: float) -> int:
    """How many tasks to hold claimed beyond the free slots, waiting for one: as many as
    the slots are expected to start within `wait` seconds, given how long attempts take
    lately. None known yet, or long attempts: none, so a waiting task never sits here
    while another worker could run it."""
    if mean_duration is None or most <= 0:
        return 0
    return min(most, int(wait * concurrency / max(mean_duration, 1e-6)))


def claim_threshold(concurrency: int, ahead: int) -> int:
    """The most tasks held (claimed, not returned) at which `claim_wanted` asks for
    more: runners wake the claiming loop only when a returned attempt brings the count
    down to it."""
    return max(concurrency - 1, concurrency + ahead - max(1, ahead // 2))


def claim_wanted(held: int, concurrency: int, ahead: int) -> int:
    """How many tasks to claim now, with `held` claimed and not yet returned: any idle
    slot is filled at once; the tasks held ahead are topped up once half are gone, so
    claims come several tasks at a time rather than one by one as slots free."""
    room = concurrency + ahead - held
    if room <= 0 or (held >= concurrency and room < max(1, ahead // 2)):
        return 0
    return room


@dataclass
class _Running:
    task: Task
    ctx: TaskContext
    pipeline: Pipeline
    deadline: float | None = None  # set when a runner starts it
    started: bool = False  # a runner has begun the attempt (else it waits, claimed ahead)
    began: float = 0.0  # when (time.monotonic)
    finished: bool = False  # the attempt's thread has returned
    settled: bool = False  # its outcome is decided elsewhere (lost, timed out, released)

    def outcome(self, action: TaskAction, **fields: Any) -> Outcome:
        """This attempt's outcome (recorded only while the task is still on it)."""
        return Outcome(self.task.id, action, attempt=self.task.attempts, **fields)


@dataclass(frozen=True)
class _Progressed:
    """Progress a loop's attempt reported, to be written."""

    task_id: int
    attempt: int
    progress: Progress


@dataclass
class WorkerStats:
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    released: int = 0
    lost: int = 0
    started: float = field(default_factory=time.time)


_UNRECORDABLE = "its outcome could not be recorded: "


def _unrecordable(outcome: Outcome, exc: Exception) -> Outcome | None:
    """What to record for an attempt whose outcome the store refused (a bug, or a value
    the database cannot hold): a failure that says why. None: nothing more to try."""
    if outcome.action == TaskAction.RELEASE or (outcome.error or "").startswith(_UNRECORDABLE):
        return None
    return dataclasses.replace(
        outcome,
        action=TaskAction.FAIL,
        result=None,
        delay=0.0,
        error=f"{_UNRECORDABLE}{exc}",
        log=None,  # the log may be what was refused; the error says what happened
    )


class Worker:
    def __init__(self, app: Conveyor, opts: WorkerOptions | None = None) -> None:
        self.app = app
        self.opts = opts or WorkerOptions()
        self.store = app.store
        self.id = new_worker_id()
        cfg = app.config
        self.queues = order_queues(self.opts.queues or cfg.queue_order, cfg.queue_order)
        self.lease = self.opts.lease or cfg.lease
        self.poll = self.opts.poll_interval or cfg.poll_interval
        conc = self.opts.concurrency
        self.ahead = 8 * conc if self.opts.ahead is None else self.opts.ahead
        self.batch = self.opts.batch or max(1, conc + self.ahead)
        # How long attempts take lately (seconds, moving average), for `claim_ahead`.
        self._mean_duration: float | None = None
        self.stats = WorkerStats()
        self.publisher = Publisher(
            lambda: app.artifact_store, app.store, cfg.artifact_settings, app.clock
        )
        # Only the main loop changes _running; the other threads read it.
        self._running: dict[int, _Running] = {}
        self._todo: queue.SimpleQueue[_Running | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[_Running, ExecResult] | None] = queue.SimpleQueue()
        self._recorded: queue.SimpleQueue[list[_Running]] = queue.SimpleQueue()
        self._lost: queue.SimpleQueue[list[_Running]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._hard_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Taken to start a claimed-ahead attempt or to hand it back unstarted, so the two
        # never both happen.
        self._handoff = threading.Lock()
        self._executors = Executors()
        # Attempts handed to the runners, and returned by each runner (each counts only
        # its own): their difference is how many are held, without a look at every one.
        self._started_n = 0
        # The command loop, made when first wanted. One thread for all the plain command
        # attempts: each thread more that wants the interpreter lock costs every thread
        # hand-overs. What can be slow for one command (making its files, waiting while
        # its process starts) is done by the loop's launchers, one for every four slots.
        self._loop: CommandLoop[_Running] | None = None
        self._returned = [0] * (self.opts.concurrency + 1)  # the runners', the loop's
        # Attempts running at once, in the runners and the command loop together.
        self._slots = Slots(self.opts.concurrency)
        self._loop_usable = usable()
        # progress to write, and the results of loop attempts that reported progress
        self._reports: queue.SimpleQueue[_Progressed | tuple[_Running, ExecResult] | None] = (
            queue.SimpleQueue()
        )
        self._reporting: threading.Thread | None = None
        self._claim_below = claim_threshold(self.opts.concurrency, 0)

    # control ------------------------------------------------------------------
    def stop(self, hard: bool = False) -> None:
        """Stop claiming; running tasks finish (or, with `hard`, are released now)."""
        if self._stopping.is_set() or hard:
            self._hard_stop.set()
        self._stopping.set()
        self._wake.set()

    def install_signal_handlers(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping (again to release running tasks now)", signum)
            self.stop()

        for sig in signals:
            signal.signal(sig, on_signal)

    # the loop -----------------------------------------------------------------
    def run(self) -> WorkerStats:
        try:
            self.app.artifacts.prepare()
        except OSError as exc:  # each attempt says so again, with its task
            log.warning("cannot make the folders for logs and work: %s", exc)
        self.store.register_worker(
            WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=tuple(self.queues),
                concurrency=self.opts.concurrency,
            ),
            self.app.clock(),
        )
        runners = [
            self._spawn(lambda i=i: self._runner(i), f"conveyor-task-{i}")
            for i in range(self.opts.concurrency)
        ]
        finisher = self._spawn(self._finisher, "conveyor-finish")
        self._spawn(self._heartbeat_loop, "conveyor-heartbeat")
        self._spawn(self._listen_loop, "conveyor-listen")
        next_expiry = 0.0
        stop_deadline: float | None = None
        try:
            while True:
                now = self.app.clock()
                self._drop_recorded()
                self._handle_lost()
                self._enforce_deadlines(now)
                busy = False
                if now >= next_expiry:
                    next_expiry = now + self.lease / 2
                    self._expire(now)
                if self._stopping.is_set():
                    if stop_deadline is None:
                        stop_deadline = time.monotonic() + self.opts.grace
                        self._release_waiting()
                    if self._hard_stop.is_set() or time.monotonic() >= stop_deadline:
                        self._release_unsettled()
                    if not self._running:
                        break
                else:
                    busy = self._claim(now)
                if self.opts.burst and not self._running and not busy:
                    pending = self._next_pending(now)
                    if pending is None:
                        break
                    # a retry is waiting out its back-off: stay for it
                    self._wake.wait(min(max(pending - now, 0.01), self.poll))
                    self._wake.clear()
                    continue
                if not busy:
                    self._wake.wait(self.poll if not self._running else min(self.poll, 0.2))
                    self._wake.clear()
        finally:
            self._stopping.set()
            self._hard_stop.set()
            self._wake.set()
            self._release_unsettled()
            for _ in runners:
                self._todo.put(None)
            self._wait_runners(10.0)
            if self._loop is not None:
                self._loop.close()
            if self._reporting is not None:
                self._reports.put(None)  # after what the loop handed it
                self._reporting.join(timeout=30)
            self._done.put(None)
            finisher.join(timeout=30)
            try:
                self.store.stop_worker(self.id, self.app.clock())
            except Unavailable:
                log.warning("could not record this worker as stopped: database unavailable")
            for t in self._threads:
                t.join(timeout=5)
            self._executors.close()
        return self.stats

    def _spawn(self, target: object, name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)
        return t

    # claiming -----------------------------------------------------------------
    def _claim(self, now: float) -> bool:
        # An attempt that has returned frees its slot at once, while its outcome is still
        # being written: short commands would otherwise leave slots idle for a round trip.
        held = self._held()
        # Short tasks are claimed ahead of the free slots: a slot that frees starts its
        # next task at once instead of waiting for a claim round trip.
        conc = self.opts.concurrency
        ahead = claim_ahead(self._mean_duration, conc, self.ahead, self.opts.ahead_wait)
        self._claim_below = claim_threshold(conc, ahead)
        wanted = claim_wanted(held, conc, ahead)
        if not wanted:
            return False
        try:
            tasks = self.store.claim(
                self.id,
                self.queues,
                min(wanted, self.batch),
                self.lease,
                now,
                limits=self.app.concurrency_limits,
            )
        except Unavailable as exc:
            log.warning("claim failed, database unavailable: %s", exc)
            self._wake.wait(min(self.poll, 2.0))
            return False
        for task in tasks:
            self._start(task)
        self.stats.claimed += len(tasks)
        return bool(tasks)

    def _start(self, task: Task) -> None:
        app = self.app
        pipeline = app.config.pipelines.get(task.pipeline)
        if pipeline is None:
            # A pipeline removed from the config while its tasks waited.
            self._record(
                [
                    Outcome(
                        task.id,
                        TaskAction.FAIL,
                        error=f"pipeline {task.pipeline!r} is not configured",
                        attempt=task.attempts,
                    )
                ]
            )
            return

        def paths(t: Task = task) -> tuple[str, str]:
            return app.artifacts.attempt_paths(t.request_id, t.id, t.attempts)

        in_loop = self._for_loop(pipeline)
        # a loop's attempts have their progress written by another thread
        report = partial(
            self._report_later if in_loop else self._write_progress, task.id, task.attempts
        )
        ctx = TaskContext(task, paths, report)
        run = _Running(task, ctx, pipeline)
        earlier = self._running.get(task.id)
        if earlier is not None:
            # Claimed again while an earlier attempt still runs here: that one lost its
            # lease (or was cancelled, then retried) before a heartbeat told us.
            self._stop_lost(earlier)
        self._running[task.id] = run
        self._started_n += 1
        if in_loop:
            if self._loop is None:
                self._reporting = self._spawn(self._reporter, "conveyor-progress")
                self._loop = self._make_loop(pipeline)
            self._loop.submit(run)
        else:
            self._todo.put(run)

    def _write_progress(self, task_id: int, attempt: int, progress: Progress) -> None:
        try:
            self.store.report_progress(self.id, task_id, progress, self.app.clock(), attempt)
        except Unavailable:
            pass  # progress is advisory; the outcome is what must not be lost
        except Exception as exc:  # nor may a report the database refuses stop the attempt
            log.warning("task %s: its progress could not be written: %s", task_id, exc)

    def _report_later(self, task_id: int, attempt: int, progress: Progress) -> None:
        self._reports.put(_Progressed(task_id, attempt, progress))

    def _reporter(self) -> None:
        """Write the progress that the command loop's attempts report (a loop must not
        wait on the database), and hand on the results of those that reported, after
        their progress."""
        while True:
            item = self._reports.get()
            if item is None:
                return
            try:
                if isinstance(item, _Progressed):
                    self._write_progress(item.task_id, item.attempt, item.progress)
                else:
                    self._done.put(item)
            except Exception:  # the thread must outlive any one failure
                log.exception("reporting progress failed")

    def _for_loop(self, pipeline: Pipeline) -> bool:
        """Whether the command loop runs this pipeline's attempts: plain commands, with
        nothing to do around them that could block a loop (uploads, loading results)."""
        return (
            self._loop_usable
            and pipeline.executor == "command"
            and pipeline.load_sqlite is None
            and not self.publisher.wanted(pipeline)
        )

    def _held(self) -> int:
        """Attempts handed to the runners and not yet returned."""
        return self._started_n - sum(self._returned)

    def _returned_one(self, runner: int) -> None:
        self._returned[runner] += 1
        # Woken only when a claim is due: a wake-up per attempt costs more than a short
        # command's whole run on an otherwise idle machine.
        if self._held() <= self._claim_below or self._stopping.is_set():
            self._wake.set()

    def _runner(self, i: int) -> None:
        while True:
            run = self._todo.get()
            if run is None:
                return
            self._slots.take()
            try:
                if self._begin(run, i):
                    try:
                        result = self._attempt(run)
                    except Exception as exc:  # its result must be recorded all the same
                        log.exception("running task %s failed", run.task.id)
                        result = ExecResult(ok=False, error=f"worker error: {exc}")
                    self._end(run, result, i)
            finally:
                self._slots.give()

    def _attempt(self, run: _Running) -> ExecResult:
        try:
            if run.pipeline.outputs:
                self.publisher.before_attempt(run.pipeline, run.ctx)
            result = self._executors.run(run.pipeline, run.ctx, run.deadline)
            if result.ok and run.pipeline.load_sqlite is not None:
                if run.ctx.stopping:  # its time ran out, say: nothing is loaded
                    result = run.ctx.stopped_before("its result was loaded")
                else:
                    result = self._load_output(run, result)
        except Exception as exc:  # an executor bug must not lose the task
            log.exception("executor failed on task %s", run.task.id)
            result = ExecResult(ok=False, error=f"executor error: {exc}")
        finally:
            run.ctx.flush_progress()
            run.ctx.close()
        return self._keep_outputs(run, result)

    def _begin(self, run: _Running, i: int) -> bool:
        """Start `run` (its deadline runs from now), unless it was handed back or
        cancelled while it waited: then it is returned, not started, and False."""
        with self._handoff:
            if not run.settled:
                run.started = True
                timeout = run.task.timeout
                run.deadline = self.app.clock() + timeout if timeout else None
        if not run.started:
            run.finished = True
            self._done.put((run, ExecResult(ok=False, error="not started")))
            self._returned_one(i)
            return False
        run.began = time.monotonic()
        return True

    def _end(self, run: _Running, result: ExecResult, i: int, after_progress: bool = False) -> None:
        """An attempt has returned: its result goes to the finisher (`after_progress`:
        through the thread writing progress, after the progress it reported), its slot
        is free."""
        took = time.monotonic() - run.began
        mean = self._mean_duration
        # Updated without a lock: a lost update only nudges an estimate.
        self._mean_duration = took if mean is None else mean + (took - mean) / 16
        run.finished = True
        if after_progress:
            self._reports.put((run, result))
        else:
            self._done.put((run, result))
        self._returned_one(i)

    def _make_loop(self, pipeline: Pipeline) -> CommandLoop[_Running]:
        i = self.opts.concurrency  # its count in `_returned`

        def begin(run: _Running) -> Job | None:
            return Job(run.pipeline, run.ctx, run.deadline) if self._begin(run, i) else None

        def end(run: _Running, result: ExecResult) -> None:
            try:
                run.ctx.flush_progress()
                run.ctx.close()
            finally:
                # A loop does not wait on the database: the progress an attempt reported
                # is written by another thread, and its result must follow it.
                self._end(run, reported(run.pipeline, result), i, run.ctx.reported)

        return CommandLoop(
            self._executors.command(pipeline),
            self._slots,
            begin,
            end,
            "conveyor-commands",
            launchers=-(-self.opts.concurrency // 4),
        )

    def _load_output(self, run: _Running, result: ExecResult) -> ExecResult:
        """The pipeline's `load_sqlite`: the task succeeds only once its result file is
        in the database (a failure to load is a failed attempt, retried by policy)."""
        from conveyor.ingest.loader import LoadError, LoadStopped, ResultFileRefused, result_file
        from conveyor.pipelines import TemplateError, attempt_context, command_values

        load = run.pipeline.load_sqlite
        assert load is not None
        task = run.task
        # made by whoever ran the command: not made again here
        work_dir = run.ctx.make_work_dir(False) if run.pipeline.work_dir else None
        context = attempt_context(task, work_dir, sys.executable)
        try:
            path = result_file(
                load,
                command_values(task.params, context),
                None if work_dir is None else Path(work_dir),
            )
            loaded = self.app.load_sqlite(
                path,
                load.mapping,
                task.request_id,
                task.id,
                load.database,
                # an attempt stopped meanwhile (its time ran out, say) keeps nothing
                stop=lambda: (run.ctx.stop_reason or "stopped") if run.ctx.stopping else None,
            )
        except LoadStopped:
            return run.ctx.stopped_before("its result was loaded")
        except ResultFileRefused as exc:  # the same again on every attempt: not retried
            run.ctx.log(f"load_sqlite failed: {exc}")
            return ExecResult(ok=False, error=f"load_sqlite: {exc}", retryable=False)
        except (LoadError, TemplateError, Unavailable) as exc:
            run.ctx.log(f"load_sqlite failed: {exc}")
            return ExecResult(ok=False, error=f"load_sqlite: {exc}")
        run.ctx.log(f"loaded {path}: {', '.join(f'{n} {t}' for t, n in loaded.rows.items())}")
        value = result.result
        if value is None or isinstance(value, dict):
            value = {**(value or {}), "loaded": dict(loaded.rows)}
        return ExecResult(ok=True, result=value)

    def _keep_outputs(self, run: _Running, result: ExecResult) -> ExecResult:
        """Upload the attempt's outputs (and log) here, in the attempt's thread: uploads
        are bounded in time and never hold up claiming; a failed upload fails the attempt."""
        # A run whose time ran out is settled too; its log is still kept (the one most
        # looked into), its outcome already recorded.
        if (run.settled and not run.ctx.timed_out) or not self.publisher.wanted(run.pipeline):
            return result
        try:
            return self.publisher.after_attempt(run.pipeline, run.ctx, result)
        except Exception as exc:  # a bug here must not lose the task
            log.exception("keeping the outputs of task %s failed", run.task.id)
            return ExecResult(ok=False, error=f"keeping outputs failed: {exc}")

    # recording outcomes ------------------------------------------------------------
    def _outcome(self, run: _Running, res: ExecResult) -> Outcome:
        task = run.task
        # A quiet attempt's log goes with its outcome, stamped once: an outcome written
        # again (its first write's answer lost) does not add it twice.
        quiet = run.ctx.quiet_log
        kept: dict[str, Any] = {"log": quiet, "logged_at": self.app.clock()} if quiet else {}
        if res.ok:
            return run.outcome(TaskAction.SUCCEED, result=res.result, **kept)
        if not res.retryable:
            return run.outcome(TaskAction.FAIL, error=res.error, **kept)
        decision = decide_retry(task.attempts, task.max_attempts, run.pipeline.retry)
        return run.outcome(decision.action, error=res.error, delay=decision.delay, **kept)

    @staticmethod
    def _write_quiet_log(run: _Running) -> None:
        """A settled attempt's outcome is not recorded here: a quiet log it holds goes
        to its file after all."""
        try:
            run.ctx.write_quiet_log()
        except OSError as exc:
            log.warning("cannot write the log of task %s: %s", run.task.id, exc)

    def _finisher(self) -> None:
        """Record finished attempts, as many at a time as finish together."""
        stop = False
        while not stop:
            item = self._done.get()
            if item is None:
                return
            items, stop = self._gather(item)
            outcomes = []
            for run, res in items:
                if run.settled:  # read once: what it says decides where a quiet log goes
                    self._write_quiet_log(run)
                else:
                    outcomes.append(self._outcome(run, res))
            self._record(outcomes)
            self._recorded.put([run for run, _ in items])
            self._wake.set()

    def _gather(
        self, first: tuple[_Running, ExecResult]
    ) -> tuple[list[tuple[_Running, ExecResult]], bool]:
        """`first` and the outcomes that follow it closely: while attempts keep finishing
        they share one write, up to `linger_max` and twice `concurrency` outcomes; a lone
        outcome waits `linger` at most, and not at all when no other attempt runs. This
        thread sleeps `linger` and then takes what
        came, rather than waking for each outcome. Also says whether the stop marker
        came meanwhile."""
        items = [first]
        most = max(16, 2 * self.opts.concurrency)
        until = time.monotonic() + self.opts.linger_max
        slept = False
        while True:
            came = 0
            while not self._done.empty():
                item = self._done.get()
                if item is None:
                    return items, True
                items.append(item)
                came += 1
            if len(items) >= most or (slept and not came):
                break  # enough, or the burst is over
            if not self._held():
                break  # no attempt is running that could join them
            left = min(self.opts.linger, until - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
            slept = True
        return items, False

    def _record(self, outcomes: list[Outcome], patient: bool = True) -> None:
        """Write outcomes, retrying while the database is away: an attempt's result is
        never dropped while the worker lives (if it dies, the lease expires instead).
        One the database refuses for its value (`Refused`, or refused before it is
        sent), or for any other reason for as long as a lease lasts (`patient`), is
        recorded as a failure that says why; the others as they are."""
        if not outcomes:
            return
        delay = 0.2
        began = time.monotonic()
        while True:
            try:
                applied = set(self.store.finish(self.id, outcomes, self.app.clock()))
                break
            except Exception as exc:
                away = isinstance(exc, Unavailable)  # tried again for as long as it takes
                unplaced = patient and not isinstance(exc, Unavailable | ValueError | TypeError)
                if away or (
                    unplaced
                    and time.monotonic() - began < self.lease
                    and not self._hard_stop.is_set()
                ):
                    log.warning(
                        "cannot record outcomes (%s); retrying in %.1fs",
                        exc,
                        delay,
                        exc_info=unplaced,
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                if len(outcomes) > 1:
                    for one in outcomes:
                        self._record([one], patient=False)
                    return
                instead = _unrecordable(outcomes[0], exc)
                log.error("cannot record the outcome of task %s: %s", outcomes[0].task_id, exc)
                if instead is None:
                    return
                outcomes = [instead]
        for o in outcomes:
            if o.task_id not in applied:
                self.stats.lost += 1  # cancelled or expired meanwhile: not ours any more
            elif o.action == TaskAction.SUCCEED:
                self.stats.succeeded += 1
            elif o.action == TaskAction.FAIL:
                self.stats.failed += 1
            elif o.action == TaskAction.RETRY:
                self.stats.retried += 1
            elif o.action == TaskAction.RELEASE:
                self.stats.released += 1

    def _drop_recorded(self) -> None:
        while not self._recorded.empty():
            for run in self._recorded.get():
                # By attempt, not task id: a retry's next attempt may be claimed (under
                # the same id) before the previous attempt is dropped.
                if self._running.get(run.task.id) is run:
                    del self._running[run.task.id]

    def _enforce_deadlines(self, now: float) -> None:
        for run in list(self._running.values()):
            if run.deadline is not None and now >= run.deadline and not run.settled:
                # A command is killed by its executor; a Python handler cannot be killed,
                # so it is asked to stop and its attempt is failed now. Its slot stays
                # taken until its thread returns, so concurrency is honoured.
                why = run.ctx.time_up()
                if run.pipeline.executor == "python":
                    run.settled = True
                    res = ExecResult(ok=False, error=why)
                    self._record([self._outcome(run, res)])

    def _handle_lost(self) -> None:
        while not self._lost.empty():
            for run in self._lost.get():
                self._stop_lost(run)

    def _stop_lost(self, run: _Running) -> None:
        """Stop an attempt the store no longer has this worker on; its outcome is not
        recorded."""
        if run.settled or run.finished:
            return
        log.info(
            "task %s (attempt %s) was cancelled or its lease lost: stopping it",
            run.task.id,
            run.task.attempts,
        )
        run.settled = True
        run.ctx.stop("cancelled")
        self.stats.lost += 1

    def _release_waiting(self) -> None:
        """Hand back, at once, the tasks claimed ahead that no runner has started."""
        with self._handoff:
            waiting = [r for r in self._running.values() if not r.started and not r.settled]
            for run in waiting:
                run.settled = True
        if waiting:
            self._record([r.outcome(TaskAction.RELEASE) for r in waiting])

    def _release_unsettled(self) -> None:
        """Hand running attempts back to the queue (their attempt not counted)."""
        unsettled = [r for r in self._running.values() if not r.settled and not r.finished]
        for run in unsettled:
            run.settled = True
            run.ctx.stop("worker stopping")
        if unsettled:
            self._record([r.outcome(TaskAction.RELEASE) for r in unsettled])

    def _wait_runners(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(not r.finished for r in list(self._running.values())):
            if time.monotonic() > deadline:
                log.warning("some attempts did not stop in time; leaving them")
                return
            time.sleep(0.05)

    def _next_pending(self, now: float) -> float | None:
        """When the next queued task of this worker's open queues becomes claimable."""
        try:
            return self.store.next_available(self.queues)
        except Unavailable:
            return now + self.poll

    def _expire(self, now: float) -> None:
        try:
            expired = self.store.expire_leases(now, self.app.retry_policies)
        except Unavailable:
            return
        if expired:
            log.info("returned %d tasks with expired leases", len(expired))

    # background threads ----------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        interval = max(0.2, min(self.lease / 3, 2.0))
        while not self._hard_stop.wait(interval):
            # One snapshot. Only what this worker still holds is renewed (attempts whose
            # outcome or release is not yet recorded included): a task it lost track of
            # is not kept alive.
            held = list(self._running.values())
            runs = [r for r in held if not r.settled]
            running = sum(1 for r in runs if r.started and not r.finished)
            ids = {r.task.id for r in held}
            try:
                owned = self.store.heartbeat(self.id, self.lease, self.app.clock(), running, ids)
            except Unavailable as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            except Exception:  # the heartbeat must outlive any one failure
                log.exception("heartbeat failed")
                continue
            # The attempts themselves, not task ids: a task claimed again meanwhile is on
            # a new attempt, which is not lost.
            lost = [r for r in runs if r.task.id not in owned and not r.finished]
            if lost:
                self._lost.put(lost)
                self._wake.set()

    def _listen_loop(self) -> None:
        listener = self.store.listener()
        try:
            while not self._stopping.is_set():
                if listener.wait(self.poll):
                    self._wake.set()
        finally:
            listener.close()
