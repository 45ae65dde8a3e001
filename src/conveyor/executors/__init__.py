"""Executors: how one attempt of a task runs. Each returns an `ExecResult`; the worker
decides what it means for the task."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.executors.launcher import PROGRESS_PREFIX as PROGRESS_PREFIX
from conveyor.executors.launcher import make_dir, open_log, progress_of
from conveyor.pipelines import Pipeline
from conveyor.tasks import Progress, Task

if TYPE_CHECKING:
    from conveyor.executors.command import CommandExecutor


TIMED_OUT = "timed out"  # the stop reason of an attempt whose time ran out


def _finite(value: object) -> bool:
    """A real number (not a bool) that a float holds, neither nan nor infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def parse_progress_line(line: str) -> Progress | None:
    """`conveyor:progress 3/10 reading logs` -> Progress(3, 10, 'reading logs')."""
    parsed = progress_of(line)
    return None if parsed is None else Progress(*parsed)


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    result: Any = None
    error: str | None = None
    retryable: bool = True


class TaskContext:
    """What a running attempt can see and do: its params, progress reports, its log,
    and whether it has been asked to stop (cancel, timeout, worker shutdown)."""

    def __init__(
        self,
        task: Task,
        paths: Callable[[], tuple[str | Path, str | Path]],
        report: Callable[[Progress], None],
        min_report_interval: float = 0.5,
    ) -> None:
        self.task = task
        self._paths = paths  # (log file, work dir), worked out when first needed
        self._resolved: tuple[str, str] | None = None
        self._work_made = False
        self._report = report
        self._interval = min_report_interval
        self._last_report = 0.0
        self._pending: Progress | None = None
        self.reported = False  # it has reported progress
        # Made only when somebody waits: most attempts never need one.
        self._stop_event: threading.Event | None = None
        self._stopped = False
        self.stop_reason: str | None = None
        self._log: int | None = None  # the log's file descriptor, opened for appending
        # A quiet attempt's whole log, not written to a file (see `keep_quiet_log`).
        self._quiet: str | None = None
        # Guards the rare shared moments of this context (opening its log, making its
        # stop event); one per context, so one task's slow file system work never holds
        # up another's.
        self._lock = threading.Lock()

    def _where(self) -> tuple[str, str]:
        if self._resolved is None:
            log, work = self._paths()
            self._resolved = (os.fspath(log), os.fspath(work))
        return self._resolved

    @property
    def log_path(self) -> Path:
        return Path(self._where()[0])

    @property
    def log_file(self) -> str:
        """`log_path` as a string (no `Path` made)."""
        return self._where()[0]

    @property
    def work_dir(self) -> Path:
        """A scratch directory of the task's own, made on first use."""
        return Path(self.make_work_dir())

    def make_work_dir(self, make: bool = True) -> str:
        """The work directory's path, made if it is not yet (`make` false: whoever
        runs the command makes it)."""
        path = self._where()[1]
        if make and not self._work_made:
            make_dir(path)
            self._work_made = True
        return path

    @property
    def params(self) -> Any:
        return self.task.params

    @property
    def attempt(self) -> int:
        return self.task.attempts

    # progress ---------------------------------------------------------------
    def progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        self.report(Progress(current, total, message))

    def report(self, progress: Progress) -> None:
        for name, value in (("current", progress.current), ("total", progress.total)):
            if not (_finite(value) or (name == "total" and value is None)):
                raise ValueError(f"progress {name} must be a finite number, not {value!r}")
        self.reported = True
        now = time.monotonic()
        # Stored at most every `_interval` seconds; the last value is flushed at the end.
        if now - self._last_report >= self._interval:
            self._last_report = now
            self._pending = None
            self._report(progress)
        else:
            self._pending = progress

    def flush_progress(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._report(pending)

    # log --------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = message if message.endswith("\n") else message + "\n"
        with self._lock:
            if self._log is None:
                self._log = open_log(self._where()[0])
            self._write(line)

    def _write(self, text: str) -> None:
        """Append `text` to the open log, after the quiet log held back (it comes first)."""
        assert self._log is not None
        if self._quiet is not None:
            text, self._quiet = self._quiet + text, None
        data = text.encode("utf-8", "replace")
        # Unbuffered: each line is in the file (for readers following it) once written.
        while data:
            data = data[os.write(self._log, data) :]

    def keep_quiet_log(self, text: str) -> None:
        """The attempt's command printed nothing: `text` (its command line and how it
        ended) is its whole log, which goes with its outcome into the database rather
        than into a file of its own. Whatever is logged after this goes to the file,
        `text` first."""
        # as a file would hold it: the command line may hold what UTF-8 cannot (a lone
        # surrogate from JSON params), which no database takes
        text = text.encode("utf-8", "replace").decode("utf-8")
        with self._lock:
            self._quiet = text

    @property
    def quiet_log(self) -> str | None:
        """The log held back by `keep_quiet_log`, unless it has gone to the file since."""
        return self._quiet

    def write_quiet_log(self) -> None:
        """Write the log held back to the file after all (its outcome will not be
        recorded: the attempt was settled otherwise, a time-out, say)."""
        with self._lock:
            if self._quiet is None:
                return
            opened = self._log is None
            if opened:
                self._log = open_log(self._where()[0])
            try:
                self._write("")
            finally:
                if opened and self._log is not None:
                    os.close(self._log)
                    self._log = None

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                os.close(self._log)
                self._log = None

    # stopping ---------------------------------------------------------------
    def stop(self, reason: str) -> None:
        with self._lock:
            if self._stopped:
                return
            self.stop_reason = reason
            self._stopped = True
            event = self._stop_event
        if event is not None:
            event.set()

    @property
    def stopping(self) -> bool:
        return self._stopped

    @property
    def timed_out(self) -> bool:
        """Stopped because its time ran out (not cancelled, nor its worker stopping)."""
        return self._stopped and self.stop_reason == TIMED_OUT

    def time_up(self) -> str:
        """Its time has run out: stopped so, and what to say of it."""
        self.stop(TIMED_OUT)
        return f"timed out after {self.task.timeout:g}s"

    def why_stop(self, deadline: float | None, now: float) -> str | None:
        """Why the attempt is to stop at `now`, or None: its time is up (`deadline` has
        passed, or the worker saw it pass first), or it was stopped (cancel, shutdown)."""
        if self.timed_out or (deadline is not None and now >= deadline):
            return self.time_up()
        if self._stopped:
            return self.stop_reason or "stopped"
        return None

    def stopped_before(self, what: str) -> ExecResult:
        """The result of an attempt stopped before `what` ("its outputs were kept")."""
        why = f"stopped before {what} ({self.stop_reason})"
        self.log(f"conveyor: {why}")
        return ExecResult(ok=False, error=why)

    def wait_stop(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking early if asked to stop; True if asked."""
        with self._lock:
            if self._stop_event is None:
                self._stop_event = threading.Event()
                if self._stopped:
                    self._stop_event.set()
            event = self._stop_event
        return event.wait(timeout)


class Executor(Protocol):
    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult: ...


def executor_for(pipeline: Pipeline) -> Executor:
    if pipeline.executor == "command":
        from conveyor.executors.command import CommandExecutor

        return CommandExecutor()
    if pipeline.executor == "ssh":
        from conveyor.executors.ssh import SshExecutor

        return SshExecutor()
    from conveyor.executors.python import PythonExecutor

    return PythonExecutor()


class Executors:
    """A worker's executors, one of each kind, made when first needed and shared by its
    runners: what spans tasks (an SSH host's busy slots) is counted in one place."""

    def __init__(self) -> None:
        from conveyor.executors.watchdog import Watchdog

        self._made: dict[str, Executor] = {}
        self._lock = threading.Lock()
        self.watchdog = Watchdog()

    def _make(self, pipeline: Pipeline) -> Executor:
        if pipeline.executor == "command":
            from conveyor.executors.command import CommandExecutor

            return CommandExecutor(self.watchdog)
        return executor_for(pipeline)

    def close(self) -> None:
        self.watchdog.close()

    def _get(self, pipeline: Pipeline) -> Executor:
        executor = self._made.get(pipeline.executor)
        if executor is None:
            with self._lock:
                executor = self._made.get(pipeline.executor) or self._make(pipeline)
                self._made[pipeline.executor] = executor
        return executor

    def command(self, pipeline: Pipeline) -> CommandExecutor:
        """The command executor, for a pipeline whose attempts a `CommandLoop` runs."""
        from conveyor.executors.command import CommandExecutor

        executor = self._get(pipeline)
        assert isinstance(executor, CommandExecutor)
        return executor

    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult:
        return reported(pipeline, self._get(pipeline).run(pipeline, ctx, deadline))


def reported(pipeline: Pipeline, result: ExecResult) -> ExecResult:
    """A result as it is reported: paths in the submitter's terms (P:/..., not
    /mnt/p/...)."""
    if result.ok and pipeline.paths.path_map and result.result is not None:
        from conveyor.paths import reverse, rewrite_prefixes

        mapped = rewrite_prefixes(result.result, reverse(pipeline.paths.path_map))
        return ExecResult(ok=True, result=mapped, error=result.error)
    return result
