"""Running a worker in a thread of the test, and waiting for what it does."""

from __future__ import annotations

import threading
import time
from typing import Any

from conveyor.app import Conveyor
from conveyor.requests import Request
from conveyor.worker import Worker, WorkerStats


def start(worker: Worker) -> tuple[threading.Thread, list[WorkerStats]]:
    """The worker running in a thread; its stats land in the list when it returns."""
    out: list[WorkerStats] = []
    thread = threading.Thread(target=lambda: out.append(worker.run()), daemon=True)
    thread.start()
    return thread, out


def wait_for(check: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def finish_with(worker: Worker, app: Conveyor, request_id: int, timeout: float = 30) -> Request:
    """Run the worker (started now) until the request ends; the request, ended."""
    thread, _ = start(worker)
    try:
        return app.wait(request_id, timeout=timeout)
    finally:
        worker.stop(hard=True)
        thread.join(15)
