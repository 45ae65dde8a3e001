"""Queues: their priority order and which of them a worker may take from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_QUEUE_ORDER: tuple[str, ...] = ("urgent", "production", "default", "test", "dev")
DEFAULT_QUEUE = "default"
# The name under which the global stop flag is kept among the queue settings.
ALL_QUEUES = "*"


def order_queues(wanted: Iterable[str], priority_order: Sequence[str]) -> list[str]:
    """The queues a worker serves, highest priority first: queues named in the configured
    order come in that order, any others after them in the order the worker gave."""
    wanted = list(dict.fromkeys(wanted))
    rank = {name: i for i, name in enumerate(priority_order)}
    known = sorted((q for q in wanted if q in rank), key=rank.__getitem__)
    return known + [q for q in wanted if q not in rank]


def claimable_queues(ordered: Sequence[str], paused: Iterable[str]) -> list[str]:
    """The queues that may be claimed from now: none while everything is paused."""
    paused = set(paused)
    if ALL_QUEUES in paused:
        return []
    return [q for q in ordered if q not in paused]


@dataclass(frozen=True)
class QueueStats:
    name: str
    paused: bool
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
