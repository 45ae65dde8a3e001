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
    if not _task_segment_before_name(parts):
        # else two tasks' outputs of one name could share a key (`{pipeline}/{name}`,
        # or `{request_id}{task_id}` for request 1 task 23 and request 12 task 3), and
        # pruning one task would delete the other's
        raise ArtifactKeyError(
            f"key template {template!r} must hold {{task_id}} as a segment of its own "
            "(between slashes), before {name}"
        )
    sample = template.format(**{f: "x" for f in KEY_FIELDS})
    check_key(sample, what=f"key template {template!r}")


def _task_segment_before_name(parts: list[tuple[str, str | None, str | None, str | None]]) -> bool:
    """Whether `{task_id}` is a whole segment (its neighbours in the template are `/`
    or its start) and comes before `{name}`; the fields before it hold no slash, so it
    is always the same segment of a key, and no two tasks' keys are the same."""
    for i, (literal, field, _spec, _conv) in enumerate(parts):
        if field == "name":
            return False
        if field != "task_id":
            continue
        after = parts[i + 1][0] if i + 1 < len(parts) else ""
        opened = literal.endswith("/") or (not literal and i == 0)
        return opened and after.startswith("/")
    return False


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
