"""Python handlers of the client tests (the in-process worker imports them by name)."""

from __future__ import annotations

from conveyor.executors import TaskContext


def chatty(ctx: TaskContext) -> dict[str, int]:
    """Writes params.lines lines to its log, params.pause seconds apart."""
    lines = int(ctx.params.get("lines", 5))
    for i in range(lines):
        ctx.log(f"line {i}")
        if ctx.wait_stop(float(ctx.params.get("pause", 0.1))):
            raise RuntimeError("stopped")
    return {"lines": lines}
