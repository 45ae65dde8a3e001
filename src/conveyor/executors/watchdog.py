"""The command watchdog: a tiny process beside each worker that kills the worker's
commands if the worker dies without doing so itself (SIGKILL, OOM killer, a crash).

The worker tells it, over a pipe, each process group it starts (`+PGID`) and ends
(`-PGID`). When the pipe reaches end of file, the worker is gone: the watchdog sends
SIGTERM to every group still registered, then SIGKILL to what is left after a grace
period, and exits.

Why not PR_SET_PDEATHSIG in a `preexec_fn`: a `preexec_fn` makes every spawn a full
`fork()` of the worker instead of a `vfork()`, several times the cost of starting a short
command, and the signal reaches only the direct child, not the group it starts. Here the
per-command cost is two small writes to a pipe, and the whole group goes.

It runs as `python -I -S .../watchdog.py`: standard library only, so it starts fast
and imports nothing of the worker's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE = 5.0
# After each read, the watchdog sleeps this long before reading again: the worker's
# messages pile up in the pipe meanwhile and come in one read, where reading each as it
# comes would wake the watchdog twice per command. Nothing waits on it: a write to the
# pipe returns at once while the pipe has room (64 KiB, thousands of messages).
BATCH = 0.02


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> None:
    # It ends when the worker does (end of file), not on the signals meant for the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    live: set[int] = set()
    buf = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            if line[:1] == b"+":
                live.add(pgid)
            elif line[:1] == b"-":
                live.discard(pgid)
        time.sleep(BATCH)
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + GRACE
    while live and time.monotonic() < deadline:
        live = {g for g in live if _alive(g)}
        time.sleep(0.05)
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Watchdog:
    """The worker's side: started on first use, told of each group."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        # Held while the pipe is written, so that `close` never frees its descriptor
        # (whose number the next file opened would get) under a write.
        self._lock = threading.Lock()

    def _start(self) -> int | None:
        """Start the watchdog (the lock held); its pipe, or None if it cannot start."""
        read, write = os.pipe()  # both non-inheritable: commands do not get them
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__)],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            os.close(write)
            return None
        finally:
            os.close(read)
        self._fd = write
        return write

    def started(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)

    def ended(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid)

    def _send(self, line: bytes) -> None:
        with self._lock:
            fd = self._fd
            if fd is None:
                if line.startswith(b"-"):
                    return  # no watchdog (stopped, or never started): nothing listed
                fd = self._start()  # a command started after `close` is guarded too
                if fd is None:
                    return
            try:
                os.write(fd, line)  # shorter than PIPE_BUF: written whole
            except OSError:
                pass  # the watchdog is gone; the commands still run, unguarded

    def close(self) -> None:
        """Stop it (the worker has killed its commands itself)."""
        with self._lock:
            fd, self._fd = self._fd, None
            proc, self._proc = self._proc, None
        if fd is not None:
            os.close(fd)  # its end of file: it stops what is still listed, and exits
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
