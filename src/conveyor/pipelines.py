"""Pipelines: a named, configured kind of processing, and checking what is submitted to it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import jsonschema
from jsonschema.validators import validator_for

from conveyor.hosts import Host
from conveyor.notifications import NotifySettings
from conveyor.paths import PathError, PathRules, check_params_paths, request_selectors
from conveyor.queues import DEFAULT_QUEUE

if TYPE_CHECKING:
    from conveyor.ingest.loader import SqliteLoad
from conveyor.requests import split_params
from conveyor.tasks import RetryPolicy, Task

ExecutorKind = Literal["command", "python", "ssh"]

# What a command's environment says of its attempt: set by Conveyor alone.
TASK_VARIABLES = (
    "CONVEYOR_REQUEST_ID",
    "CONVEYOR_TASK_ID",
    "CONVEYOR_ATTEMPT",
    "CONVEYOR_WORK_DIR",
)

# {field} or {field.sub}; {{ and }} stand for literal braces.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")


class ParamsError(ValueError):
    """Submitted params that the pipeline refuses; `path` names the failing field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class TemplateError(ValueError):
    pass


def template_fields(template: str) -> list[str]:
    """The placeholders of one argv item; raises on a stray brace."""
    fields: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        stray = template[pos : m.start()]
        if "{" in stray or "}" in stray:
            raise TemplateError(f"stray brace in command item {template!r}")
        if m.group(1):
            fields.append(m.group(1))
        pos = m.end()
    if "{" in template[pos:] or "}" in template[pos:]:
        raise TemplateError(f"stray brace in command item {template!r}")
    return fields


def _lookup(values: Mapping[str, Any], dotted: str) -> Any:
    current: Any = values
    for part in dotted.split("."):
        if not isinstance(current, Mapping) or part not in current:
            raise KeyError(dotted)
        current = current[part]
    return current


def render_argv(command: tuple[str, ...], values: Mapping[str, Any]) -> list[str]:
    """Fill `{field}` placeholders item by item. Each item stays one argument whatever
    the value holds, so request data never reaches a shell."""
    argv: list[str] = []
    for item in command:

        def fill(m: re.Match[str]) -> str:
            if m.group(0) == "{{":
                return "{"
            if m.group(0) == "}}":
                return "}"
            try:
                value = _lookup(values, m.group(1))
            except KeyError:
                raise TemplateError(f"the task's params have no field '{m.group(1)}'") from None
            if isinstance(value, bool):
                return "true" if value else "false"
            if not isinstance(value, str | int | float):
                raise TemplateError(f"params field '{m.group(1)}' must be a string or number")
            if isinstance(value, str) and "\0" in value:
                raise TemplateError(f"params field '{m.group(1)}' holds a NUL byte")
            return str(value)

        argv.append(_PLACEHOLDER.sub(fill, item))
    return argv


_CHECK_CONTEXT = {"request_id": 0, "task_id": 0, "attempt": 1, "work_dir": ".", "python": "python"}


def attempt_context(task: Task, work_dir: str | None, python: str) -> dict[str, Any]:
    """What `{conveyor.*}` names for an attempt of `task`: its ids, its work directory
    (None: it has none, and the template may not name it) and the Python to run."""
    context: dict[str, Any] = {
        "request_id": task.request_id,
        "task_id": task.id,
        "attempt": task.attempts,
        "python": python,
    }
    if work_dir is not None:
        context["work_dir"] = work_dir
    return context


def attempt_env(env: Mapping[str, str], task: Task, work_dir: str | None) -> dict[str, str]:
    """A pipeline's `env` with an attempt's TASK_VARIABLES (no $CONVEYOR_WORK_DIR for
    an attempt without a work directory)."""
    changes = dict(env)
    changes.update(
        CONVEYOR_REQUEST_ID=str(task.request_id),
        CONVEYOR_TASK_ID=str(task.id),
        CONVEYOR_ATTEMPT=str(task.attempts),
    )
    if work_dir is not None:
        changes["CONVEYOR_WORK_DIR"] = work_dir
    return changes


def command_values(task_params: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    """What a command template may name: the task's params, and `conveyor.*` (request_id,
    task_id, attempt, work_dir, python: this interpreter), which params cannot override."""
    values = dict(task_params) if isinstance(task_params, Mapping) else {"params": task_params}
    values["conveyor"] = dict(context)
    return values


def _error_path(error: jsonschema.ValidationError) -> str:
    """The JSON path of a schema error; for a missing property, the property's own path."""
    path = list(error.absolute_path)
    required = error.validator_value
    if (
        error.validator == "required"
        and isinstance(error.instance, Mapping)
        and isinstance(required, list)
    ):
        missing = [k for k in required if k not in error.instance]
        if missing:
            path.append(missing[0])
    return json_path(path)


def json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@dataclass(frozen=True)
class Pipeline:
    name: str
    executor: ExecutorKind
    command: tuple[str, ...] = ()
    handler: str | None = None
    split: str | None = None
    schema: Mapping[str, Any] | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int | None = None
    cache: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # False: the command gets no folder of its own: none is made for it (on ext4 a new
    # folder costs 0.03-0.3 ms of the file system's time), it runs in `cwd`, else where the
    # worker was started, and `{conveyor.work_dir}` / $CONVEYOR_WORK_DIR are not given.
    # For short commands that write no files; executor "command" only, no `outputs`.
    work_dir: bool = True
    description: str = ""
    # globs, relative to the task's work dir, of the files kept as its outputs
    outputs: tuple[str, ...] = ()
    notify: NotifySettings | None = None
    load_sqlite: SqliteLoad | None = None  # a result file loaded when a task succeeds
    hosts: tuple[Host, ...] = ()  # for executor "ssh"
    paths: PathRules = field(default_factory=PathRules)

    @cached_property
    def _validator(self) -> Any:
        """Built once per pipeline, not on every submit."""
        schema = self.schema if self.schema is not None else True
        return validator_for(schema)(schema)

    @cached_property
    def _request_paths(self) -> PathRules:
        """The path rules with each declared field wherever a request may give it."""
        return dataclasses.replace(
            self.paths, fields=request_selectors(self.paths.fields, self.split)
        )

    def check_params(self, params: Any) -> list[Any]:
        """Validate submitted params; return each task's params, with declared paths
        mapped and normalised (and refused, naming the field, outside the roots)."""
        if self.schema is not None:
            errors = sorted(
                self._validator.iter_errors(params),
                key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))),
            )
            if errors:
                best = jsonschema.exceptions.best_match(errors) or errors[0]
                raise ParamsError(_error_path(best), best.message)
        try:
            tasks = split_params(params, self.split)
        except ValueError as exc:
            raise ParamsError(f"$.{self.split}" if self.split else "$", str(exc)) from None
        if self.paths.active:
            try:
                mapped = check_params_paths(params, self._request_paths)
            except PathError as exc:
                raise ParamsError(exc.field, exc.message) from None
            tasks = split_params(mapped, self.split)
        if self.executor in ("command", "ssh"):
            for i, task_params in enumerate(tasks):
                try:
                    render_argv(self.command, command_values(task_params, _CHECK_CONTEXT))
                except TemplateError as exc:
                    where = f"$.{self.split}[{i}]" if self.split else "$"
                    raise ParamsError(where, str(exc)) from None
        return tasks
