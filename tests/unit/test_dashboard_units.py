"""The dashboard's and the metrics' pure parts: roll-ups of the figures, the charts,
what pages show of records, the session's key, and the metric families."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conveyor.config import parse_config
from conveyor.dashboard import charts, views
from conveyor.dashboard.session import SecretError, Sessions, secret_key
from conveyor.metrics import Snapshot, families, route_label
from conveyor.stats import (
    DAY,
    HOUR,
    ActivityRow,
    Bar,
    IngestTotals,
    PipelineTotals,
    StatusCount,
    bars,
    count_table,
    failure_rate,
    rates,
)
from conveyor.tasks import Progress, Task, TaskStatus
from conveyor.tokens import Role, Token

NOW = 1_800_000_000.0  # a whole hour (and day) boundary + 0


def row(start: float, n: int, status: str = "succeeded", queue: str = "q") -> ActivityRow:
    return ActivityRow(start, queue, "p", status, n)


def test_bars_put_each_bucket_in_its_hour_and_day() -> None:
    now = NOW + 1800  # half past
    rows = [
        row(NOW, 3),
        row(NOW, 1, "failed"),
        row(NOW - HOUR, 2),
        row(NOW - 47 * HOUR, 5),
        row(NOW - 48 * HOUR, 100),  # too old for 48 bars
    ]
    hourly = bars(rows, now, HOUR, 48)
    assert len(hourly) == 48 and hourly[-1].start == NOW and hourly[0].start == NOW - 47 * HOUR
    assert (hourly[-1].succeeded, hourly[-1].failed) == (3, 1)
    assert hourly[-2].succeeded == 2 and hourly[0].succeeded == 5
    daily = bars(rows, now, DAY, 14)
    assert sum(b.total for b in daily) == 111
    assert failure_rate(hourly) == pytest.approx(1 / 11)
    assert failure_rate([Bar(0)]) is None


def test_rates_per_queue_over_the_last_minutes() -> None:
    rows = [row(NOW - 300, 30, queue="a"), row(NOW, 15, queue="a"), row(NOW - 3600, 99, queue="b")]
    got = rates(rows, NOW + 60)
    assert set(got) == {"a"}
    assert got["a"] == pytest.approx(45 / 15)


def test_count_tables_and_queue_rows() -> None:
    counts = [
        StatusCount("task", "default", "p1", "queued", 2),
        StatusCount("task", "urgent", "p1", "failed", 1),
        StatusCount("task", "default", "p2", "queued", 3),
        StatusCount("request", "default", "p1", "running", 4),
    ]
    by_queue = count_table(counts, "task", "queue")
    assert by_queue.get("default", "queued") == 5 and by_queue.total("queued") == 5
    assert list(by_queue.rows) == ["default", "urgent"]
    assert count_table(counts, "request", "pipeline").get("p1", "running") == 4
    rows = views.queue_rows(counts, {"dev"}, {"urgent": 2.5}, ["urgent", "default"])
    assert [r.name for r in rows] == ["urgent", "default", "dev"]
    assert rows[0].failed == 1 and rows[0].per_minute == 2.5 and rows[2].paused
    assert all(r.paused for r in views.queue_rows(counts, set(), {}, ["a"], True))


def task(**kw: object) -> Task:
    base: dict[str, object] = dict(
        id=7,
        request_id=1,
        pipeline="p",
        queue="q",
        priority=0,
        seq=0,
        params={},
        status=TaskStatus.RUNNING,
        attempts=1,
        max_attempts=1,
        timeout=None,
        created_at=NOW,
        available_at=NOW,
        started_at=NOW + 2,
    )
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


def test_gantt_and_bars_are_escaped_svg() -> None:
    svg = charts.gantt(
        [task(), task(id=8, seq=1, status=TaskStatus.QUEUED, started_at=None)], NOW + 10
    )
    assert svg.startswith("<svg") and svg.count('class="running"') == 1
    assert svg.count('class="wait"') == 2 and 'aria-label="Timeline of 2 tasks' in svg
    chart = charts.bar_chart([Bar(NOW, 1, 2), Bar(NOW + HOUR, 0, 0)], "A <title>")
    assert "A &lt;title&gt;" in chart and "<title>" in chart
    assert 'class="bad"' in chart and chart.count('class="ok"') == 2
    assert charts.bar_chart([], "x") == "" and charts.gantt([], NOW) == ""


def test_what_pages_show_of_records() -> None:
    assert views.duration(0.25) == "250 ms" and views.duration(75) == "1 min 15 s"
    assert views.duration(None) == "\u2013" and views.duration(3 * 86400) == "3 d 0 h"
    assert views.percent(task(progress=Progress(1, 4))) == 25
    assert views.percent(task(status=TaskStatus.SUCCEEDED, progress=Progress(3, 4))) == 100
    assert views.percent(task()) is None
    assert views.task_duration(task(), NOW + 5) == 3
    assert views.outputs({"outputs": ["a.db", {"name": "b", "url": "/x/b"}, {"url": "js:1"}]}) == [
        {"name": "a.db"},
        {"name": "b", "href": "/x/b"},
    ]
    assert views.outputs({"name": "b", "outputs": [{"name": "c", "url": "javascript:x"}]}) == [
        {"name": "c"}
    ]
    assert views.outputs("text") == []
    utc = views.parse_time("2027-01-15T00:00")
    assert utc == views.parse_time("2027-01-15T01:00+01:00") and views.parse_time("") is None
    with pytest.raises(ValueError, match="not a date and time"):
        views.parse_time("yesterday")
    assert views.time_input(views.parse_time("2027-01-15T10:20")) == "2027-01-15T10:20"


def test_route_labels_are_templates() -> None:
    scope = {"route": object(), "path": "/api/v1/requests/17/tasks", "path_params": {"rid": 17}}
    assert route_label(scope) == "/api/v1/requests/{rid}/tasks"
    assert route_label({"path": "/nope"}) == "unmatched"


def test_sessions_are_signed_and_hold_no_token() -> None:
    s = Sessions("k" * 40, 3600)
    token = Token(1, "ops", Role.ADMIN, "prefix", 0.0)
    cookie, session = s.open(token, "hash-of-token")
    assert s.read(cookie) == session
    assert s.read(cookie[:-2] + "xx") is None and s.read(None) is None
    assert Sessions("j" * 40, 3600).read(cookie) is None  # another key
    csrf, form = s.login_form()
    assert s.login_form_ok(form, csrf) and not s.login_form_ok(form, "other")


def test_the_key_is_made_once_and_kept(tmp_path: Path) -> None:
    config = parse_config({}, tmp_path, {"CONVEYOR_ARTIFACTS": str(tmp_path / "a")})
    first = secret_key(config, {})
    path = tmp_path / "a" / "dashboard.secret"
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert secret_key(config, {}) == first and len(first) >= 32
    assert secret_key(config, {"CONVEYOR_DASHBOARD_SECRET": "s" * 32}) == "s" * 32
    with pytest.raises(SecretError):
        secret_key(config, {"CONVEYOR_DASHBOARD_SECRET": "short"})
    assert not [p for p in os.listdir(path.parent) if p.startswith(".")]


def test_metric_families() -> None:
    snap = Snapshot(
        counts=[
            StatusCount("task", "q", "p", "queued", 2),
            StatusCount("request", "q", "p", "running", 1),
        ],
        totals=[PipelineTotals("p", 5, 3, 1, 1, (1, 2, 2, 3, 3, 4, 4, 4, 4, 4), 4, 9.5)],
        lease_expiries=2,
        workers=[],
        paused=[("q", True)],
        ingest=[IngestTotals("spool", files=3, records=30, failed=1, pending=2)],
    )
    names = {f.name: f for f in families(snap)}
    assert names["conveyor_queue_tasks"].samples[0].value == 2
    assert names["conveyor_tasks_retried"].samples[0].value == 1
    hist = {
        s.labels.get("le"): s.value
        for s in names["conveyor_task_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert hist["0.1"] == 1 and hist["+Inf"] == 4
    assert names["conveyor_lease_expiries"].samples[0].value == 2
    assert names["conveyor_ingest_records"].samples[0].value == 30
    assert re.match(r"conveyor_", next(iter(names)))
