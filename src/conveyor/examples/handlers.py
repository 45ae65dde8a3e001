"""Python handlers of the built-in example pipelines."""

from __future__ import annotations

from typing import Any

from conveyor.executors import TaskContext


def noop(ctx: TaskContext) -> None:
    """Does nothing: measures Conveyor's own cost per task."""


def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleeps `params.seconds`, reporting progress, and stops early when asked."""
    seconds = float(ctx.params.get("seconds", 1))
    steps = max(1, int(seconds))
    for i in range(steps):
        ctx.progress(i, steps, "sleeping")
        if ctx.wait_stop(seconds / steps):
            raise RuntimeError(f"stopped: {ctx.stop_reason}")
    ctx.progress(steps, steps, "done")
    return {"slept": seconds}
