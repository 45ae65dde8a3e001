"""Python handlers for the end-to-end tests. Worker processes import them by module
path (the test puts this folder on their PYTHONPATH)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from conveyor.executors import TaskContext

_LOCK = threading.Lock()


def record(ctx: TaskContext) -> None:
    """Append this task's id to a file of this worker process's own: the side effect
    that shows how often, and by whom, each task ran."""
    path = Path(ctx.params["out_dir"]) / f"worker-{os.getpid()}.ids"
    with _LOCK, path.open("a") as f:
        f.write(f"{ctx.task.id}\n")


def record_slowly(ctx: TaskContext) -> None:
    """`record`, then 50 ms of work: a backlog that takes a few seconds to drain."""
    record(ctx)
    time.sleep(0.05)
