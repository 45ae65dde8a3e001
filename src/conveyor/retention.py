"""Retention: how long finished requests are kept, and what pruning removed.

`conveyor prune --older-than 30d` (or `[conveyor] retention = "30d"`, which `conveyor
up` applies every hour) deletes requests that finished before the cut-off with their
tasks, events, artifact records, notifications, log files, work directories and stored
outputs. The database goes first, a batch per transaction; files go after their rows
have committed, so a crash in between leaves only files nobody points at, never a row
pointing at nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class AgeError(ValueError):
    pass


def parse_age(text: str | float | int) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w`, or a bare number of days, as seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text) * _UNITS["d"]
    else:
        found = _AGE.match(str(text))
        if found is None:
            raise AgeError(
                f"not an age: {text!r} (a number with s, m, h, d or w, such as 30d or 12h)"
            )
        seconds = float(found.group(1)) * _UNITS[found.group(2) or "d"]
    if seconds <= 0:
        raise AgeError(f"an age must be more than nothing: {text!r}")
    return seconds


@dataclass(frozen=True)
class Pruned:
    """What one prune (or a count of what it would do) covered."""

    requests: int = 0
    tasks: int = 0
    events: int = 0
    artifacts: int = 0
    notifications: int = 0
    request_ids: tuple[int, ...] = ()
    artifact_keys: tuple[str, ...] = ()

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            requests=self.requests + other.requests,
            tasks=self.tasks + other.tasks,
            events=self.events + other.events,
            artifacts=self.artifacts + other.artifacts,
            notifications=self.notifications + other.notifications,
        )

    def summary(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "tasks": self.tasks,
            "events": self.events,
            "artifacts": self.artifacts,
            "notifications": self.notifications,
        }
