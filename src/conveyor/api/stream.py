"""The event hub: one thread per API process follows the events table and keeps the
recent events in memory, so any number of server-sent-event streams cost no more
database reads than one.

Event ids are given when a transaction inserts them, but on PostgreSQL transactions
commit in any order: event 11 may be visible before event 10 is. The hub hands events
out in id order only, so a stream's position (its last event id, which a client sends
back as Last-Event-ID) never skips one: after a gap it waits for the missing id, and
gives up on it (a rolled-back transaction leaves a gap for good) after `gap_grace`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from conveyor.app import Conveyor
from conveyor.events import Event
from conveyor.store import Unavailable

log = logging.getLogger(__name__)


class EventHub:
    def __init__(
        self,
        app: Conveyor,
        poll: float = 0.25,
        keep: int = 10_000,
        gap_grace: float = 1.0,
    ) -> None:
        self.app = app
        self.poll = poll
        self.keep = keep
        self.gap_grace = gap_grace
        self._lock = threading.Lock()
        self._events: deque[Event] = deque()
        self._ids: deque[int] = deque()
        self._floor = 0  # events up to here are not in memory: ask the store
        self._released = 0  # events up to here have been handed out (in id order)
        self._gap_since: float | None = None
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start following (once); blocking: call it from a thread."""
        with self._lock:
            if self._thread is not None or self._closed.is_set():
                return
            latest = self.app.latest_event_id()
            self._floor = self._released = latest
            self._thread = threading.Thread(target=self._run, name="conveyor-events", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop following and end every stream (the server is shutting down)."""
        self._closed.set()
        self._wake_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def released(self) -> int:
        return self._released

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._waiters)

    # ------------------------------------------------------------------ reading
    def read(self, after: int) -> tuple[list[Event], bool]:
        """The events after `after` held in memory, and whether memory covers that
        position (if not, read the store up to `released`, then ask again)."""
        with self._lock:
            if after < self._floor:
                return [], False
            start = bisect.bisect_right(self._ids, after)
            return list(itertools.islice(self._events, start, None)), True

    @contextmanager
    def subscription(self) -> Iterator[asyncio.Event]:
        """An asyncio event set whenever new events are handed out (or on close)."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._waiters.discard(entry)

    # ------------------------------------------------------------------ follower
    def _run(self) -> None:
        listener = None
        try:
            while not self._closed.is_set():
                try:
                    if listener is None:
                        listener = self.app.store.listener()
                    self._follow()
                    listener.wait(self.poll)
                except Unavailable as exc:
                    log.warning("event stream: database unavailable (%s); retrying", exc)
                    self._closed.wait(1.0)
                except Exception:
                    log.exception("event stream: unexpected error; retrying")
                    self._closed.wait(1.0)
        finally:
            if listener is not None:
                listener.close()

    def _follow(self) -> None:
        while not self._closed.is_set():
            fresh = self.app.events(after_id=self._released, limit=1000)
            ready = self._in_order(fresh)
            if ready:
                self._append(ready)
            if len(fresh) < 1000 or not ready:
                return

    def _in_order(self, fresh: list[Event]) -> list[Event]:
        """The prefix of `fresh` that can be handed out now without skipping an id that
        may still commit."""
        ready: list[Event] = []
        expected = self._released + 1
        for event in fresh:
            if event.id != expected:
                now = time.monotonic()
                if self._gap_since is None:
                    self._gap_since = now
                if now - self._gap_since < self.gap_grace:
                    break
            self._gap_since = None
            ready.append(event)
            expected = event.id + 1
        return ready

    def _append(self, ready: list[Event]) -> None:
        with self._lock:
            for event in ready:
                self._events.append(event)
                self._ids.append(event.id)
            while len(self._events) > self.keep:
                self._events.popleft()
                self._floor = self._ids.popleft()
            self._released = ready[-1].id
        self._wake_all()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # that stream's loop is gone
