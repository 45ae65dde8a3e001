"""The command host: a small process beside each worker process that starts the
worker's commands, writes their logs and reaps them, and tells the worker what happened.

Why a process of its own: a command of a few milliseconds needs a dozen system calls
(spawn, pipes, log writes, waits), and in the worker each of them gives up the
interpreter lock and waits to take it back from the threads claiming tasks and recording
outcomes. With eight commands at a time that lock changes hands hundreds of times per
command, and short commands ran at half the speed of starting them by hand. Here one
thread, with the lock to itself, waits in one `epoll` for every command's output and its
exit (a pidfd), and the worker's side of a command is two messages: "run" and "exited".

It is also the commands' watchdog: when the worker goes away (its end of the request
pipe closes, whatever killed it), every command still running gets SIGTERM, then
SIGKILL after a grace period, and the host exits.

It runs as `python -I -S .../spawner.py PREFIX`: standard library only, so it starts
fast and imports nothing of the worker's. Messages are `marshal`led tuples of plain
values with a 4-byte length in front, between two processes of the same program.
Requests:  ("run", id, argv, program, cwd, env changes, log path, dirs to make)
           ("kill", id, signal, why)  (the log's last line says why, not the exit code)
Events:    ("line", id, text)         a progress line (it starts with PREFIX)
           ("exit", id, code)
           ("error", id, errno, text) the command could not be started
"""

from __future__ import annotations

import collections
import itertools
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

GRACE = 5.0  # seconds between SIGTERM and SIGKILL for the commands of a worker gone
_HEADER = struct.Struct("<I")
_READ_MAX = 1 << 20  # most output taken from one command before the others get a turn


def pack(message: tuple[Any, ...]) -> bytes:
    body = marshal.dumps(message)
    return _HEADER.pack(len(body)) + body


class Reader:
    """Whole messages out of a byte stream."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if len(self._buf) < _HEADER.size + size:
                break
            # only ever from the other end of a pipe between a worker and its own host
            out.append(marshal.loads(self._buf[_HEADER.size : _HEADER.size + size]))  # noqa: S302
            self._buf = self._buf[_HEADER.size + size :]
        return out


class _Command:
    def __init__(self, job: int, proc: subprocess.Popen[bytes], log: int) -> None:
        self.job = job
        self.proc = proc
        self.log = log
        assert proc.stdout is not None
        self.out = proc.stdout.fileno()
        os.set_blocking(self.out, False)
        self.pidfd = os.pidfd_open(proc.pid)
        self.buf = b""
        self.open = True  # its output is still read
        self.killed: str | None = None  # why the worker had it killed


class Host:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self.base = dict(os.environ)
        self.epoll = select.epoll()
        self.reader = Reader()
        self.by_out: dict[int, _Command] = {}
        self.by_pidfd: dict[int, _Command] = {}
        self.by_job: dict[int, _Command] = {}
        self.outbox = bytearray()

    def serve(self) -> None:
        os.set_blocking(0, False)
        self.epoll.register(0, select.EPOLLIN)
        while True:
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == 0:
                    if not self._requests():
                        self._flush()
                        self._worker_gone()
                        return
                elif fd in self.by_out:
                    self._output(self.by_out[fd])
                elif fd in self.by_pidfd:
                    self._exited(self.by_pidfd[fd])
            self._flush()

    # requests -------------------------------------------------------------------------
    def _requests(self) -> bool:
        """Take what the worker sent; False once it has gone."""
        while True:
            try:
                data = os.read(0, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            for msg in self.reader.feed(data):
                if msg[0] == "run":
                    self._run(*msg[1:])
                elif msg[0] == "kill":
                    command = self.by_job.get(msg[1])
                    if command is not None:
                        command.killed = msg[3]
                        try:
                            os.killpg(command.proc.pid, msg[2])
                        except (ProcessLookupError, PermissionError):
                            pass

    def _run(
        self,
        job: int,
        argv: list[str],
        program: str | None,
        cwd: str,
        env_changes: dict[str, str],
        log_path: str,
        dirs: list[str],
    ) -> None:
        env = dict(self.base)
        env.update(env_changes)
        log = -1
        try:
            for d in dirs:
                _make_dir(d)
            proc = subprocess.Popen(
                argv,
                executable=program,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._send(("error", job, exc.errno or 0, exc.strerror or str(exc)))
            return
        try:
            _make_dir(os.path.dirname(log_path))
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            _write(log, ("$ " + " ".join(argv) + "\n").encode("utf-8", "replace"))
        except OSError:
            log = -1  # the command runs all the same; its log is lost, not its result
        command = _Command(job, proc, log)
        self.by_job[job] = command
        self.by_out[command.out] = command
        self.by_pidfd[command.pidfd] = command
        self.epoll.register(command.out, select.EPOLLIN)
        self.epoll.register(command.pidfd, select.EPOLLIN)

    # commands -------------------------------------------------------------------------
    def _output(self, command: _Command, once: bool = False) -> None:
        """Copy what the command wrote to its log; at end of file stop reading. `once`:
        only what is there now (it has exited; a child it left behind may hold the pipe
        open for ever)."""
        got = 0
        while command.open and (got < _READ_MAX or once):
            try:
                chunk = os.read(command.out, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._close_output(command)
                return
            got += len(chunk)
            *lines, command.buf = (command.buf + chunk).split(b"\n")
            self._lines(command, lines)

    def _lines(self, command: _Command, lines: list[bytes]) -> None:
        text = []
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if raw.startswith(self.prefix):
                self._send(("line", command.job, line))
            text.append(line + "\n")
        if text and command.log >= 0:
            try:
                _write(command.log, "".join(text).encode("utf-8", "replace"))
            except OSError:
                pass

    def _close_output(self, command: _Command) -> None:
        if command.open:
            command.open = False
            self.epoll.unregister(command.out)
            del self.by_out[command.out]
            assert command.proc.stdout is not None
            command.proc.stdout.close()

    def _exited(self, command: _Command) -> None:
        self._output(command, once=True)
        self._close_output(command)
        if command.buf:
            self._lines(command, [command.buf])
        self.epoll.unregister(command.pidfd)
        del self.by_pidfd[command.pidfd]
        os.close(command.pidfd)
        code = command.proc.wait()
        # Anything the command left running in its group goes with it.
        try:
            os.killpg(command.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if command.log >= 0:
            try:
                last = f"killed: {command.killed}" if command.killed else f"exit code {code}"
                _write(command.log, (last + "\n").encode("utf-8", "replace"))
            except OSError:
                pass
            os.close(command.log)
        del self.by_job[command.job]
        self._send(("exit", command.job, code))

    def _worker_gone(self) -> None:
        groups = [c.proc.pid for c in self.by_job.values()]
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + GRACE
        while groups and time.monotonic() < deadline:
            for c in self.by_job.values():
                c.proc.poll()
            groups = [c.proc.pid for c in self.by_job.values() if c.proc.returncode is None]
            time.sleep(0.05)
        for pgid in [c.proc.pid for c in self.by_job.values()]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # events -------------------------------------------------------------------------
    def _send(self, message: tuple[Any, ...]) -> None:
        self.outbox += pack(message)

    def _flush(self) -> None:
        """Everything said in one turn of the loop, in one write (blocking: the worker
        reads all the time)."""
        if self.outbox:
            try:
                _write(1, bytes(self.outbox))
            except OSError:
                pass  # the worker is gone; stdin's end of file follows
            self.outbox.clear()


# ---------------------------------------------------------------- the worker's side


def available() -> bool:
    """The host needs pidfds (Linux 5.3 and later) and epoll."""
    return hasattr(os, "pidfd_open") and hasattr(select, "epoll")


class Job:
    """One command as the worker waits for it: `wake` is set for each progress line
    (kept in `lines`) and once it has ended (`code`, or `error` if it never started)."""

    def __init__(self, job_id: int) -> None:
        self.id = job_id
        self.wake = threading.Event()
        self.lines: collections.deque[str] = collections.deque()
        self.code: int | None = None
        self.error: OSError | None = None
        self.ended = False

    def wait(self, timeout: float) -> bool:
        """Sleep until it ends or a line comes, up to `timeout`; True once it ended."""
        if not self.ended:
            self.wake.wait(timeout)
            self.wake.clear()
        return self.ended

    def _end(self) -> None:
        self.ended = True
        self.wake.set()


class HostGone(OSError):
    """The command host died with commands running (they are killed as it goes)."""


class CommandHost:
    """The worker's handle on its command host, started on first use and again if it
    dies. Thread-safe: every runner thread of the worker goes through one."""

    def __init__(self, progress_prefix: str) -> None:
        self._prefix = progress_prefix
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), self._prefix],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                start_new_session=True,
            )
            threading.Thread(
                target=self._listen, args=(self._proc,), name="conveyor-host", daemon=True
            ).start()
        return self._proc

    def run(
        self,
        argv: list[str],
        program: str | None,
        cwd: str,
        env_changes: dict[str, str],
        log_path: str,
        dirs: list[str],
    ) -> Job:
        job = Job(next(self._ids))
        message = pack(("run", job.id, argv, program, cwd, env_changes, log_path, dirs))
        with self._lock:
            self._jobs[job.id] = job
            self._tell(message, job)
        return job

    def kill(self, job: Job, sig: int, why: str) -> None:
        with self._lock:
            if not job.ended:
                self._tell(pack(("kill", job.id, int(sig), why)), None)

    def _tell(self, message: bytes, job: Job | None) -> None:
        proc = self._started()
        assert proc.stdin is not None
        try:
            proc.stdin.write(message)
            proc.stdin.flush()
        except OSError as exc:  # it died just now: the listener fails its jobs
            if job is not None and not job.ended:
                self._jobs.pop(job.id, None)
                job.error = HostGone(0, f"the command host stopped: {exc}")
                job._end()

    def _listen(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        reader = Reader()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            for msg in reader.feed(data):
                kind, job_id = msg[0], msg[1]
                if kind == "line":
                    job = self._jobs.get(job_id)
                    if job is not None:
                        job.lines.append(msg[2])
                        job.wake.set()
                    continue
                with self._lock:
                    job = self._jobs.pop(job_id, None)
                if job is None:
                    continue
                if kind == "exit":
                    job.code = msg[2]
                else:
                    job.error = OSError(msg[2], msg[3])
                job._end()
        proc.wait()
        with self._lock:  # it died (or was closed): nothing more will come for these
            lost = [j for j in self._jobs.values()]
            if self._proc is proc:
                self._jobs.clear()
        for job in lost:
            job.error = HostGone(0, "the command host stopped")
            job._end()

    def close(self) -> None:
        """Stop the host (its running commands are killed); the next use starts another."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
            try:
                proc.wait(GRACE + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _make_dir(path: str) -> None:
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _ignore(_signum: int, _frame: object) -> None:
    pass


def main() -> None:
    # It ends when the worker does (end of file), not on the signals meant for the worker.
    # A handler that does nothing, not SIG_IGN: an ignored signal stays ignored in the
    # commands it starts, and they must die of SIGTERM.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    Host(sys.argv[1]).serve()


_shared: CommandHost | None = None
_shared_lock = threading.Lock()


def shared_host(progress_prefix: str) -> CommandHost:
    """This process's command host: one serves every worker in it."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = CommandHost(progress_prefix)
        return _shared


def _forget_after_fork() -> None:
    # A forked child must not write to its parent's host: it starts its own if needed.
    global _shared
    _shared = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


if __name__ == "__main__":
    main()
