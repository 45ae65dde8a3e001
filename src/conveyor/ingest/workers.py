"""The ingester's worker processes: each prepares the chunks of files it is sent, over
a pipe of its own, and sends back what they became.

Written here rather than taken from `concurrent.futures.ProcessPoolExecutor`, whose
every call and result goes through two more threads of the ingester's process and a
queue shared under a lock. At thousands of small files a second that doubled the CPU
the ingester's own process spent on its workers (measured on 2,000 KCIDB files: 15 ms
against 7 ms, and 75 ms against 66 ms of wall time to prepare them all), on a machine
where the workers, the writer and the database share the cores. This pool is also
what a long-running ingester needs from one: a worker that dies (killed, out of
memory) is replaced, and only the files it held are tried again later.

A worker is forked when the ingester's process has no other thread (it then inherits
the stages built and warm), else started afresh (`spawn`). It says when it is ready,
then prepares its chunks in the order sent. When it dies, the chunk it was on is the
suspect (`Failed.culprit`); the chunks queued behind it come back untouched; and if it
died before it was ready, no chunk is to blame. It stops when told, when its pipe
closes, or when the ingester is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from conveyor.ingest.prepare import Chunk, Plan, Stages, gather

log = logging.getLogger(__name__)
_STOP = b""
_READY = "ready"  # a worker's first message
_SEP = "\0"  # between file names in a request: no file name holds it
_JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class Failed:
    """A chunk its worker could not prepare: the worker died, or a stage raised.
    `culprit`: the worker was preparing it (a stage raised, or it died on it); else it
    waited behind that chunk, or its worker died before it was ready. `ready`: whether
    the worker had started (False: workers cannot start, whatever the files)."""

    reason: str
    culprit: bool = True
    ready: bool = True


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    sent: deque[list[str]] = field(default_factory=deque)  # in flight, oldest first
    ready: bool = False
    began: float = 0.0  # when it began the oldest chunk in flight (monotonic)
    overdue: str | None = None  # why it was killed, when it took too long


class WorkerPool:
    def __init__(
        self,
        plan: Plan,
        workers: int,
        per_worker: int = 4,
        start: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        """`start`: "fork" or "spawn"; by default fork while this process has only one
        thread (forking beside other threads is unsafe: a lock one of them holds stays
        held in the child), else spawn. `timeout`: seconds a worker may take per file of
        a chunk before it is killed (a stage hung on a file system, say)."""
        if start not in (None, "fork", "spawn"):
            raise ValueError(f"start: expected 'fork' or 'spawn', got {start!r}")
        self.plan = plan
        self.per_worker = per_worker
        self.timeout = timeout
        self._method = start
        self._lost: list[tuple[list[str], Chunk | Failed]] = []  # of workers found dead
        self._warm: Stages | None = None
        if self._forking():
            self._warm = Stages(plan)  # the children inherit it built and warm
            self._warm.warm()
        self._workers: list[_Worker] = []
        for _ in range(workers):
            self._workers.append(self._start())

    def _forking(self) -> bool:
        return self._method == "fork" or (self._method is None and threading.active_count() == 1)

    def _start(self) -> _Worker:
        ours, theirs = multiprocessing.Pipe()
        ctx: multiprocessing.context.BaseContext
        if self._warm is not None and self._forking():
            ctx = multiprocessing.get_context("fork")
            # a forked worker closes the pipes of the others: a pipe then closes when
            # the ingester's process is gone, and the worker sees it
            others = [ours, *(w.conn for w in self._workers)]
            args: tuple[object, ...] = (theirs, self._warm, None, others)
        else:  # beside other threads only a fresh interpreter is safe
            ctx = multiprocessing.get_context("spawn")
            args = (theirs, None, self.plan, [])
        process = ctx.Process(target=_serve, args=args, name="conveyor-ingest-worker", daemon=True)
        process.start()
        theirs.close()
        return _Worker(process, ours)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    @property
    def capacity(self) -> int:
        """Chunks that can be sent now."""
        return sum(self.per_worker - len(w.sent) for w in self._workers)

    @property
    def in_flight(self) -> int:
        return sum(len(w.sent) for w in self._workers)

    def send(self, names: list[str]) -> None:
        """To the worker with the fewest chunks in flight (one found dead meanwhile is
        replaced first)."""
        worker = min(self._workers, key=lambda w: len(w.sent))
        if not worker.sent and not worker.process.is_alive():
            self._lost.extend(self._replace(worker))
            worker = min(self._workers, key=lambda w: len(w.sent))
        if not worker.sent:
            worker.began = time.monotonic()
        worker.sent.append(names)
        try:
            worker.conn.send_bytes(_SEP.join(names).encode("utf-8", "surrogateescape"))
        except OSError:
            pass  # it died: its chunks come back as failed from `results`

    def results(self, timeout: float) -> list[tuple[list[str], Chunk | Failed]]:
        """What the workers sent back within `timeout` seconds (at least one result, if
        any came); the chunks of a worker that died come back as Failed, and a new
        worker takes its place. A worker that takes longer than its time for the chunk
        it is on (counted from when it began it, or from when it was ready) is killed."""
        out, self._lost = self._lost, []
        busy = [w for w in self._workers if w.sent]
        if not busy:
            return out
        self._kill_overdue(busy, out)
        busy = [w for w in busy if w.sent]
        # wake for the next worker to become overdue (one already killed wakes the wait
        # by exiting)
        due = [self._due(w) for w in busy if w.overdue is None]
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic() + 0.01))
        # One wait for all: a pipe is ready when results came, a sentinel when its
        # process has exited.
        ready = set(
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], 0 if out else timeout)
        )
        for w in busy:
            if w.conn in ready:
                self._receive(w, out)
            if w.process.sentinel in ready:
                out.extend(self._replace(w))
        return out

    def _receive(self, w: _Worker, out: list[tuple[list[str], Chunk | Failed]]) -> None:
        """The messages waiting from `w`: results (onto `out`) and its READY."""
        try:
            while w.conn.poll():
                message = w.conn.recv()
                if message == _READY:
                    w.ready = True
                    w.began = time.monotonic()  # its start-up is not the chunk's time
                elif w.sent:
                    out.append((w.sent.popleft(), message))
                    w.began = time.monotonic()
        except (EOFError, OSError):
            pass

    def _due(self, w: _Worker) -> float:
        """When `w`, busy, is overdue with the chunk it is on."""
        return w.began + self.timeout * len(w.sent[0])

    def _kill_overdue(
        self, busy: list[_Worker], out: list[tuple[list[str], Chunk | Failed]]
    ) -> None:
        """Kill the workers past their time, after taking what they sent already (onto
        `out`): a result that came in time is not lost."""
        now = time.monotonic()
        for w in busy:
            if w.overdue is not None or now <= self._due(w):
                continue
            self._receive(w, out)
            if w.sent and now > self._due(w):  # still on a chunk, and past its time
                files = len(w.sent[0])
                what = f"{files} files" if files != 1 else "a file"
                w.overdue = f"preparing {what} took longer than {self.timeout * files:g}s"
                w.process.kill()  # its chunks come back through _replace

    def _replace(self, dead: _Worker) -> list[tuple[list[str], Chunk | Failed]]:
        """What the dead worker sent before it died, its other chunks as Failed, and
        another worker in its place."""
        out: list[tuple[list[str], Chunk | Failed]] = []
        self._receive(dead, out)
        dead.process.join(_JOIN_TIMEOUT)
        reason = f"worker process {dead.process.pid} exited with code {dead.process.exitcode}"
        if dead.overdue is not None:
            reason = f"worker process {dead.process.pid} killed: {dead.overdue}"
        lost = [
            (names, Failed(reason, culprit=dead.ready and i == 0, ready=dead.ready))
            for i, names in enumerate(dead.sent)
        ]
        dead.conn.close()
        log.error(
            "%s%s, holding %d files; starting another",
            reason,
            "" if dead.ready else " before it was ready",
            sum(len(n) for n, _ in lost),
        )
        self._workers[self._workers.index(dead)] = self._start()
        return out + lost

    def abandon(self) -> list[str]:
        """The names of the files in flight, no longer waited for (stopping: the
        workers are stopped or killed by `close`, and the files stay pending)."""
        names = [name for w in self._workers for chunk in w.sent for name in chunk]
        for w in self._workers:
            w.sent.clear()
        return names

    def close(self) -> None:
        """Stop every worker (after the chunk it is on) and wait for it."""
        for w in self._workers:
            try:
                w.conn.send_bytes(_STOP)
            except OSError:
                pass
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


def _serve(
    conn: Connection, stages: Stages | None, plan: Plan | None, inherited: list[Connection]
) -> None:
    """A worker process: prepare each chunk of names it is sent until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ingester decides when to stop
    for other in inherited:
        other.close()
    if stages is None:  # started afresh: each schema version is compiled when first met
        assert plan is not None
        stages = Stages(plan)
    try:
        conn.send(_READY)
    except OSError:  # the ingester is gone
        os._exit(0)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the ingester is gone
            break
        if data == _STOP:
            break
        names = data.decode("utf-8", "surrogateescape").split(_SEP)
        try:
            result: Chunk | Failed = gather([stages.run(name) for name in names])
        except Exception:  # a bug in a stage: the files stay pending, the worker lives on
            result = Failed(traceback.format_exc())
        conn.send(result)
    if stages.offloader is not None:
        stages.offloader.close()
    conn.close()
    os._exit(0)
