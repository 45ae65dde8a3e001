"""The command loop: one thread that runs all of a worker's plain command attempts at
once, waiting on all their descriptors (output pipes, pidfds) in one poll(2).

Why not a thread per running command: each thread's every system call gives up and
takes back the interpreter lock, and with several threads wanting it each hand-over is a
futex wake and a context switch. For short commands that bookkeeping costs more than
the commands; one thread that sleeps only when nothing is ready does the same work with
a fraction of the hand-overs. Longer work in an attempt (uploading outputs, loading a
result file) still runs in the worker's runner threads.

The loop is given its work as items of the worker's own (`T`), with two callbacks:
`begin(item)` says what to run (or None: the item is no longer to run, and `begin` has
dealt with it), `end(item, result)` takes the result. How many attempts run at once is
shared with the runner threads through `Slots`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from conveyor.executors import ExecResult, TaskContext
from conveyor.executors.command import Attempt, CommandExecutor, Launched, _pidfd
from conveyor.executors.launcher import Launcher, LauncherGone
from conveyor.pipelines import Pipeline

log = logging.getLogger(__name__)

T = TypeVar("T")


def usable() -> bool:
    """The loop sees exits through pidfds: Linux 5.3 and later."""
    fd = _pidfd(os.getpid())
    if fd is None:
        return False
    os.close(fd)
    return True


class Slots:
    """How many attempts may run at once (a worker's concurrency), shared by threads
    that wait for a slot and by command loops, which must never wait: a loop that finds
    none free leaves a callback, called when one comes back."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting: list[Callable[[], None]] = []
        # Threads blocked in `take`, and slots given back to them: a loop, which takes
        # slots as fast as they come back, must not keep them from those threads.
        self._blocked = 0
        self._handed = 0

    def take(self) -> None:
        with self._lock:
            if self._free and not self._blocked:
                self._free -= 1
                return
            self._blocked += 1
            try:
                while not self._handed:
                    if self._free:  # given back before this thread blocked
                        self._free -= 1
                        return
                    self._freed.wait()
                self._handed -= 1
            finally:
                self._blocked -= 1

    def try_take(self, or_call: Callable[[], None]) -> bool:
        """Take a slot if one is free; if not, `or_call` is called once one is given
        back. (A plain lock, not a semaphore: a loop takes a slot per command.)"""
        with self._lock:
            if self._free:
                self._free -= 1
                return True
            if or_call not in self._waiting:
                self._waiting.append(or_call)
            return False

    def give(self) -> None:
        with self._lock:
            if self._blocked > self._handed:
                self._handed += 1  # to a blocked thread, not to whoever asks first
                self._freed.notify()
                return
            self._free += 1
            waiting, self._waiting = self._waiting, []
        for call in waiting:
            call()


@dataclass(frozen=True)
class Job:
    pipeline: Pipeline
    ctx: TaskContext
    deadline: float | None


class CommandLoop(Generic[T]):
    def __init__(
        self,
        executor: CommandExecutor,
        slots: Slots,
        begin: Callable[[T], Job | None],
        end: Callable[[T, ExecResult], None],
        name: str = "conveyor-commands",
        launchers: int = 1,
    ) -> None:
        """`launchers`: how many launcher processes start its commands, each new command
        going to the one with the fewest running."""
        self._executor = executor
        self._slots = slots
        self._begin = begin
        self._end = end
        self._pending: deque[T] = deque()
        self._running: dict[Attempt | Launched, T] = {}
        self._by_fd: dict[int, Attempt] = {}
        # Its commands are run by launcher processes (`executors.launcher`), made when
        # first wanted; the attempts they run, by key (unique across them). Where none
        # can be started, the loop runs its commands itself (`Attempt`).
        self._n_launchers = max(1, launchers)
        self._launchers: dict[int, Launcher] = {}  # by socket descriptor
        self._keys = itertools.count(1)
        self._launcher_failed = False
        self._deaths = 0  # launchers that stopped since a command last ended
        self._launched: dict[int, Launched] = {}
        # When the running attempts next need a look for what time alone tells (stop
        # requests, deadlines; `Attempt.check`), by time.time().
        self._due = 0.0
        self._poller = select.poll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poller.register(self._wake_r, select.POLLIN)
        # Set while the loop may be (or is about to be) asleep: only then do submits
        # and freed slots write to the wake pipe, and only once until it is read.
        self._listening = False
        self._poked = False
        self._closing = False
        self._abandon = False
        self._shut = False  # the wake pipe is closed
        self._wake_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # other threads ------------------------------------------------------------------
    def submit(self, item: T) -> None:
        """Run `item` once a slot is free."""
        self._pending.append(item)
        self._poke()

    def stop(self) -> None:
        """Stop once every attempt has ended (the worker has asked them to stop)."""
        self._closing = True
        self._wake()

    def close(self, timeout: float = 30.0) -> None:
        """`stop`, and wait for it; attempts still running after `timeout` are killed."""
        if self._shut:
            return
        self.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("commands did not stop in %.0f s; killing them", timeout)
            self._abandon = True
            self._wake()
            self._thread.join(10)
        if not self._thread.is_alive():
            with self._wake_lock:
                self._shut = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _poke(self) -> None:
        """Wake the loop if it may be asleep and nobody has yet."""
        if self._listening and not self._poked:
            self._wake()

    def _wake(self) -> None:
        self._poked = True
        with self._wake_lock:  # never a write to a closed (perhaps reused) descriptor
            if self._shut:
                return
            with contextlib.suppress(BlockingIOError):  # full: it is awake anyway
                os.write(self._wake_w, b"x")

    # the loop's thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._turn():
                    break
            except Exception:  # a bug here must not stop the commands being seen to
                log.exception("the command loop failed; going on")
                time.sleep(0.1)
        for attempt in list(self._running):
            self._step(attempt, None, time.time(), abandon=True)
        while self._pending:
            self._fail(self._pending.popleft(), "the command loop stopped")
        for launcher in self._launchers.values():
            launcher.let_go()  # all at once: their graces run together
        for launcher in self._launchers.values():
            launcher.close()

    def _turn(self) -> bool:
        """One turn of the loop: start what may start, wait for something to happen,
        act on it. True: time to stop."""
        self._listening = True  # from here on, news pokes the loop
        if self._abandon:
            return True
        self._start_pending()
        if self._closing and not self._running and not self._pending:
            return True
        ready = self._poller.poll(self._timeout_ms())
        self._listening = False
        for fd, _ in ready:
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                # Cleared only once drained: a poke meanwhile leaves its byte, or its item
                # is seen when the next turn starts what is pending.
                self._poked = False
                continue
            launcher = self._launchers.get(fd)
            if launcher is not None:
                self._heard(launcher)
                continue
            attempt = self._by_fd.get(fd)
            if attempt is not None:
                self._step(attempt, fd)
        for launcher in list(self._launchers.values()):
            if launcher.broken:  # a kill did not reach it
                self._lost(launcher)
        now = time.time()
        if now >= self._due:
            for running in list(self._running):
                self._step(running, None, now)
            self._due = now + self._wait_ms(now) / 1000
        return False

    def _wait_ms(self, now: float) -> int:
        """How long until the running attempts need a look, however quiet they are."""
        return min(
            (
                10 if isinstance(a, Attempt) and a.pidfd is None else a.wait_ms(now)
                for a in self._running
            ),
            default=Attempt.STOP_CHECK_MS,
        )

    def _timeout_ms(self) -> int:
        if not self._running:
            return -1  # a submit, a freed slot or close() wakes it
        return max(0, int((self._due - time.time()) * 1000) + 1)

    def _start_pending(self) -> None:
        while self._pending and self._slots.try_take(self._poke):
            item = self._pending.popleft()
            started: Attempt | Launched | ExecResult | None = None
            try:
                job = self._begin(item)
                if job is None:
                    self._slots.give()
                    continue
                launcher = self._launcher_now()
                if launcher is not None:
                    started = self._executor.launch(job.pipeline, job.ctx, job.deadline, launcher)
                else:
                    started = self._executor.start(job.pipeline, job.ctx, job.deadline)
                if isinstance(started, ExecResult):
                    self._finish(item, started)
                    continue
                if isinstance(started, Launched):
                    self._launched[started.key] = started
                    started.launcher.running += 1
                else:
                    started.watch(self._poller)
                    for fd in started.fds():
                        self._by_fd[fd] = started
            except Exception as exc:
                log.exception("starting a command failed")
                if isinstance(started, Attempt):
                    started.abandon()
                    for fd in started.fds():
                        self._by_fd.pop(fd, None)
                self._finish(item, ExecResult(ok=False, error=f"executor error: {exc}"))
                continue
            self._running[started] = item
            now = time.time()
            self._due = min(self._due, now + started.wait_ms(now) / 1000)
        for launcher in list(self._launchers.values()):
            try:
                launcher.flush()  # the commands started in this turn, in one write
            except LauncherGone:
                self._lost(launcher)

    def _launcher_now(self) -> Launcher | None:
        """The launcher to start a command with: the one running the fewest, or a new
        one while there are fewer than wanted and each runs something. None: start it
        in this process."""
        for launcher in list(self._launchers.values()):
            if launcher.broken or launcher.eof:
                self._lost(launcher)
        if self._launcher_failed:
            return None
        best = min(self._launchers.values(), key=lambda launcher: launcher.running, default=None)
        if best is None or (best.running and len(self._launchers) < self._n_launchers):
            try:
                new = Launcher(self._executor.environ, self._keys)
            except OSError:
                self._start_no_more("cannot start a command launcher", best is not None, True)
                return best
            self._poller.register(new.fd, select.POLLIN)
            self._launchers[new.fd] = best = new
        return best

    def _heard(self, launcher: Launcher) -> None:
        """Act on what the launcher has said."""
        for message in launcher.read():
            attempt = self._launched.get(message[1])
            if attempt is None:
                continue  # abandoned meanwhile
            try:
                kind, _, *rest = message
                if kind == "pid":
                    attempt.pid = rest[0]
                elif kind == "progress":
                    self._act(attempt, attempt.progress, rest[0])
                elif kind == "exit":
                    self._deaths = 0  # launchers do work here
                    self._act(attempt, attempt.exited, *rest)
                elif kind == "error":
                    self._act(attempt, attempt.failed, rest[0], rest[1])
            except Exception:  # a bug: the other messages are still acted on
                log.exception("a message of the command launcher could not be acted on")
        if launcher.eof:
            self._lost(launcher)

    def _lost(self, launcher: Launcher) -> None:
        """The launcher has stopped, or can no longer be told anything (then it is
        killed). What it said is acted on first; the attempts it ran whose end it did
        not report fail (their commands, which nothing watches now, are killed), and
        another starts when one is wanted."""
        if self._launchers.get(launcher.fd) is not launcher:
            return
        del self._launchers[launcher.fd]
        try:
            launcher.stop()
            self._heard(launcher)  # to its end of file
        finally:
            self._poller.unregister(launcher.fd)
            launcher.close()
            for attempt in list(self._launched.values()):
                if attempt.launcher is launcher:
                    self._act(attempt, attempt.lost, "the command launcher stopped")
        self._deaths += 1
        # One that never said anything, or several in a row that died before any
        # command ended, cannot run here: another would fail the same way. The loop
        # goes on with those that run, else runs its commands itself.
        if not launcher.heard or self._deaths >= 3:
            running = any(other.heard for other in self._launchers.values())
            self._start_no_more("the command launcher stopped", running)
        else:
            log.error("the command launcher stopped; starting another")

    def _start_no_more(self, why: str, others: bool, exc_info: bool = False) -> None:
        """Start no more launchers: go on with the `others` that run, else (none) run
        the commands in this process from now on."""
        if others:
            self._n_launchers = len(self._launchers)
            log.error("%s; the loop goes on with %d", why, self._n_launchers, exc_info=exc_info)
        else:
            self._launcher_failed = True
            log.error("%s; the loop runs its commands itself", why, exc_info=exc_info)

    def _step(
        self, attempt: Attempt | Launched, fd: int | None, now: float = 0.0, abandon: bool = False
    ) -> None:
        """Move one attempt on (its `fd` is readable, or time has passed); hand over its
        result once it has one."""
        if abandon:
            self._act(attempt, attempt.abandon)
        elif fd is not None:
            assert isinstance(attempt, Attempt)
            self._act(attempt, attempt.ready, fd)
        else:
            self._act(attempt, attempt.check, now)

    def _act(self, attempt: Attempt | Launched, action: Callable[..., None], *args: Any) -> None:
        """`action(*args)` on `attempt`; its result handed over once it has one."""
        try:
            action(*args)
        except Exception as exc:
            log.exception("a command attempt failed in the loop")
            attempt.abandon()
            if attempt.result is None:
                attempt.result = ExecResult(ok=False, error=f"executor error: {exc}")
        if attempt.result is None:
            return
        item = self._running.pop(attempt)
        if isinstance(attempt, Launched):
            del self._launched[attempt.key]
            attempt.launcher.running -= 1
        else:
            for descriptor in attempt.fds():
                self._by_fd.pop(descriptor, None)
        self._finish(item, attempt.result)

    def _finish(self, item: T, result: ExecResult) -> None:
        """`item`, which had a slot, is done with: the slot is free, the result handed
        back."""
        self._slots.give()
        self._hand_back(item, result)

    def _hand_back(self, item: T, result: ExecResult) -> None:
        try:
            self._end(item, result)
        except Exception:  # the caller's bug: the loop and the other attempts go on
            log.exception("handing back a command attempt's result failed")

    def _fail(self, item: T, why: str) -> None:
        try:
            job = self._begin(item)
        except Exception:
            log.exception("could not hand back a command attempt")
            return
        if job is not None:
            self._hand_back(item, ExecResult(ok=False, error=why))
