"""Turns to write a SQLite file: the writers of every process sharing the file (`serve
--workers`, `worker --processes`, an ingester, a CLI beside them) queue for SQLite's
write lock on an flock(2) of a file beside the database, `<database>-lock`, taken
before BEGIN IMMEDIATE and given up when the connection goes back to the pool (for a
transaction of `engine.begin()`, right after its commit). Within a process, a thread
lock comes first; one `WriterQueue` per file and process (`writer_queue`) serves all
its engines.

Left to SQLite, a writer that finds the write lock taken sleeps in its busy handler's
growing steps (1, 2, 5, 10 ms and on, up to 100 ms), while the holder is done in a
fraction of a millisecond. Here a writer waiting for another process tries again after
0.1 ms, then at most every 1 ms. No lock-file library is used: their polling steps are
tens of milliseconds, and this wait is on every write's path.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import threading
import time
import weakref
from contextlib import suppress


class WriterQueue:
    """`take` waits up to its `timeout` in all, then fails as SQLite's own wait does
    ("database is locked"). When the wait for the lock file alone took the whole
    time-out, the holder is taken to be stuck (a process stopped while holding its
    turn): until the lock file is next locked, writers wait for it only `STUCK_WAIT`
    and then go on to SQLite's own wait, so it does not cost every write a time-out.
    Where the lock file cannot be opened or locked (a read-only folder, something other
    than a regular file in its place, a file system without flock), writers go straight
    to SQLite's wait, as without it."""

    STUCK_WAIT = 0.1

    def __init__(self, database: str) -> None:
        self._file = _LockFile(f"{database}-lock", database)
        weakref.finalize(self, self._file.close)
        self._lock = threading.Lock()
        # The fields below change only while `_lock` is held.
        self._turn = 0  # the number of the turn held, or last held
        self._held = False
        self._locked = False  # the lock file too
        self._stuck = False

    def _forked(self) -> None:
        """In a child just forked, where a thread of the parent may have been waiting
        for the turn or holding it: the child's copy of the lock file is closed (the
        parent's lock stays the parent's until it gives the turn up), and the thread
        lock is a new one."""
        self._file.forget()
        self._lock = threading.Lock()
        self._held = self._locked = False

    def take(self, timeout: float) -> tuple[int, float]:
        """Wait for the turn: its number (for `release`) and the seconds waited. Raises
        sqlite3.OperationalError when the wait runs out of time."""
        started = time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            raise sqlite3.OperationalError("database is locked (by a writer of this process)")
        try:
            fd = self._file.open()
            if fd is not None:
                self._locked = self._flock(fd, started + timeout, timeout)
        except BaseException:
            self._lock.release()
            raise
        self._turn += 1
        self._held = True
        return self._turn, time.monotonic() - started

    def _flock(self, fd: int, deadline: float, timeout: float) -> bool:
        """Whether the lock file was locked; False: going on without it."""
        started = time.monotonic()
        if self._stuck:
            deadline = min(deadline, started + self.STUCK_WAIT)
        pause = 0.0001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._stuck = False
                return True
            except BlockingIOError:
                pass
            except OSError:
                self._file.close()  # no flock here: not tried again
                return False
            now = time.monotonic()
            if now >= deadline:
                if self._stuck:
                    return False
                waited = now - started
                # stuck only if the lock file alone took the whole time-out, not when
                # this process's own writers used most of it
                self._stuck = waited >= timeout * 0.99
                raise sqlite3.OperationalError(
                    f"database is locked (waited {waited:.3g} s for another process's turn)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    def release(self, turn: int) -> None:
        """Give turn `turn` up (the transaction is over); a turn no longer held, or
        taken before a fork, is not given up again."""
        if not self._held or turn != self._turn:
            return
        self._held = False
        try:
            if self._locked:
                self._locked = False
                self._file.unlock()
        finally:
            self._lock.release()


class _LockFile:
    """A queue's lock file, opened on first use and kept open: a turn costs two flock
    calls. Apart from the queue, so that closing it when the queue goes needs no
    reference to the queue."""

    def __init__(self, path: str, database: str) -> None:
        self.path = path
        self.database = database
        self.fd: int | None = None
        self.tried = False

    def open(self) -> int | None:
        if not self.tried:
            self.tried = True
            self.fd = self._open()
        return self.fd

    def _open(self) -> int | None:
        # Read-only: flock needs no more, and a database shared between users may have a
        # lock file another user made. Not through a symbolic link, and never blocking
        # (a FIFO in its place); only a regular file will do.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                try:
                    mode = os.stat(self.database).st_mode & 0o666
                except OSError:
                    mode = 0o644
                fd = os.open(self.path, flags | os.O_CREAT, mode)  # as SQLite's -wal, -shm
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def unlock(self) -> None:
        if self.fd is not None:
            with suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close this process's descriptor (a lock the process holds goes with it)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)

    def forget(self) -> None:
        """In a forked child: close its copy (which leaves the parent's lock alone, the
        parent's descriptor being open), and open the file again when next needed."""
        self.close()
        self.tried = False


_QUEUES: weakref.WeakValueDictionary[str, WriterQueue] = weakref.WeakValueDictionary()
_QUEUES_LOCK = threading.Lock()


def writer_queue(database: str) -> WriterQueue:
    """The process's queue for a database file (an absolute path, links resolved):
    every engine on the file shares it."""
    with _QUEUES_LOCK:
        queue = _QUEUES.get(database)
        if queue is None:
            queue = _QUEUES[database] = WriterQueue(database)
        return queue


def _after_fork() -> None:
    global _QUEUES_LOCK
    _QUEUES_LOCK = threading.Lock()  # a thread of the parent may have held it
    for queue in list(_QUEUES.values()):
        queue._forked()


os.register_at_fork(after_in_child=_after_fork)
