"""Run a task as a local command: an argv template filled from the task's params, never a
shell string. The command runs in a process group of its own, so a timeout, a cancel or
a stopping worker kills everything it started."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

from conveyor.executors import ExecResult, TaskContext, parse_progress_line
from conveyor.executors.watchdog import Watchdog
from conveyor.pipelines import Pipeline, TemplateError, command_values, render_argv

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL


def kill_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """SIGTERM the command's whole process group, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
        # Read once: `dict(os.environ)` decodes every variable again on each call.
        self._environ = dict(os.environ)
        # Where a program named without a directory was found, by (name, PATH).
        self._found: dict[tuple[str, str | None], str] = {}

    def _program(self, name: str, path: str | None) -> str | None:
        """The absolute path of a program named without a directory, looked up in PATH
        once: left to the child, every spawn tries each PATH entry in turn (a failed
        execve for each entry before the right one). None: the child looks it up."""
        if "/" in name:
            return None
        found = self._found.get((name, path))
        if found is None:
            found = shutil.which(name, path=path)
            # Only absolute: a relative PATH entry means relative to the command's cwd.
            if found is None or not os.path.isabs(found):
                return None
            self._found[(name, path)] = found
        return found

    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult:
        task = ctx.task
        work_dir = ctx.make_work_dir()
        context = {
            "request_id": task.request_id,
            "task_id": task.id,
            "attempt": task.attempts,
            "work_dir": work_dir,
            "python": sys.executable,
        }
        try:
            argv = render_argv(pipeline.command, command_values(task.params, context))
        except TemplateError as exc:
            return ExecResult(ok=False, error=str(exc), retryable=False)
        env = self._environ.copy()
        env.update(pipeline.env)
        env.update(
            CONVEYOR_REQUEST_ID=str(task.request_id),
            CONVEYOR_TASK_ID=str(task.id),
            CONVEYOR_ATTEMPT=str(task.attempts),
            CONVEYOR_WORK_DIR=work_dir,
        )
        program = self._program(argv[0], env.get("PATH"))
        # The output pipe is made here, not by Popen: its read end stays a bare
        # descriptor (Popen would wrap it in a file object, three system calls more).
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                proc = self._spawn(argv, program, pipeline.cwd or work_dir, env, out_w)
            except FileNotFoundError:
                if program is None:
                    raise
                # moved or removed since it was found: look again
                self._found.pop((argv[0], env.get("PATH")), None)
                proc = self._spawn(argv, None, pipeline.cwd or work_dir, env, out_w)
        except OSError as exc:
            os.close(out_r)
            ctx.log(f"$ {' '.join(argv)}")
            ctx.log(f"cannot start {argv[0]}: {exc.strerror}")
            return ExecResult(
                ok=False, error=f"cannot start {argv[0]}: {exc.strerror}", retryable=False
            )
        finally:
            os.close(out_w)  # the command holds it now
        if self.watchdog is not None:
            self.watchdog.started(proc.pid)
        # Logged once the command runs, so opening the log overlaps its start; still the
        # first line, as its output is read only after this.
        ctx.log(f"$ {' '.join(argv)}")
        try:
            reason = self._pump(proc, out_r, ctx, deadline)
            if reason is not None:
                kill_group(proc)
                ctx.log(f"killed: {reason}")
                return ExecResult(ok=False, error=reason)
            code = proc.wait()
            # Anything the command left running in its group goes with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        finally:
            if self.watchdog is not None:
                self.watchdog.ended(proc.pid)
        ctx.log(f"exit code {code}")
        if code == 0:
            return ExecResult(ok=True, result={"exit_code": 0})
        if code < 0:
            return ExecResult(ok=False, error=f"killed by signal {-code}")
        return ExecResult(ok=False, error=f"exit code {code}")

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

    def _pump(
        self, proc: subprocess.Popen[bytes], fd: int, ctx: TaskContext, deadline: float | None
    ) -> str | None:
        """Copy output (read from `fd`, which this closes) to the log and read progress
        lines until the command exits; returns why it must be killed, or None.

        One poll(2) waits for output and for the exit together: the exit through a
        pidfd (a descriptor that becomes readable when the process ends), so a command's
        end is seen at once, without polling waitpid in a sleeping loop. poll(2) rather
        than a selector: no epoll descriptor to make and close per command. The pipe
        stays blocking: it is read once each time poll says it is readable, which
        returns at once."""
        pidfd = _pidfd(proc.pid)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        buf = b""
        eof = False

        def take() -> None:
            nonlocal buf, eof
            chunk = os.read(fd, 65536)
            if not chunk:
                eof = True
                poller.unregister(fd)
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                self._line(raw, ctx)

        try:
            while True:
                if ctx.stopping:
                    return ctx.stop_reason or "stopped"
                wait = 200
                if deadline is not None:
                    left = deadline - time.time()
                    if left <= 0:
                        ctx.stop("timed out")
                        return f"timed out after {ctx.task.timeout:g}s"
                    wait = min(wait, int(left * 1000) + 1)
                if pidfd is None:  # no pidfd: look at the process between polls
                    exited = proc.poll() is not None
                    ready = [] if exited else poller.poll(wait if not eof else 0)
                    if eof and not exited:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(wait / 1000)
                        continue
                else:
                    ready = poller.poll(wait)
                    exited = any(f == pidfd for f, _ in ready)
                if not eof and any(f == fd for f, _ in ready):
                    take()
                if exited:
                    # Take what is already written and stop: a child the command left
                    # behind may hold the pipe open for ever.
                    while not eof and any(f == fd for f, _ in poller.poll(0)):
                        take()
                    break
            if buf:
                self._line(buf, ctx)
            return None
        finally:
            os.close(fd)
            if pidfd is not None:
                os.close(pidfd)

    def _line(self, raw: bytes, ctx: TaskContext) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        progress = parse_progress_line(line)
        if progress is not None:
            ctx.report(progress)
        ctx.log(line)
