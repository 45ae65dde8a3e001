"""The command launcher: a small process beside a command loop that runs commands for
it (a loop has one launcher for every four slots): it starts them, writes their output
to their logs, reaps them, and kills them if the worker dies.

Why a process of its own: starting a process from Python, reading its output and
reaping it is most of what a short command costs its worker, and in the worker all of it
holds the interpreter lock that the worker's database work (claims, outcomes) needs too.
In a launcher it runs on another core, beside that work. The worker keeps what decides
the task: when to stop or kill a command (deadlines, cancels, shutdown) and what its
exit means.

The worker and its launcher talk over a socket pair. Messages are `marshal`led tuples
(both ends are the same interpreter, and nothing else can reach a socket pair), each
after its length; each side writes what it has to say in one go, once a turn:

    worker -> launcher   ("hello", protocol, environment)   first
                         ("run", key, argv, cwd, env changes, log file, work dir)
                                                   work dir "": none to make
                         ("kill", key, signal, reason)
    launcher -> worker   ("pid", key, pid)
                         ("progress", key, line)   a `conveyor:progress` line
                         ("exit", key, code, reason, quiet)
                                                   code < 0: killed by that signal;
                                                   reason: of the kill it logged, or None;
                                                   quiet: True if its log is for the
                                                   worker to keep (see below)
                         ("error", key, message, retryable)
                                                   it did not run, or its log could
                                                   not be written (then it was killed)

The log gets the command line (`$ ...`), the command's output (stdout and stderr, as
text, a write per chunk read), and how it ended (`exit code N`, or `killed: reason` for
a kill the worker asked for). The log file is made when there is output to write: a
command that printed nothing and was not killed has no file (unless one was there
already, from an earlier run of the same attempt), and its exit says so (`quiet`): its
log, those two lines, is for the worker to keep in the database (the worker knows the
command line and the code), as a file of two lines is an inode and a disk block per
attempt, and on ext4 30 µs to a millisecond of kernel time to make.

Each command gets a session (and process group) of its own; a kill goes to the whole
group, and once the command has exited whatever it left running in its group is
SIGKILLed before the command is reaped. When the socket reaches end of file, the worker
is gone (or done): the groups still running get SIGTERM, then SIGKILL after a grace
period, and the launcher exits. This makes it the worker's watchdog for the commands it
runs.

It runs as `python -I -S .../launcher.py`: standard library only, so it starts fast and
imports nothing of the worker's. It needs pidfds (Linux 5.3 and later), as the command
loops do.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import marshal
import math
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

GRACE = 5.0  # seconds between SIGTERM and SIGKILL when the worker is gone
# A command reports progress with a line of its own on stdout:
#   conveyor:progress CURRENT[/TOTAL] [MESSAGE]
PROGRESS_PREFIX = "conveyor:progress "
PROGRESS_MAX = 4096  # characters of a progress line passed on (all of it is logged)
# Bytes of output held while waiting for a newline: a longer line is logged in pieces.
LINE_MAX = 65536
LEFTOVER_READS = 64  # reads of output after the exit; what comes later is a leftover's
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
PROGRAM = os.path.abspath(__file__)  # what a launcher runs
PROTOCOL = 3  # of the messages; a launcher refuses a worker that speaks another


# the launcher's side ------------------------------------------------------------------
class _Child:
    __slots__ = (
        "failed",
        "header",
        "key",
        "lines",
        "log",
        "log_file",
        "out",
        "pid",
        "pidfd",
        "reason",
    )

    def __init__(
        self, key: int, pid: int, pidfd: int, out: int, log_file: str, header: str
    ) -> None:
        self.key = key
        self.pid = pid
        self.pidfd = pidfd
        self.out: int | None = out  # the output pipe's read end, until end of file
        self.log_file = log_file
        self.log: int | None = None  # the log, once it is opened (see `write_log`)
        self.header = header  # the log's first line, written when it is opened
        self.lines = Lines()
        self.reason: str | None = None  # why the worker had it killed
        self.failed: str | None = None  # why its log could not be written


class _Launcher:
    """Commands start with `os.posix_spawn` (one vfork-like clone and exec, done in C),
    not `subprocess.Popen`, which costs several times as much CPU in Python code per
    command. posix_spawn holds the interpreter lock while the child starts, which here,
    in a process of one thread, costs nothing. It has no working directory of its own
    for the child, so the launcher changes its own before each spawn: it has no other
    use for one.

    A command's pid goes to the worker as soon as it has started, and an exited command
    is reaped only once its exit has been sent (`release`): should the launcher die,
    the worker knows which commands are its own to kill, and no pid it may kill is
    free to be reused."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.by_fd: dict[int, _Child] = {}  # by pidfd and output pipe
        self.by_key: dict[int, _Child] = {}
        self.environ: dict[str, str] = {}  # the worker's, from its hello
        self.found: dict[tuple[str, str | None], str] = {}
        self.inbuf = bytearray()
        self.outbox: list[tuple[Any, ...]] = []  # messages for the worker
        self.progress_at: dict[int, int] = {}  # where a command's progress line is in it
        self.outbuf = bytearray()  # framed messages the socket has not taken yet
        self.waiting = False  # for the socket to be writable
        # Commands that have exited, reported in messages not yet all sent: they stay
        # unreaped (holding their pids) until the worker has been told.
        self.unreaped: list[int] = []
        self.alone = False  # the worker is gone: nobody would keep a quiet log

    # talking to the worker ------------------------------------------------------------
    def send(self, *message: Any) -> None:
        """Queue a message for the worker; what a turn queues goes in one write. While
        the worker is not reading, a command's newer progress line replaces the one
        still queued (the worker stores only the latest anyway)."""
        if message[0] == "progress" and self.waiting:
            at = self.progress_at.get(message[1])
            if at is not None:
                self.outbox[at] = message
                return
            self.progress_at[message[1]] = len(self.outbox)
        self.outbox.append(message)

    def flush(self) -> None:
        """Write what is queued, as far as the socket takes it now. The launcher never
        waits on the worker: what does not fit waits for the socket to be writable, and
        meanwhile only the latest progress line of each command is kept."""
        if not self.outbuf and self.outbox:
            self.outbuf += b"".join(_frame(m) for m in self.outbox)
            self.outbox.clear()
            self.progress_at.clear()
        if self.outbuf:
            try:
                del self.outbuf[: self.sock.send(self.outbuf, socket.MSG_DONTWAIT)]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # the worker is gone; the end of file says so
                self.outbuf.clear()
                self.outbox.clear()
                self.progress_at.clear()
        waiting = bool(self.outbuf or self.outbox)
        if not waiting:
            self.reap()
        if waiting != self.waiting:
            self.waiting = waiting
            with contextlib.suppress(OSError):  # no longer watched: shutting down
                self.poller.modify(self.sock, select.POLLIN | (select.POLLOUT if waiting else 0))

    def reap(self) -> None:
        for pid in self.unreaped:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.unreaped.clear()

    def serve(self) -> None:
        """Until the worker's end of file. Each turn takes the commands' events first
        and the worker's messages last: a descriptor closed in the turn is not yet
        reused by a new command when a later event of the same turn names it."""
        sock = self.sock.fileno()
        while True:
            ready = self.poller.poll()
            for fd, _ in ready:
                if fd != sock:
                    self.event(fd)
            if any(fd == sock and events & ~select.POLLOUT for fd, events in ready):
                eof = _drain(self.sock, self.inbuf)
                for message in _unframe(self.inbuf):
                    self.dispatch(message)
                if eof:
                    return
            self.flush()

    def dispatch(self, message: tuple[Any, ...]) -> None:
        if message[0] == "hello":
            if message[1] != PROTOCOL:  # a worker older or newer than this file
                sys.stderr.write(
                    f"conveyor launcher: the worker speaks protocol {message[1]}, this "
                    f"launcher {PROTOCOL}; the worker runs its commands itself\n"
                )
                raise SystemExit(2)
            self.environ = message[2]
        elif message[0] == "run":
            try:
                self.launch(*message[1:])
            except Exception as exc:  # out of descriptors, say: the launcher goes on
                why = f"the command launcher could not run it: {exc}"
                self.send("error", message[1], why, True)
        elif message[0] == "kill":
            self.kill(*message[1:])

    def event(self, fd: int) -> None:
        child = self.by_fd.get(fd)
        if child is None:
            return  # closed earlier in this turn
        try:
            if fd == child.pidfd:
                self.exited(child)
            else:
                self.output(child)
        except Exception as exc:  # the launcher and the other commands go on
            self.fail(child, f"the command launcher failed: {exc!r}")

    # starting ---------------------------------------------------------------------------
    def program(self, name: str, path: str | None) -> str | None:
        """The file to run for `name`: a name with a slash as it is (relative to the
        working directory, the command's by now), else the first match in PATH."""
        return name if "/" in name else which(self.found, name, path)

    def launch(
        self,
        key: int,
        argv: list[str],
        cwd: str,
        changes: dict[str, str],
        log_file: str,
        work_dir: str,
    ) -> None:
        if work_dir:  # "": the pipeline's commands go without one
            try:
                make_dir(work_dir)
            except OSError as exc:
                why = f"cannot make the work directory {work_dir}: {exc.strerror}"
                self.send("error", key, why, True)
                return
        header = command_line(argv) + "\n"
        try:
            pid, out = self.start(argv, cwd, changes)
        except _CannotStart as exc:
            why = f"cannot start {argv[0]}: {exc}"
            with contextlib.suppress(OSError):
                log = open_log(log_file)
                try:
                    _write(log, header + why + "\n")
                finally:
                    os.close(log)
            self.send("error", key, why, False)
            return
        self.send("pid", key, pid)
        self.flush()  # now: were the launcher to die, the worker must know it is to kill
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            killpg(pid, signal.SIGKILL)  # it must not run unwatched
            os.waitpid(pid, 0)
            os.close(out)
            raise
        child = _Child(key, pid, pidfd, out, log_file, header)
        self.by_fd[pidfd] = self.by_fd[out] = self.by_key[key] = child
        self.poller.register(out, select.POLLIN)
        self.poller.register(pidfd, select.POLLIN)

    def start(self, argv: list[str], cwd: str, changes: dict[str, str]) -> tuple[int, int]:
        """Start the command; its pid and its output pipe's read end."""
        env = self.environ.copy()
        env.update(changes)
        path = env.get("PATH", os.defpath)
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    why = f"its working directory {cwd}: {exc.strerror}"
                    raise _CannotStart(why) from exc
                program = self.program(argv[0], path)
                if program is None:
                    raise _not_found(argv[0], path)
                try:
                    pid = self.spawn(program, argv, env, write)
                except FileNotFoundError:
                    if self.found.pop((argv[0], path), None) is None:
                        raise
                    program = self.program(argv[0], path)  # moved since: look again
                    if program is None:
                        raise
                    pid = self.spawn(program, argv, env, write)
            except OSError as exc:
                raise _CannotStart(exc.strerror or str(exc)) from exc
            except (ValueError, TypeError) as exc:  # a NUL in an argument, say
                raise _CannotStart(str(exc)) from exc
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the command holds it now
        os.set_blocking(read, False)
        return pid, read

    def spawn(self, program: str, argv: list[str], env: dict[str, str], out: int) -> int:
        # Standard input is the launcher's own, /dev/null; every other descriptor of
        # the launcher's is close-on-exec. Every signal starts at its default: the
        # launcher ignores none, and its handlers do not survive exec; SIGPIPE and
        # SIGXFSZ, which Python ignores, are reset here, as `Popen` does.
        return os.posix_spawn(
            program,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out, 2),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
        )

    # running ----------------------------------------------------------------------------
    def kill(self, key: int, sig: int, reason: str) -> None:
        child = self.by_key.get(key)
        if child is not None:  # else it has been reaped: its group id may be reused
            child.reason = child.reason or reason
            killpg(child.pid, sig)

    def output(self, child: _Child) -> bool:
        """Read what the command wrote; False once there is no more for now."""
        assert child.out is not None
        try:
            chunk = os.read(child.out, 65536)
        except BlockingIOError:
            return False
        except OSError:  # not to be read: as good as its end
            chunk = b""
        if not chunk:
            self.forget(child.out)
            child.out = None
            return False
        self.lines(child, child.lines.feed(chunk))
        return True

    def lines(self, child: _Child, lines: list[tuple[bytes, bool]]) -> None:
        text = []
        for raw, starts in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if starts and progress_of(line) is not None:
                self.send("progress", child.key, line[:PROGRESS_MAX])
            text.append(line + "\n")
        if text:
            self.write_log(child, "".join(text))

    def write_log(self, child: _Child, text: str) -> bool:
        """Append `text` to the child's log, opening it (made, headed by the command
        line) the first time. A log that cannot be written fails the command: it is
        killed, and the worker told why. False then, or if it failed earlier."""
        if child.failed is not None:
            return False
        try:
            if child.log is None:
                child.log = open_log(child.log_file)
                text = child.header + text
            _write(child.log, text)
            return True
        except OSError as exc:
            child.failed = f"cannot write the log {child.log_file}: {exc.strerror}"
            killpg(child.pid, signal.SIGKILL)
            return False

    def exited(self, child: _Child) -> None:
        # What it left running in its group goes with it, while the group id is still
        # held by the unreaped leader.
        killpg(child.pid, signal.SIGKILL)
        for _ in range(LEFTOVER_READS):
            if child.out is None or not self.output(child):
                break
        last = child.lines.end()
        if last is not None:
            self.lines(child, [last])
        code = _exit_code(os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT))
        if self.quiet(child):
            self.send("exit", child.key, code, None, True)
        elif self.write_log(child, log_end(code, child.reason)):
            self.send("exit", child.key, code, child.reason, False)
        else:
            self.send("error", child.key, child.failed, True)
        self.release(child)

    def quiet(self, child: _Child) -> bool:
        """Whether the child's log is only its command line and its exit code, to be
        kept by the worker rather than written: it printed nothing, nobody had it
        killed, the worker is there to keep it, and no earlier run of the attempt left
        a log to add to."""
        return (
            child.log is None
            and child.failed is None
            and child.reason is None
            and not self.alone
            and not os.path.lexists(child.log_file)
        )

    def fail(self, child: _Child, why: str) -> None:
        """Something went wrong with `child` (a bug, or the system): it is killed and
        reaped, and the worker told."""
        killpg(child.pid, signal.SIGKILL)
        self.write_log(child, why + "\n")
        self.send("error", child.key, why, True)
        self.release(child)

    def release(self, child: _Child) -> None:
        """Let its descriptors go, and reap it once the worker has all that was said
        of it."""
        if self.by_key.pop(child.key, None) is None:
            return
        self.unreaped.append(child.pid)
        if not (self.outbuf or self.outbox):
            self.reap()
        for fd in (child.out, child.pidfd):
            if fd is not None:
                self.forget(fd)
        if child.log is not None:
            with contextlib.suppress(OSError):
                os.close(child.log)

    def forget(self, fd: int) -> None:
        """Stop watching a child's descriptor, and close it."""
        if self.by_fd.pop(fd, None) is not None:
            self.poller.unregister(fd)
            os.close(fd)

    def shut_down(self) -> None:
        """The worker is gone: its commands go too (SIGTERM, then SIGKILL after the
        grace)."""
        self.alone = True
        with contextlib.suppress(KeyError):
            self.poller.unregister(self.sock.fileno())  # at end of file: always readable
        for child in self.by_key.values():
            killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while self.by_key and time.monotonic() < deadline:
            for fd, _ in self.poller.poll(50):
                self.event(fd)
        for child in self.by_key.values():
            killpg(child.pid, signal.SIGKILL)
        for child in list(self.by_key.values()):
            self.release(child)
        self.reap()  # nobody is left to tell


class _CannotStart(Exception):
    pass


def _exit_code(info: Any) -> int:
    """waitid's answer as `Popen.returncode` has it: the exit status, or minus the
    signal that killed it."""
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


_HEADER = struct.Struct("<I")


def _frame(message: tuple[Any, ...]) -> bytes:
    """A message as it goes on the socket: its length, then its `marshal` form."""
    data = marshal.dumps(message)
    return _HEADER.pack(len(data)) + data


def _unframe(buf: bytearray) -> list[tuple[Any, ...]]:
    """The whole messages at the start of `buf`, taken out of it. (Both ends are the
    same interpreter, and nothing else can reach a socket pair.)"""
    messages = []
    at = 0
    while len(buf) - at >= _HEADER.size:
        (n,) = _HEADER.unpack_from(buf, at)
        end = at + _HEADER.size + n
        if len(buf) < end:
            break
        messages.append(marshal.loads(buf[at + _HEADER.size : end]))  # noqa: S302
        at = end
    del buf[:at]
    return messages


def _drain(sock: socket.socket, buf: bytearray) -> bool:
    """Add what has come on `sock` to `buf`; True at end of file."""
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        buf += data


class Lines:
    """A command's output cut into lines, read by read: `feed` gives the lines that a
    chunk completes, without their newlines, each with whether it starts a line of the
    output (only such a one may be a progress line). A line is never longer than
    LINE_MAX bytes: a longer one comes out in pieces of at most that, each cut between
    UTF-8 characters, so that output which goes on without a newline (binary data, a
    progress bar redrawn with carriage returns) is not held whole in memory, nor copied
    again with each read; the pieces after a line's first do not start a line."""

    __slots__ = ("held", "midline")

    def __init__(self) -> None:
        self.held = b""  # output after the last newline, at most LINE_MAX bytes
        self.midline = False  # `held` goes on a line already given in part

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        data = self.held + chunk
        *lines, rest = data.split(b"\n")
        starts = not self.midline  # of the first line here (or of `rest`, if none)
        if len(data) <= LINE_MAX or (
            len(rest) <= LINE_MAX and max(map(len, lines), default=0) <= LINE_MAX
        ):
            out = [(line, True) for line in lines]
            if out and not starts:
                out[0] = (out[0][0], False)
            self.held, self.midline = rest, not (starts or lines)
            return out
        out = []
        for line in lines:
            out += _pieces(line, starts)
            starts = True
        *more, (self.held, held_starts) = _pieces(rest, starts)
        self.midline = not held_starts
        return out + more

    def end(self) -> tuple[bytes, bool] | None:
        """What is held when the output ends (a last line with no newline), if any."""
        held, self.held = self.held, b""
        return (held, not self.midline) if held else None


def _pieces(line: bytes, starts: bool) -> list[tuple[bytes, bool]]:
    """`line` cut into pieces of at most LINE_MAX bytes, between characters, each with
    whether it starts a line (the first, if `line` does)."""
    pieces = []
    while len(line) > LINE_MAX:
        cut = _character_start(line, LINE_MAX)
        if line[cut:] == b"\r":  # the CR of a CRLF: it goes with the end of the line
            cut = _character_start(line, cut - 1)
        pieces.append((line[:cut], starts))
        line = line[cut:]
        starts = False
    pieces.append((line, starts))
    return pieces


def _character_start(data: bytes, at: int) -> int:
    """Where the UTF-8 character that holds `data[at]` starts: `at`, or up to three
    bytes before it (`at` itself where the bytes are not UTF-8)."""
    for back in range(4):
        if at - back > 0 and data[at - back] & 0xC0 != 0x80:  # not a continuation byte
            return at - back
    return at


def progress_of(line: str) -> tuple[float, float | None, str | None] | None:
    """`conveyor:progress 3/10 reading logs` -> (3.0, 10.0, 'reading logs'); None for
    any other line. (Here, standard library only, for the launcher to pass on real
    reports only; `conveyor.executors.parse_progress_line` makes a `Progress` of it.)"""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    count, _, message = line[len(PROGRESS_PREFIX) :].strip().partition(" ")
    current, _, total = count.partition("/")
    try:
        numbers = float(current), float(total) if total else None
    except ValueError:
        return None
    if not all(math.isfinite(n) for n in numbers if n is not None):
        return None  # nan, inf, 1e999: not a report (a database may not hold it)
    return numbers[0], numbers[1], message.strip() or None


def which(found: dict[tuple[str, str | None], str], name: str, path: str | None) -> str | None:
    """Where `name` is in `path` (a PATH), as execvp would find it; kept in `found`, so
    each program is looked for once (left to exec, every spawn tries each PATH entry
    in turn), unless a folder of `path` is relative: then what is found depends on the
    current working directory (and a result may be relative to it)."""
    hit = found.get((name, path))
    if hit is None:
        hit = shutil.which(name, path=path)
        if hit is not None and fixed_path(path):
            found[(name, path)] = hit
    return hit


def fixed_path(path: str | None) -> bool:
    """Whether every folder of `path` (a PATH; None: this process's) is absolute, so
    that what is found in it is the same in every working directory."""
    if path is None:
        path = os.environ.get("PATH", os.defpath)
    return all(folder[:1] == "/" for folder in path.split(os.pathsep))


def cwd_problem(cwd: str) -> str | None:
    """Why `cwd` cannot be a command's working directory, if it cannot."""
    try:
        mode = os.stat(cwd).st_mode
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISDIR(mode):
        return os.strerror(errno.ENOTDIR)
    return None if os.access(cwd, os.X_OK) else os.strerror(errno.EACCES)


def _not_found(name: str, path: str) -> OSError:
    """The error for a program `name` that is not in `path`, as execvp gives it: EACCES
    when a folder of `path` holds a file of that name that may not be run (which would
    have found a runnable one), else ENOENT."""
    for folder in path.split(os.pathsep):
        if os.path.isfile(os.path.join(folder or ".", name)):
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


def command_line(argv: list[str]) -> str:
    """A command's log's first line (without its newline): `$ ` and its arguments."""
    return "$ " + " ".join(argv)


def log_end(code: int, killed: str | None = None) -> str:
    """A command's log's last line: how it ended (`killed` by request, with the reason)."""
    return (f"killed: {killed}" if killed else f"exit code {code}") + "\n"


def make_dir(path: str) -> None:
    """Make a directory and, when missing, its parents: one system call in the usual case
    (the parent exists), where `Path.mkdir(parents=True)` checks more."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def open_log(path: str) -> int:
    """A log file, opened for appending (and made, with its folder, if need be)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:  # its folder (the request's) is made by the first attempt
        make_dir(os.path.dirname(path))
        return os.open(path, flags, 0o666)


def _write(fd: int, text: str) -> None:
    data = text.encode("utf-8", "replace")
    while data:
        data = data[os.write(fd, data) :]


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group, unless it is gone (or not ours)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# the worker's side ----------------------------------------------------------------------
class LauncherGone(Exception):
    """The launcher has stopped (killed, or it failed)."""


_LAUNCHERS: weakref.WeakSet[Launcher] = weakref.WeakSet()


def _forget_launchers() -> None:
    """In a forked child: its copies of the launchers' sockets are closed, so a launcher
    still sees the end of file when its worker dies."""
    for launcher in list(_LAUNCHERS):
        launcher.sock.close()
        launcher.broken = launcher.eof = True


class Launcher:
    """A command loop's launcher, started with it and used from the loop's thread only.
    What `run` and `kill` ask goes to the launcher at the next `flush`."""

    def __init__(self, environ: dict[str, str], keys: Iterator[int] | None = None) -> None:
        """`environ`: the environment its commands start from (the worker's); `keys`:
        where the keys of its commands come from (by default its own count)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Its stderr is the worker's: should it fail, the traceback is seen there.
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", PROGRAM],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.fd = ours.fileno()
        self.eof = False  # all it said has been read: it has stopped
        self.broken = False  # it can no longer be told anything
        self.heard = False  # it has said something: it runs
        self.running = 0  # attempts of its loop's that it runs
        self._keys = itertools.count(1) if keys is None else keys
        self._out = bytearray(_frame(("hello", PROTOCOL, environ)))
        self._in = bytearray()
        _LAUNCHERS.add(self)

    def run(
        self, argv: list[str], cwd: str, changes: dict[str, str], log_file: str, work_dir: str
    ) -> int:
        """Ask for `argv` to be run in `cwd` (absolute paths), its output going to
        `log_file`, after making `work_dir` (unless ""); its key, which the launcher's
        messages about it carry."""
        key = next(self._keys)
        self._out += _frame(("run", key, argv, cwd, changes, log_file, work_dir))
        return key

    def kill(self, key: int, sig: int, reason: str) -> None:
        """Signal the group of the command `key`, unless it has already been reaped;
        `reason` goes in its log."""
        self._out += _frame(("kill", key, int(sig), reason))

    def flush(self) -> None:
        """Send what was asked. The launcher always reads, so this waits only while it
        catches up. LauncherGone: it cannot be told (what it has said can still be
        read)."""
        if not self._out:
            return
        try:
            if self.broken:
                raise LauncherGone()
            self.sock.sendall(self._out)
        except OSError as exc:
            self.broken = True
            raise LauncherGone() from exc
        finally:
            self._out.clear()

    def read(self) -> list[tuple[Any, ...]]:
        """The messages that have come; `eof` is set once it has all been read."""
        if not self.eof:
            self.eof = _drain(self.sock, self._in)
        messages = _unframe(self._in)
        self.heard = self.heard or bool(messages)
        return messages

    def stop(self) -> None:
        """Kill it (it no longer works); what it said can still be read."""
        self.broken = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def let_go(self) -> None:
        """Close its socket: it sends what it still runs SIGTERM, then SIGKILL after a
        grace, and exits. (`close` waits for that too.)"""
        self.sock.close()
        self.broken = self.eof = True

    def close(self, timeout: float = GRACE + 5) -> None:
        """Let it go, and wait for it to exit."""
        self.let_go()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_launchers)


def main() -> None:
    # Signals meant for the worker's process group do not stop the launcher (it runs in
    # a session of its own anyway); it ends when the worker does. A handler, not
    # SIG_IGN: an ignored signal would stay ignored in the commands it starts.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda _s, _f: None)
    # Its children are its own to reap, whatever it inherited.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The socket comes as standard input: it moves to a close-on-exec descriptor, and
    # /dev/null takes its place as the standard input every command inherits. Standard
    # output is /dev/null too; standard error is the worker's.
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    launcher = _Launcher(sock)
    try:
        launcher.serve()
    finally:
        launcher.shut_down()


if __name__ == "__main__":
    main()
