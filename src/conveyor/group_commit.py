"""Group commit for submits: concurrent submissions share one transaction.

A commit costs the database a round trip and a WAL flush whatever it holds, so a server
answering many small submits at once spends most of its time committing. One thread
takes every submission waiting when it is free and stores them all with one
`submit_many`; while that commits, the next submissions gather. Nobody waits for a
timer: a lone submit is stored at once, and batches grow only with the load.

Each submission still gets its own answer. When a batch fails as a whole (an
idempotency conflict, a database error), its submissions are stored one by one, so
one bad submission never fails its neighbours.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import NamedTuple

from conveyor.requests import NewRequest
from conveyor.store import Store, Submitted

log = logging.getLogger(__name__)


class _Pending(NamedTuple):
    new: NewRequest
    future: Future[Submitted]


class Closed(RuntimeError):
    pass


class SubmitBatcher:
    def __init__(self, store: Store, clock: Callable[[], float], max_batch: int = 256) -> None:
        self.store = store
        self.clock = clock
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, new: NewRequest) -> Future[Submitted]:
        future: Future[Submitted] = Future()
        with self._lock:
            if self._closed:
                raise Closed("the submit batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-submit", daemon=True
                )
                self._thread.start()
            self._queue.put(_Pending(new, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Store what is waiting, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            if len(live) == 1:
                results = [self.store.submit(live[0].new, self.clock())]
            else:
                results = self.store.submit_many(
                    [p.new for p in live], self.clock(), with_tasks=True
                )
        except Exception as exc:  # every waiter must get an answer
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.debug("batch of %d submits failed (%s); storing them one by one", len(live), exc)
            for p in live:
                try:
                    p.future.set_result(self.store.submit(p.new, self.clock()))
                except Exception as one:
                    p.future.set_exception(one)
            return
        for p, result in zip(live, results, strict=True):
            p.future.set_result(result)
