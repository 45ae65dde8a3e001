"""Housekeeping beside the service: `[conveyor] retention` applied every hour by
`conveyor up`. (Deployments of several processes run `conveyor prune` from cron.)"""

from __future__ import annotations

import logging
import threading

from conveyor.app import Conveyor
from conveyor.store import StoreError

log = logging.getLogger(__name__)


class Housekeeper:
    def __init__(self, app: Conveyor, interval: float = 3600.0) -> None:
        self.app = app
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.app.config.retention is not None

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="conveyor-prune", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> None:
        retention = self.app.config.retention
        if retention is None:
            return
        try:
            done = self.app.prune(retention)
        except StoreError as exc:  # the next round tries again
            log.warning("pruning failed: %s", exc)
            return
        if done.requests:
            log.info("pruned %s", done.summary())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval)
