"""What the dashboard's pages show, worked out from the records: pure functions (and
the template filters), no I/O."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.stats import CountTable, StatusCount, count_table
from conveyor.store import WorkerInfo
from conveyor.tasks import Task

TASK_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
REQUEST_STATUSES = ("requested", "running", "succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class QueueRow:
    name: str
    paused: bool
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    per_minute: float


def queue_rows(
    counts: Iterable[StatusCount],
    paused: set[str],
    rates: Mapping[str, float],
    order: Sequence[str],
    everything_paused: bool = False,
) -> list[QueueRow]:
    """Every queue, configured ones in priority order, then any others by name."""
    table = count_table(counts, "task", "queue")
    names = list(order) + sorted((set(table.rows) | paused | set(rates)) - set(order))
    return [
        QueueRow(
            name=q,
            paused=everything_paused or q in paused,
            queued=table.get(q, "queued"),
            running=table.get(q, "running"),
            succeeded=table.get(q, "succeeded"),
            failed=table.get(q, "failed"),
            cancelled=table.get(q, "cancelled"),
            per_minute=rates.get(q, 0.0),
        )
        for q in names
    ]


def tables(counts: Sequence[StatusCount]) -> dict[str, CountTable]:
    return {
        "tasks_by_queue": count_table(counts, "task", "queue"),
        "tasks_by_pipeline": count_table(counts, "task", "pipeline"),
        "requests_by_pipeline": count_table(counts, "request", "pipeline"),
    }


def worker_state(w: WorkerInfo, now: float, lease: float) -> str:
    """running, stale (no heartbeat for three leases: probably gone) or stopped."""
    if w.status != "running":
        return "stopped"
    return "running" if now - w.last_heartbeat <= 3 * lease else "stale"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {m:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def task_duration(t: Task, now: float) -> float | None:
    """How long the task's latest attempt ran (or has been running)."""
    if t.started_at is None:
        return None
    return (t.finished_at if t.finished_at is not None else now) - t.started_at


def when(ts: float | None) -> str:
    """A moment, in UTC."""
    if ts is None:
        return "\u2013"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "\u2013"
    return f"{duration(max(0.0, now - ts))} ago"


def percent(t: Task) -> int | None:
    """How far the task has come (None: it has not said); a succeeded task is done,
    whatever it last reported."""
    if t.status.value == "succeeded":
        return 100
    f = t.progress.fraction
    return None if f is None else round(f * 100)


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def short_json(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def outputs(result: Any) -> list[dict[str, str]]:
    """Outputs a task's result names, as {name, href?}: a result's `outputs` list (of
    strings, or objects with name/key/url), or its `output`/`output_dir` fields."""
    if not isinstance(result, dict):
        return []
    found: list[dict[str, str]] = []
    listed = result.get("outputs")
    if isinstance(listed, list):
        for item in listed:
            if isinstance(item, str):
                found.append({"name": item})
            elif isinstance(item, dict):
                name = item.get("name") or item.get("key") or item.get("path")
                if isinstance(name, str):
                    entry = {"name": name}
                    href = item.get("url") or item.get("href")
                    if isinstance(href, str) and href.startswith(("/", "https://", "http://")):
                        entry["href"] = href
                    found.append(entry)
    for key in ("output", "output_dir"):
        if isinstance(result.get(key), str):
            found.append({"name": result[key]})
    return found


def parse_time(value: str | None) -> float | None:
    """A datetime-local (or ISO 8601) value, in UTC unless it names its zone; raises
    ValueError naming the problem."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a date and time (YYYY-MM-DDTHH:MM)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def time_input(ts: float | None) -> str:
    """A time for a datetime-local input (UTC)."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M")


FILTERS = {
    "duration": duration,
    "when": when,
    "iso": iso,
    "pretty_json": pretty_json,
    "short_json": short_json,
}
