"""Artifact keys: the configured key template, checked once at config load, and the
confinement every key must pass before it reaches a store (no `..`, nothing absolute)."""

from __future__ import annotations

import string
from datetime import UTC, datetime

from conveyor.artifacts.errors import ArtifactKeyError

KEY_FIELDS = ("date", "pipeline", "request_id", "task_id", "attempt", "name")
DEFAULT_KEY_TEMPLATE = "{date}/{pipeline}/{request_id}/{task_id}/{name}"
MAX_KEY_LENGTH = 1024


def check_template(template: str) -> None:
    """Raise ArtifactKeyError naming what is wrong: an unknown field, a format spec, a
    template without `{name}` (every output would land on the same key), or a fixed
    part that is absolute or climbs out with `..`."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ArtifactKeyError(f"key template {template!r}: {exc}") from None
    seen = set()
    for _literal, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in KEY_FIELDS:
            raise ArtifactKeyError(
                f"key template {template!r}: unknown field {{{field}}} "
                f"(known: {', '.join('{' + f + '}' for f in KEY_FIELDS)})"
            )
        if spec or conversion:
            raise ArtifactKeyError(f"key template {template!r}: {{{field}}} takes no format")
        seen.add(field)
    if "name" not in seen:
        raise ArtifactKeyError(f"key template {template!r} must contain {{name}}")
    if not _task_id_apart(parts):
        # else two tasks' outputs of one name could share a key, and pruning one task
        # would delete the other's
        raise ArtifactKeyError(
            f"key template {template!r} must hold {{task_id}}, set apart from other fields "
            "and digits, with no {name} before it and in its segment only {date}, "
            "{request_id} or {attempt} before it, so no two tasks share a key"
        )
    sample = template.format(**{f: "x" for f in KEY_FIELDS})
    check_key(sample, what=f"key template {template!r}")


# Fields whose values have a fixed shape: digits (or a date of them), never a slash.
_FIXED = {"request_id", "attempt", "date"}


def _task_id_apart(parts: list[tuple[str, str | None, str | None, str | None]]) -> bool:
    """Whether a key shows which task it is for. `{task_id}` must be there, with no
    `{name}` (which may hold slashes) before it; in its own segment (from the slash
    before it) only fixed-shape fields may come before it; and it is set apart from
    its neighbours by something that is not a digit. So `{request_id}-{task_id}/{name}`
    and `{task_id}_{name}` are fine, while `{request_id}{task_id}/...` (request 1 task
    23, request 12 task 3) and `{pipeline}_{task_id}_{name}` (pipeline `a_2` task 7,
    pipeline `a` task 2 with an output `7_x`) are not."""
    fields = [field for _literal, field, _spec, _conv in parts]
    if "task_id" not in fields or "name" in fields[: fields.index("task_id")]:
        return False
    at = fields.index("task_id")
    before = parts[at][0]
    if (at > 0 and not before) or before[-1:].isdigit():
        return False  # run into the field before it, or into a digit
    for literal, field, _spec, _conv in reversed(parts[:at]):
        if "/" in before:
            break  # its segment begins here
        if field is not None and field not in _FIXED:
            return False
        before = literal
    after, then = parts[at + 1][:2] if at + 1 < len(parts) else ("", None)
    return not ((then is not None and not after) or after[:1].isdigit())


def check_key(key: str, what: str = "artifact key") -> str:
    """The key itself when it stays inside the store; raises ArtifactKeyError."""
    if not key:
        raise ArtifactKeyError(f"{what} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ArtifactKeyError(f"{what} is longer than {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ArtifactKeyError(f"{what} {key!r} holds a control character")
    if "\\" in key:
        raise ArtifactKeyError(f"{what} {key!r} holds a backslash")
    if key.startswith("/"):
        raise ArtifactKeyError(f"{what} {key!r} is absolute")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ArtifactKeyError(f"{what} {key!r} has an empty, '.' or '..' segment")
    return key


def render_key(
    template: str,
    *,
    pipeline: str,
    request_id: int,
    task_id: int,
    attempt: int,
    name: str,
    created_at: float,
) -> str:
    """The key of one artifact; `{date}` is the UTC day the task was created, so every
    attempt of a task writes under the same day."""
    key = template.format(
        date=datetime.fromtimestamp(created_at, UTC).strftime("%Y-%m-%d"),
        pipeline=pipeline,
        request_id=request_id,
        task_id=task_id,
        attempt=attempt,
        name=name,
    )
    return check_key(key)


__all__ = [
    "DEFAULT_KEY_TEMPLATE",
    "KEY_FIELDS",
    "ArtifactKeyError",
    "check_key",
    "check_template",
    "render_key",
]
