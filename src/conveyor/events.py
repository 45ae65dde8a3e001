"""Events: the append-only record of every state change, and selectors over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str  # e.g. "task.succeeded", "request.running", "queue.paused"
    request_id: int | None = None
    task_id: int | None = None
    pipeline: str | None = None
    queue: str | None = None
    data: Any = None

    def topics(self) -> list[str]:
        """The dotted names a selector is matched against."""
        topics = [self.kind]
        if self.pipeline:
            topics.append(f"pipeline.{self.pipeline}.{self.kind}")
        if self.queue:
            topics.append(f"queue.{self.queue}.{self.kind}")
        if self.request_id is not None:
            topics.append(f"request.{self.request_id}.{self.kind}")
        if self.task_id is not None:
            topics.append(f"task.{self.task_id}.{self.kind}")
        return topics


def selector_matches(selector: str, topic: str) -> bool:
    """`*` stands for one dotted segment; a selector also matches everything below it,
    so `request.42` matches `request.42.task.succeeded` and `pipeline.spotbot.*` every
    event of the spotbot pipeline."""
    want = selector.split(".")
    have = topic.split(".")
    if len(have) < len(want):
        return False
    return all(w == "*" or w == h for w, h in zip(want, have, strict=False))


def event_matches(selector: str, event: Event) -> bool:
    if selector in ("", "*"):
        return True
    return any(selector_matches(selector, t) for t in event.topics())
