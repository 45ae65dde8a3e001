"""Run a task as a local command: an argv template filled from the task's params, never a
shell string. The command runs in a process group of its own, so a timeout, a cancel or
a stopping worker kills everything it started."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

from conveyor.executors import ExecResult, TaskContext, parse_progress_line
from conveyor.executors.launcher import (
    LEFTOVER_READS,
    Launcher,
    LauncherGone,
    Lines,
    command_line,
    cwd_problem,
    fixed_path,
    killpg,
    log_end,
    which,
)
from conveyor.executors.watchdog import Watchdog
from conveyor.pipelines import (
    TASK_VARIABLES,
    Pipeline,
    TemplateError,
    attempt_context,
    attempt_env,
    command_values,
    render_argv,
)

log = logging.getLogger(__name__)

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


_DEVNULL: list[int] = []
_DEVNULL_LOCK = threading.Lock()


def _devnull() -> int:
    """Every command's standard input: /dev/null, opened once for the process (Popen
    would open and close it for each command)."""
    if not _DEVNULL:
        with _DEVNULL_LOCK:
            if not _DEVNULL:
                _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux 5.3 and later);
    None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class CommandExecutor:
    """With a `watchdog`, the commands die with the worker even if it is SIGKILLed.

    Spawning stays on CPython's fast path (`vfork`): no `preexec_fn`, and the new
    session comes from `start_new_session`."""

    def __init__(self, watchdog: Watchdog | None = None) -> None:
        self.watchdog = watchdog
        # Read once: `dict(os.environ)` decodes every variable again on each call. The
        # environment every command starts from, then given its pipeline's and its own.
        self.environ = dict(os.environ)
        # An attempt's own variables come from Conveyor alone: a worker started inside
        # another task (or a pipeline without work directories) passes on none of its.
        for name in TASK_VARIABLES:
            self.environ.pop(name, None)
        # Where the worker was started: where a pipeline without work directories runs
        # its commands unless it sets `cwd`.
        self.started_in = os.path.abspath(".")
        # Where a program named without a directory was found, by (name, PATH).
        self._found: dict[tuple[str, str | None], str] = {}

    def _program(self, name: str, path: str | None) -> str | None:
        """The absolute path of a program named without a directory, looked up in PATH
        once (`which`). None: the child looks it up (also where a PATH entry is
        relative: relative to the command's working directory, not the worker's)."""
        if "/" in name or not fixed_path(path):
            return None
        return which(self._found, name, path)

    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult:
        """Run one attempt to its end in this thread."""
        attempt = self.start(pipeline, ctx, deadline)
        if isinstance(attempt, ExecResult):
            return attempt
        poller = select.poll()
        attempt.watch(poller)
        try:
            while True:
                attempt.check(time.time())
                if attempt.result is not None:
                    return attempt.result
                wait = attempt.wait_ms(time.time())
                if attempt.pidfd is None and attempt.eof:
                    # no pidfd and nothing left to read: wait for the exit itself
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        attempt.proc.wait(wait / 1000)
                    continue
                for fd, _ in poller.poll(wait):
                    attempt.ready(fd)
        except BaseException:
            attempt.abandon()  # its command does not outlive the failure
            raise

    def _prepare(
        self, pipeline: Pipeline, ctx: TaskContext, make: bool = True
    ) -> tuple[list[str], str, dict[str, str], str] | ExecResult:
        """An attempt's command line, working directory, additions to the environment
        and work directory ("" for a pipeline with `work_dir = false`); or the result of
        an attempt whose command line is wrong. `make`: make its work directory (else
        its launcher does)."""
        task = ctx.task
        work_dir = _absolute(ctx.make_work_dir(make)) if pipeline.work_dir else None
        context = attempt_context(task, work_dir, sys.executable)
        try:
            argv = render_argv(pipeline.command, command_values(task.params, context))
        except TemplateError as exc:
            return ExecResult(ok=False, error=str(exc), retryable=False)
        cwd = _absolute(pipeline.cwd) if pipeline.cwd else (work_dir or self.started_in)
        changes = attempt_env(pipeline.env, task, work_dir)
        return argv, cwd, changes, work_dir or ""

    def launch(
        self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None, launcher: Launcher
    ) -> Launched | ExecResult:
        """Have `launcher` run an attempt's command (see `executors.launcher`); it
        makes the work directory too."""
        prepared = self._prepare(pipeline, ctx, make=False)
        if isinstance(prepared, ExecResult):
            return prepared
        argv, cwd, changes, work_dir = prepared
        key = launcher.run(argv, cwd, changes, _absolute(ctx.log_file), work_dir)
        return Launched(launcher, key, ctx, deadline, command_line(argv))

    def start(
        self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None
    ) -> Attempt | ExecResult:
        """Start an attempt's command in this process; the running `Attempt`, or the
        result of one that could not start."""
        prepared = self._prepare(pipeline, ctx)
        if isinstance(prepared, ExecResult):
            return prepared
        argv, cwd, changes, _ = prepared
        env = self.environ.copy()
        env.update(changes)
        program = self._program(argv[0], env.get("PATH"))
        # The output pipe is made here, not by Popen: its read end stays a bare
        # descriptor (Popen would wrap it in a file object, three system calls more).
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                proc = self._spawn(argv, program, cwd, env, out_w)
            except FileNotFoundError:
                if program is None or cwd_problem(cwd) is not None:
                    raise
                # moved or removed since it was found: look again
                self._found.pop((argv[0], env.get("PATH")), None)
                proc = self._spawn(argv, None, cwd, env, out_w)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument, say
            os.close(out_r)
            problem = cwd_problem(cwd) if isinstance(exc, OSError) else None
            if problem is not None:
                why = f"cannot start {argv[0]}: its working directory {cwd}: {problem}"
            else:
                why = f"cannot start {argv[0]}: {getattr(exc, 'strerror', None) or exc}"
            ctx.log(command_line(argv))
            ctx.log(why)
            return ExecResult(ok=False, error=why, retryable=False)
        finally:
            os.close(out_w)  # the command holds it now
        if self.watchdog is not None:
            self.watchdog.started(proc.pid)
        attempt = Attempt(proc, out_r, _pidfd(proc.pid), ctx, deadline, self.watchdog)
        try:
            # Logged once the command runs, so opening the log overlaps its start; still
            # the first line, as its output is read only after this.
            ctx.log(command_line(argv))
        except BaseException:
            attempt.abandon()  # cannot log (the disk is full?): it must not run unseen
            raise
        return attempt

    def _spawn(
        self, argv: list[str], program: str | None, cwd: str, env: dict[str, str], out: int
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            executable=program,
            stdin=_devnull(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _absolute(path: str) -> str:
    """`path` made absolute, in this process's working directory: a launcher's own
    is the last command's."""
    return path if path[:1] == "/" else os.path.abspath(path)


class Running:
    """What a running command attempt does whoever runs its process: it is killed (its
    whole process group: SIGTERM, then SIGKILL after a grace) when its deadline passes
    or it is asked to stop, and its exit code decides its result."""

    STOP_CHECK_MS = 200  # how often, at most, a stop request or deadline is looked at

    def __init__(self, ctx: TaskContext, deadline: float | None) -> None:
        self.ctx = ctx
        self.deadline = deadline
        self._killing: str | None = None  # why it is being killed
        self._sigkill_at: float | None = None  # when it gets SIGKILL (time.monotonic)
        self.result: ExecResult | None = None

    def wait_ms(self, now: float) -> int:
        """How long its driver may wait before `check` must run again."""
        wait = self.STOP_CHECK_MS
        if self._sigkill_at is not None:
            wait = min(wait, int((self._sigkill_at - time.monotonic()) * 1000) + 1)
        elif self._killing is None and self.deadline is not None:
            wait = min(wait, int((self.deadline - now) * 1000) + 1)
        return max(wait, 0)

    def check(self, now: float) -> None:
        """Act on what time alone tells: a stop request, the deadline, a kill's grace
        running out."""
        if self.result is not None:
            return
        if self._killing is None:
            why = self.ctx.why_stop(self.deadline, now)
            if why is not None:
                self._kill(why)
        elif self._sigkill_at is not None and time.monotonic() >= self._sigkill_at:
            self._signal(signal.SIGKILL)
            self._sigkill_at = None  # sent: now only its exit is waited for

    def _kill(self, reason: str) -> None:
        """SIGTERM the whole process group now, SIGKILL what is left after a grace."""
        self._killing = reason
        self._sigkill_at = time.monotonic() + KILL_GRACE
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        raise NotImplementedError

    def _settle(self, code: int) -> None:
        """It has exited with `code`: its result."""
        if self._killing is not None:
            self.result = ExecResult(ok=False, error=self._killing)
        elif code == 0:
            self.result = ExecResult(ok=True, result={"exit_code": 0})
        elif code < 0:
            self.result = ExecResult(ok=False, error=f"killed by signal {-code}")
        else:
            self.result = ExecResult(ok=False, error=f"exit code {code}")


class Launched(Running):
    """A command that a command loop's launcher runs (`executors.launcher`): the
    launcher writes its log and reports its progress lines and exit, and signals it
    when asked."""

    def __init__(
        self,
        launcher: Launcher,
        key: int,
        ctx: TaskContext,
        deadline: float | None,
        header: str,
    ) -> None:
        super().__init__(ctx, deadline)
        self.launcher = launcher
        self.key = key
        self.header = header  # its log's first line, the command line
        self.pid: int | None = None  # once the launcher has said

    def _signal(self, sig: int) -> None:
        if self.result is not None:
            return
        try:
            self.launcher.kill(self.key, sig, self._killing or "stopped")
            self.launcher.flush()
        except LauncherGone:
            # Its loop sees the launcher stop and kills what it ran (`lost`), unless this
            # attempt is let go first (`abandon`): then the signal goes from here.
            if self.pid is not None:
                killpg(self.pid, sig)

    def progress(self, line: str) -> None:
        progress = parse_progress_line(line)
        if progress is not None:
            self.ctx.report(progress)

    def exited(self, code: int, killed: str | None, quiet: bool = False) -> None:
        """It has exited with `code`; `killed`: the reason the launcher logged for the
        kill that ended it, None if it ended before any kill reached it (then its log
        and result both say how it ended); `quiet`: it printed nothing, and the launcher
        wrote no log: its whole log, the command line and the exit code, is kept with
        its outcome (see `TaskContext.keep_quiet_log`)."""
        self._killing = killed
        if quiet:
            self.ctx.keep_quiet_log(f"{self.header}\n{log_end(code)}")
        self._settle(code)

    def failed(self, why: str, retryable: bool) -> None:
        """It did not run, or its log could not be written (and it was killed)."""
        self.result = ExecResult(ok=False, error=why, retryable=retryable)

    def lost(self, why: str) -> None:
        """Its launcher has stopped without reporting its end: kill it (by its group
        id: not reported reaped, it still holds it) and fail it with `why`."""
        if self.result is not None:
            return
        if self.pid is not None:
            killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            if not os.path.lexists(self.ctx.log_file):
                self.ctx.log(self.header)  # the launcher opens a log at the first output
            self.ctx.log(f"killed: {why}" if self.pid is not None else why)
        self.result = ExecResult(ok=False, error=why)

    def abandon(self) -> None:
        """Kill it at once and let go of it (its loop is going away, or failed); the
        launcher reaps it."""
        if self.result is not None:
            return
        self._killing = self._killing or self.ctx.stop_reason or "stopped"
        self._signal(signal.SIGKILL)
        self.result = ExecResult(ok=False, error=self._killing)


class Attempt(Running):
    """One running command started in this process, moved along a step at a time by
    whoever waits on its descriptors: `CommandExecutor.run` for one attempt in its
    thread, or a `CommandLoop` without a launcher for many in one thread.

    It waits for output and for the exit together: the exit through a pidfd (a
    descriptor that becomes readable when the process ends), so a command's end is seen
    at once, without polling waitpid in a sleeping loop. The output pipe stays blocking:
    it is read once each time poll(2) says it is readable, which returns at once.
    Without a pidfd (not Linux, or before 5.3), the exit is looked for between polls."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        fd: int,
        pidfd: int | None,
        ctx: TaskContext,
        deadline: float | None,
        watchdog: Watchdog | None,
    ) -> None:
        super().__init__(ctx, deadline)
        self.proc = proc
        self.fd = fd
        self.pidfd = pidfd
        self._watchdog = watchdog
        self._poller: select.poll | None = None
        self._lines = Lines()
        self.eof = False
        self._closed = False  # its descriptors are closed

    def watch(self, poller: select.poll) -> None:
        """Register its descriptors with `poller`; they leave it as they close."""
        self._poller = poller
        poller.register(self.fd, select.POLLIN)
        if self.pidfd is not None:
            poller.register(self.pidfd, select.POLLIN)

    def fds(self) -> list[int]:
        return [self.fd] if self.pidfd is None else [self.fd, self.pidfd]

    def ready(self, fd: int) -> None:
        """`fd`, one of its descriptors, is readable."""
        if fd == self.fd:
            if not self.eof:
                self._take()
        elif fd == self.pidfd:
            self._exited()

    def check(self, now: float) -> None:
        """As `Running.check`; and, without a pidfd, look for an exit."""
        if self.result is None and self.pidfd is None and self.proc.poll() is not None:
            self._exited()
            return
        super().check(now)

    def _signal(self, sig: int) -> None:
        killpg(self.proc.pid, sig)

    def _take(self) -> None:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            if self._poller is not None:
                self._poller.unregister(self.fd)
            return
        for raw, starts in self._lines.feed(chunk):
            self._line(raw, starts)

    def _line(self, raw: bytes, starts: bool) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        progress = parse_progress_line(line) if starts else None
        if progress is not None:
            self.ctx.report(progress)
        self.ctx.log(line)

    def _exited(self) -> None:
        """The command has exited: anything it left running in its group goes with it;
        take the output already written (a pipe holds 64 KiB: what comes after is a
        leftover's, which may write for ever), and settle the result."""
        try:
            self._signal(signal.SIGKILL)
            for _ in range(LEFTOVER_READS):
                if self.eof or not _readable(self.fd):
                    break
                self._take()
            last = self._lines.end()
            if last is not None:
                self._line(*last)
        finally:
            self._close()  # tells the watchdog before the reaping frees the process id
        code = self.proc.wait()
        self.ctx.log(log_end(code, self._killing))
        self._settle(code)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self.fds():
            if self._poller is not None and (fd != self.fd or not self.eof):
                with contextlib.suppress(KeyError):  # never registered: watch() failed
                    self._poller.unregister(fd)
            os.close(fd)
        if self._watchdog is not None:
            self._watchdog.ended(self.proc.pid)
            self._watchdog = None

    def abandon(self) -> None:
        """Kill it at once and let go of it (its driver is going away, or failed).
        Never raises: what it cannot log is lost, the process is still reaped."""
        if self.result is not None:
            return
        self._killing = self._killing or self.ctx.stop_reason or "stopped"
        if not self._closed:  # else `_exited` has run as far as its SIGKILL at least
            try:
                self._exited()
            except Exception:
                log.exception("could not log the end of a killed command")
        if self.result is None:
            self._close()
            self.proc.wait()
            self.result = ExecResult(ok=False, error=self._killing)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
