"""Run a task as a Python callable, `handler(ctx)`, named `module:function` in the
config. Its return value (JSON) becomes the task's result; an exception fails the
attempt, and `NonRetryable` fails the task at once."""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

from conveyor.executors import ExecResult, TaskContext
from conveyor.jsonvalues import problem_in
from conveyor.pipelines import Pipeline, json_path


class NonRetryable(Exception):
    """Raise from a handler to fail the task without further attempts."""


class HandlerError(ValueError):
    pass


@cache
def load_handler(path: str) -> Callable[[TaskContext], Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken module fails in many ways; all are config errors
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from None
    func: Any = module
    for part in attr.split("."):
        func = getattr(func, part, None)
        if func is None:
            raise HandlerError(f"handler {path!r}: {module_name} has no {attr!r}")
    if not callable(func):
        raise HandlerError(f"handler {path!r} is not callable")
    handler: Callable[[TaskContext], Any] = func
    return handler


class PythonExecutor:
    def run(self, pipeline: Pipeline, ctx: TaskContext, deadline: float | None) -> ExecResult:
        assert pipeline.handler is not None
        try:
            handler = load_handler(pipeline.handler)
        except HandlerError as exc:
            return ExecResult(ok=False, error=str(exc), retryable=False)
        try:
            value = handler(ctx)
        except NonRetryable as exc:
            ctx.log(traceback.format_exc())
            return ExecResult(ok=False, error=str(exc) or "failed", retryable=False)
        except Exception as exc:
            ctx.log(traceback.format_exc())
            return ExecResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        found = None if value is None else problem_in(value)  # as the store keeps it
        if found is not None:
            where = json_path(found[0])
            detail = found[1] if where == "$" else f"{where}: {found[1]}"
            return ExecResult(ok=False, error=f"result is not JSON: {detail}", retryable=False)
        return ExecResult(ok=True, result=value)
