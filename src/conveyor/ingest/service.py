"""The declared spools run as a managed service beside the server and the worker
(`conveyor up`): each ingester in a thread of its own, started again after an
unexpected error (with back-off), stopped cleanly on shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from conveyor.ingest.pipeline import Ingester
from conveyor.ingest.settings import SpoolConfig

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = logging.getLogger(__name__)


class SpoolService:
    def __init__(self, app: Conveyor, spools: Iterable[SpoolConfig], restart_max: float = 60.0):
        self.app = app
        self.spools = list(spools)
        self.restart_max = restart_max
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[str, Ingester] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        for spool in self.spools:
            t = threading.Thread(target=self._supervise, args=(spool,), name=f"ingest-{spool.name}")
            t.start()
            self._threads.append(t)

    def _supervise(self, spool: SpoolConfig) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                ingester = self.app.ingester(spool)
            except Exception as exc:
                log.error(
                    "spool %s cannot start: %s; trying again in %.0fs", spool.name, exc, delay
                )
            else:
                with self._lock:
                    self._running[spool.name] = ingester
                if self._stop.is_set():
                    ingester.stop()
                try:
                    ingester.run()
                    delay = 1.0
                except Exception:
                    log.exception(
                        "spool %s stopped on an error; restarting in %.0fs", spool.name, delay
                    )
                finally:
                    ingester.writer.close()
                    with self._lock:
                        self._running.pop(spool.name, None)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.restart_max)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._lock:
            for ingester in self._running.values():
                ingester.stop()
        for t in self._threads:
            t.join(timeout)
