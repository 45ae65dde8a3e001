"""Python handlers of the worker tests (the in-process worker imports them by name)."""

from __future__ import annotations

import time

from conveyor.executors import TaskContext


def timed(ctx: TaskContext) -> dict[str, float]:
    """Waits `params.seconds`; returns when it started and ended."""
    start = time.time()
    ctx.wait_stop(float(ctx.params.get("seconds", 0.4)))
    return {"start": start, "end": time.time()}


def odd(ctx: TaskContext) -> object:
    """What a database cannot keep as given: a NaN in the result or the progress, a NUL
    in the error."""
    if ctx.params["what"] == "nan":
        return {"x": float("nan")}
    if ctx.params["what"] == "nan-progress":
        ctx.progress(float("nan"), 10)
    raise RuntimeError("a\x00b")


def slow(ctx: TaskContext) -> None:
    """Logs a line, then waits to be stopped (for up to 30 s)."""
    ctx.log("started")
    ctx.wait_stop(30)
