"""Run a task's command on a remote host over SSH.

Why asyncssh rather than paramiko: it is asyncio-native, so one attempt watches its
output, its deadline, its cancel flag and the connection's health in one loop without a
thread per stream; it has protocol keepalives with a miss count built in (a host that
hangs is noticed in `keepalive_interval * keepalive_count_max` seconds, not at the next
TCP timeout); it checks host keys against an OpenSSH `known_hosts` file and refuses by
default; and opening a second channel on the same connection to kill the remote process
group is a one-liner. Each attempt runs its own short event loop and connection, so a
broken connection harms one attempt only.

The remote command is the pipeline's argv template, rendered exactly as for a local
command and with every item quoted with `shlex.quote`: the remote sshd hands the
command to a shell, and quoting each item is what keeps request data from ever being
read as shell syntax. It runs under `setsid -w` in a process group of its own whose id
it reports first; a timeout or a cancel kills that whole group through a second channel
(SIGTERM, then SIGKILL after a grace period), so nothing it started keeps running. If
the connection itself is lost, a watcher in the group sees the session's stdin close,
or the dots Conveyor writes on it stop coming (a network cut that sshd does not notice),
and kills the group on the host's side.

A host that refuses the connection, drops it or stops answering keepalives mid-task
fails the attempt as retryable, so the pipeline's retry policy applies. A host key that
does not match `known_hosts`, a key file that cannot be read or a login that is refused
fail the attempt for good: retrying cannot fix configuration.

Host slots (`concurrency` of each host) are counted per worker process: two workers
may each run that many tasks on one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import shlex
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import asyncssh

from conveyor.executors import ExecResult, TaskContext, parse_progress_line
from conveyor.executors.launcher import Lines
from conveyor.hosts import Host, pick_host
from conveyor.paths import reverse, rewrite_fields, rewrite_prefixes, task_selectors
from conveyor.pipelines import (
    Pipeline,
    TemplateError,
    attempt_context,
    attempt_env,
    command_values,
    render_argv,
)

log = logging.getLogger(__name__)

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of the remote group
_PGID_MARK = "__conveyor_pgid__"
# Prints the group id, then becomes the command (stdin closed, stderr on stdout). `$1`
# is how many seconds of silence mean Conveyor is gone (0: none); the rest, `$@`, is the
# quoted argv: the script itself holds no request data. A watcher left in the group
# reads the session's stdin, on which Conveyor writes a byte every few seconds (see
# `silence`). When the connection is closed, sshd closes that stdin; when the network
# is cut, sshd may not notice for hours, but the bytes stop: either way the watcher
# kills the group (TERM, then KILL once the command has gone or after 5 s), so a command
# cut off from Conveyor does not run on unseen beside the retry of its task.
# Waiting with a time limit takes `timeout -s KILL SECS head -c 1` (GNU coreutils,
# busybox 1.30 and later, toybox), tried once first: a host where that does not work
# gets a watcher that waits for the end of stdin alone. (KILL: the watcher ignores TERM,
# and busybox's `timeout` passes that on to `head`. GNU `timeout` puts itself and
# `head` in a group of their own: after the command's group is killed they may stay up
# to SECS seconds, reading nothing but the end of the session's stdin.)
# (`kill -SIG -PGID`, without `--`: the one spelling dash, bash and busybox all take.
# A background job's stdin is /dev/null in a shell without job control, hence fd 3.
# `$(...)` drops a newline, so the bytes Conveyor writes are dots.)
_WRAPPER = (
    f'echo "{_PGID_MARK} $$"; exec 3<&0; s=$1; shift; '
    "( trap '' TERM; "
    'if [ "$s" != 0 ] && [ "$(printf . | timeout -s KILL 5 head -c 1)" = . ]; then '
    'while [ -n "$(timeout -s KILL "$s" head -c 1 <&3)" ]; do :; done; '
    "else cat <&3; fi; "
    "kill -TERM -$$; i=0; "
    "while [ $i -lt 50 ] && kill -0 $$; do sleep 0.1; i=$((i+1)); done; kill -KILL -$$ ) "
    ">/dev/null 2>&1 & "
    'exec "$@" </dev/null 3<&- 2>&1'
)
_BEAT = b"."
_TICK = 0.2
T = TypeVar("T")


class _Retryable(Exception):
    pass


class _Stopped(Exception):
    """The attempt was stopped (cancel, time-out, shutdown) before its command ran."""


class _Fatal(Exception):
    pass


SILENCE_MIN = 10  # seconds: a worker that stalls briefly does not lose its commands


def beat(host: Host) -> float:
    """How often the worker writes a byte to a remote command's stdin (seconds)."""
    return max(_TICK, host.keepalive_interval / 2)


def silence(host: Host) -> int:
    """Seconds without a byte from Conveyor after which a host's watcher kills the
    command, in whole seconds, as `timeout` takes them. The last byte may have come a
    `beat` before a cut, so that much more than the worker can take to give up on the
    host (an interval of quiet, then `keepalive_count_max` unanswered keepalives), and
    never under SILENCE_MIN."""
    gives_up = host.keepalive_interval * (host.keepalive_count_max + 1)
    return max(SILENCE_MIN, math.ceil(gives_up + beat(host)))


def remote_command(
    argv: list[str], env: Mapping[str, str], cwd: str | None, quiet_after: int = 0
) -> str:
    """The command line the remote shell runs; every variable part is quoted.
    `quiet_after`: seconds of silence on stdin after which the watcher kills the
    command (0: only the end of stdin does)."""
    parts = ["exec", "env"]
    parts += [shlex.quote(f"{k}={v}") for k, v in env.items()]
    parts += ["setsid", "-w", "sh", "-c", shlex.quote(_WRAPPER), "conveyor"]
    parts += [str(int(quiet_after))]
    parts += [shlex.quote(a) for a in argv]
    line = " ".join(parts)
    if cwd:
        line = f"cd {shlex.quote(cwd)} && {line}"
    return line


def kill_script(pgid: int, grace: float) -> str:
    """SIGTERM the group, give its leader (the command) `grace` seconds, then SIGKILL
    the group: what outlives the leader, the connection watcher among them, goes too.
    (The watcher's `timeout` and `head`, in a group of their own under GNU coreutils,
    end with the session's stdin or within the silence.)"""
    g = int(pgid)
    if grace <= 0:
        return f"kill -KILL -{g} 2>/dev/null; exit 0"
    steps = max(1, int(grace / 0.1))
    # `kill -SIG -PGID`, not `kill -SIG -- -PGID`: dash's kill refuses the latter.
    return (
        f"kill -TERM -{g} 2>/dev/null || exit 0; i=0; "
        f"while [ $i -lt {steps} ] && kill -0 {g} 2>/dev/null; do sleep 0.1; i=$((i+1)); done; "
        f"kill -KILL -{g} 2>/dev/null; exit 0"
    )


class SshExecutor:
    """Shared by a worker's runners: it holds the count of busy slots per host."""

    def __init__(self, kill_grace: float = KILL_GRACE) -> None:
        self.kill_grace = kill_grace
        self._busy: dict[str, int] = {}
        self._freed = threading.Condition()
        self._turn = itertools.count()

    # host slots ------------------------------------------------------------------
    def _acquire(
        self, hosts: tuple[Host, ...], ctx: TaskContext, deadline: float | None
    ) -> Host | None:
        with self._freed:
            while True:
                host = pick_host(hosts, self._busy, next(self._turn) % max(1, len(hosts)))
                if host is not None:
                    self._busy[host.name] = self._busy.get(host.name, 0) + 1
                    return host
                if ctx.stopping or (deadline is not None and time.time() >= deadline):
                    return None
                self._freed.wait(_TICK)

    def _release(self, host: Host) -> None:
        with self._freed:
            self._busy[host.name] -= 1
            self._freed.notify_all()

    # one attempt -------------------------------------------------------------------
    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult:
        if not pipeline.hosts:
            return ExecResult(ok=False, error="the pipeline names no hosts", retryable=False)
        host = self._acquire(pipeline.hosts, ctx, deadline)
        if host is None:
            if ctx.stopping:
                return ExecResult(ok=False, error=ctx.stop_reason or "stopped")
            return ExecResult(ok=False, error="timed out waiting for a free host")
        try:
            return asyncio.run(self._attempt(host, pipeline, ctx, deadline))
        finally:
            self._release(host)

    async def _attempt(
        self, host: Host, pipeline: Pipeline, ctx: TaskContext, deadline: float | None
    ) -> ExecResult:
        task = ctx.task
        params = rewrite_fields(
            task.params, task_selectors(pipeline.paths.fields, pipeline.split), host.path_map
        )
        work_dir = pipeline.cwd or "."  # on the host
        context = {**attempt_context(task, work_dir, "python3"), "host": host.name}
        try:
            argv = render_argv(pipeline.command, command_values(params, context))
        except TemplateError as exc:
            return ExecResult(ok=False, error=str(exc), retryable=False)
        env = attempt_env(pipeline.env, task, work_dir)
        where = f"{host.user}@{host.address}:{host.port}"
        ctx.log(f"[{host.name}] $ {shlex.join(argv)}")
        try:
            code = await self._session(
                host,
                where,
                remote_command(argv, env, pipeline.cwd, silence(host)),
                ctx,
                deadline,
            )
        except _Stopped as exc:
            ctx.log(f"[{host.name}] stopped while connecting or starting the command: {exc}")
            return ExecResult(ok=False, error=str(exc))
        except _Fatal as exc:
            ctx.log(f"[{host.name}] {exc}")
            return ExecResult(ok=False, error=str(exc), retryable=False)
        except _Retryable as exc:
            ctx.log(f"[{host.name}] {exc}")
            return ExecResult(ok=False, error=str(exc))
        if isinstance(code, str):
            ctx.log(f"[{host.name}] killed: {code}")
            return ExecResult(ok=False, error=code)
        ctx.log(f"[{host.name}] exit code {code}")
        if code != 0:
            return ExecResult(ok=False, error=f"exit code {code} on {host.name}")
        result: Any = {"exit_code": 0, "host": host.name}
        return ExecResult(ok=True, result=rewrite_prefixes(result, reverse(host.path_map)))

    async def _connect(self, host: Host, where: str) -> asyncssh.SSHClientConnection:
        if host.insecure_skip_host_key_check:
            log.warning(
                "host %s: host-key checking is OFF (insecure_skip_host_key_check); "
                "anyone between here and %s can read and answer this session",
                host.name,
                where,
            )
        known_hosts: Any = None if host.insecure_skip_host_key_check else (host.known_hosts or ())
        try:
            return await asyncssh.connect(
                host.address,
                port=host.port,
                username=host.user,
                client_keys=[host.key_file] if host.key_file else (),
                known_hosts=known_hosts,
                connect_timeout=host.connect_timeout,
                keepalive_interval=host.keepalive_interval,
                keepalive_count_max=host.keepalive_count_max,
                config=None,
                agent_path=None if host.key_file else (),
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise _Fatal(
                f"host key of {where} is not trusted by "
                f"{host.known_hosts or '~/.ssh/known_hosts'} ({exc.reason}); refusing to run"
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise _Fatal(f"login to {where} refused: {exc.reason}") from None
        except asyncssh.KeyImportError as exc:
            raise _Fatal(f"key file {host.key_file} cannot be used: {exc}") from None
        except FileNotFoundError as exc:
            raise _Fatal(f"cannot read {exc.filename}: {exc.strerror}") from None
        except PermissionError as exc:
            raise _Fatal(f"cannot read {exc.filename}: {exc.strerror}") from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise _Retryable(f"cannot connect to {where}: {_describe(exc)}") from None

    async def _session(
        self,
        host: Host,
        where: str,
        command: str,
        ctx: TaskContext,
        deadline: float | None,
    ) -> int | str:
        """The exit code, or why the remote group was killed."""
        conn = await _unless_stopped(
            self._connect(host, where), ctx, deadline, lambda made: made.close()
        )
        pgid: list[int] = []
        try:
            try:
                # stdin stays open, a dot written on it every few seconds: its end, or
                # its silence, tells the remote side we are gone (see _WRAPPER)
                proc = await _unless_stopped(
                    conn.create_process(command, encoding=None), ctx, deadline
                )
            except (OSError, asyncssh.Error) as exc:
                raise _Retryable(f"cannot start the command on {where}: {_describe(exc)}") from None
            reader = asyncio.ensure_future(self._pump(proc, ctx, pgid, host.name))
            # stderr holds only what `env` and `setsid` say (the command's goes to stdout)
            errors = asyncio.ensure_future(_collect(proc.stderr, 4096))
            reason: str | None = None
            every = beat(host)
            next_beat = time.monotonic() + every
            while True:
                done, _ = await asyncio.wait({reader}, timeout=_TICK)
                if done or proc.exit_status is not None or proc.exit_signal is not None:
                    break
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + every
                    with contextlib.suppress(OSError, asyncssh.Error):
                        proc.stdin.write(_BEAT)  # a lost link is the reader's to see
                reason = ctx.why_stop(deadline, time.time())
                if reason is not None:
                    break
            if reason is not None:
                await self._kill(conn, pgid, host.name, ctx)
                # what it wrote before it died is logged; the link may go with it
                with contextlib.suppress(OSError, asyncssh.Error):
                    await _drain(reader)
                return reason
            try:
                await _drain(reader)
            except (OSError, asyncssh.Error) as exc:
                raise _Retryable(f"connection to {where} lost: {_describe(exc)}") from None
            try:
                await asyncio.wait_for(proc.wait_closed(), timeout=2.0)
            except (TimeoutError, OSError, asyncssh.Error):
                pass
            if proc.exit_status is not None and proc.exit_signal is None:
                said = await _result_of(errors)
                for line in said.splitlines():
                    ctx.log(f"[{host.name}] {line}")
                if pgid:  # anything it left running in its group goes with it
                    await self._kill(conn, pgid, host.name, ctx, grace=0.0)
                signal_number = signalled(proc.exit_status, said)
                if signal_number is not None:
                    return f"killed by signal {signal_number} on {host.name}"
                return proc.exit_status
            if proc.exit_signal is not None:
                return f"killed by signal {proc.exit_signal[0]} on {host.name}"
            raise _Retryable(f"connection to {where} lost before the command finished")
        finally:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), timeout=2.0)
            except (TimeoutError, OSError, asyncssh.Error):
                pass

    async def _pump(
        self,
        proc: asyncssh.SSHClientProcess[bytes],
        ctx: TaskContext,
        pgid: list[int],
        host: str,
    ) -> None:
        lines = Lines()
        try:
            while True:
                chunk = await proc.stdout.read(65536)
                if not chunk:
                    break
                todo: list[tuple[str, bool]] = []
                for raw, starts in lines.feed(chunk):
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    # The wrapper's first word; a login script may have printed before it.
                    if starts and not pgid and line.startswith(_PGID_MARK):
                        try:
                            pgid.append(int(line.split()[1]))
                            continue
                        except (IndexError, ValueError):
                            pass
                    todo.append((line, starts))
                if todo:
                    # In a thread: a progress line is written to the database, which may
                    # keep it waiting for its lock, and this loop must go on writing the
                    # dots that keep the host's watcher from killing the command.
                    await asyncio.to_thread(_lines, todo, ctx)
        finally:  # a last line with no newline is logged, also when reading is cut short
            last = lines.end()
            if last is not None:
                _line(last[0].decode("utf-8", "replace").rstrip("\r"), last[1], ctx)
        if proc.exit_status is None and proc.exit_signal is None:
            # EOF without an exit status: wait briefly for it, else the link is gone.
            try:
                await asyncio.wait_for(proc.wait_closed(), timeout=1.0)
            except TimeoutError:
                pass
            if proc.exit_status is None and proc.exit_signal is None:
                raise ConnectionError(f"the session with {host} closed without an exit status")

    async def _kill(
        self,
        conn: asyncssh.SSHClientConnection,
        pgid: list[int],
        host: str,
        ctx: TaskContext,
        grace: float | None = None,
    ) -> None:
        for _ in range(20):  # stopped before the group id arrived: it is on its way
            if pgid:
                break
            await asyncio.sleep(0.1)
        if not pgid:
            ctx.log(f"[{host}] the remote process group is unknown; closing the session only")
            return
        grace = self.kill_grace if grace is None else grace
        try:
            await asyncio.wait_for(
                conn.run(kill_script(pgid[0], grace), check=False), timeout=grace + 10.0
            )
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            ctx.log(f"[{host}] could not kill remote process group {pgid[0]}: {_describe(exc)}")


async def _drain(reader: asyncio.Future[None], within: float = 1.0) -> None:
    """Let the output reader take what is already on its way, but not wait on a pipe
    that a child the command left behind still holds open."""
    try:
        await asyncio.wait_for(asyncio.shield(reader), timeout=within)
    except TimeoutError:
        reader.cancel()
        await asyncio.wait({reader})  # its last line without a newline is logged first


async def _unless_stopped(
    step: Awaitable[T],
    ctx: TaskContext,
    deadline: float | None,
    discard: Callable[[T], object] | None = None,
) -> T:
    """`step` (connecting, starting the command), unless the attempt is stopped or its
    time runs out first: then `step` is cancelled, what it made all the same is given
    to `discard` (a cancel can come as it ends), and `_Stopped` says why. A host that
    takes its connect time-out to answer, or never answers the request to run the
    command, holds no cancel or time-out up."""
    waiting = asyncio.ensure_future(step)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=_TICK)
        if done:
            return waiting.result()
        reason = ctx.why_stop(deadline, time.time())
        if reason is not None:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                made = await waiting
                if discard is not None:
                    discard(made)
            raise _Stopped(reason)


def signalled(code: int, stderr: str) -> int | None:
    """The signal that killed the remote command, told from `setsid -w`'s exit: under
    sshd, setsid forks (the session's shell leads its group already), and a child that
    died by a signal makes it say so on stderr and exit with the raw wait status (the
    signal, plus 128 with a core dump). None: the command exited with `code`. The
    message is util-linux's in English; in another language, any `setsid:` line with a
    code other than 1 (setsid's own failures) counts."""
    lines = [line for line in stderr.splitlines() if line.startswith("setsid: ")]
    if not lines or not 0 < code < 256:
        return None
    if any("did not exit normally" in line for line in lines) or code != 1:
        return code & 0x7F
    return None


async def _collect(stream: asyncssh.SSHReader[bytes], most: int) -> str:
    """A stream's text to its end: its first `most` bytes, the rest read and dropped."""
    kept = b""
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, most - len(kept))]
    return kept.decode("utf-8", "replace")


async def _result_of(task: asyncio.Future[str]) -> str:
    """What `_collect` read, or "" if it is not done within a second (or failed)."""
    try:
        return await asyncio.wait_for(task, timeout=1.0)
    except (TimeoutError, OSError, asyncssh.Error):
        return ""


def _lines(lines: list[tuple[str, bool]], ctx: TaskContext) -> None:
    for line, starts in lines:
        _line(line, starts, ctx)


def _line(line: str, starts: bool, ctx: TaskContext) -> None:
    """A line of output (`starts`: not the rest of a longer line) into the log, and
    into the progress if it is a progress line."""
    progress = parse_progress_line(line) if starts else None
    if progress is not None:
        ctx.report(progress)
    ctx.log(line)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return text or type(exc).__name__
