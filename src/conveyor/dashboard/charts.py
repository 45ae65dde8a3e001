"""Charts drawn on the server as SVG from the figures: no script, nothing to load, and
they print. Pure functions: figures in, markup out (every text escaped)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

from conveyor.stats import Bar
from conveyor.tasks import Task, TaskStatus

MAX_GANTT_ROWS = 200


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _label(start: float, width: float) -> str:
    fmt = "%H:%M" if width < 86400 else "%d %b"
    return time.strftime(fmt, time.gmtime(start))


def bar_chart(bars: Sequence[Bar], title: str, width: int = 720, height: int = 160) -> Markup:
    """Stacked bars (succeeded below, failed above), one per bucket, oldest left."""
    if not bars:
        return Markup("")
    step = bars[1].start - bars[0].start if len(bars) > 1 else 3600.0
    top = max((b.total for b in bars), default=0) or 1
    left, bottom, right = 36, 22, 4
    plot_w = width - left - right
    plot_h = height - bottom - 8
    slot = plot_w / len(bars)
    gap = max(1.0, slot * 0.15)
    total_ok = sum(b.succeeded for b in bars)
    total_bad = sum(b.failed for b in bars)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'preserveAspectRatio="none" aria-label="{escape(title)}: {total_ok} succeeded, '
        f'{total_bad} failed">',
        f"<title>{escape(title)}</title>",
        f'<line class="axis" x1="{left}" y1="{8 + plot_h}" x2="{width - right}" '
        f'y2="{8 + plot_h}"/>',
        f'<text class="tick" x="{left - 4}" y="14" text-anchor="end">{top}</text>',
        f'<text class="tick" x="{left - 4}" y="{8 + plot_h}" text-anchor="end">0</text>',
    ]
    every = max(1, len(bars) // 8)
    for i, b in enumerate(bars):
        x = left + i * slot + gap / 2
        w = max(1.0, slot - gap)
        h_ok = plot_h * b.succeeded / top
        h_bad = plot_h * b.failed / top
        y_ok = 8 + plot_h - h_ok
        y_bad = y_ok - h_bad
        tip = f"{_label(b.start, step)}: {b.succeeded} succeeded, {b.failed} failed"
        parts.append(f"<g><title>{escape(tip)}</title>")
        parts.append(
            f'<rect class="ok" x="{_fmt(x)}" y="{_fmt(y_ok)}" width="{_fmt(w)}" '
            f'height="{_fmt(h_ok)}"/>'
        )
        if b.failed:
            parts.append(
                f'<rect class="bad" x="{_fmt(x)}" y="{_fmt(y_bad)}" width="{_fmt(w)}" '
                f'height="{_fmt(h_bad)}"/>'
            )
        parts.append("</g>")
        if i % every == 0:
            parts.append(
                f'<text class="tick" x="{_fmt(x + w / 2)}" y="{height - 6}" '
                f'text-anchor="middle">{escape(_label(b.start, step))}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text in it was escaped)


def gantt(tasks: Sequence[Task], now: float, width: int = 720) -> Markup:
    """One row per task: waiting (created to started) pale, running or run (started to
    finished, or now) in its status's colour."""
    rows = list(tasks[:MAX_GANTT_ROWS])
    if not rows:
        return Markup("")
    begin = min(t.created_at for t in rows)
    end = max(
        (t.finished_at or (now if t.status == TaskStatus.RUNNING else t.started_at or t.created_at))
        for t in rows
    )
    end = max(end, begin + 1.0)
    label_w, right, row_h, axis_h = 64, 8, 16, 18
    plot_w = width - label_w - right
    height = axis_h + row_h * len(rows) + 4

    def x(ts: float) -> float:
        return label_w + plot_w * (ts - begin) / (end - begin)

    parts = [
        f'<svg class="gantt" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Timeline of {len(rows)} tasks over {_fmt(end - begin)} seconds">',
        f'<text class="tick" x="{label_w}" y="12">0 s</text>',
        f'<text class="tick" x="{width - right}" y="12" text-anchor="end">'
        f"{_fmt(end - begin)} s</text>",
    ]
    for i, t in enumerate(rows):
        y = axis_h + i * row_h
        parts.append(f'<text class="tick" x="{label_w - 6}" y="{y + 11}" text-anchor="end">')
        parts.append(f"#{t.seq}</text>")
        started = t.started_at
        if started is None:
            stop = now if not t.status.terminal else (t.finished_at or t.created_at)
            parts.append(_span(x(t.created_at), x(max(stop, t.created_at)), y, "wait", t, now))
            continue
        parts.append(_span(x(t.created_at), x(started), y, "wait", t, now))
        finish = t.finished_at if t.finished_at is not None else now
        parts.append(_span(x(started), x(max(finish, started)), y, t.status.value, t, now))
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every text in it was escaped)


def _span(x0: float, x1: float, y: float, cls: str, t: Task, now: float) -> str:
    w = max(1.0, x1 - x0)
    ran = (t.finished_at or now) - t.started_at if t.started_at is not None else None
    tip = f"task {t.id} (#{t.seq}) {t.status.value}"
    if ran is not None:
        tip += f", ran {_fmt(ran)} s"
    return (
        f'<rect class="{cls}" x="{_fmt(x0)}" y="{_fmt(y + 2)}" width="{_fmt(w)}" height="12">'
        f"<title>{escape(tip)}</title></rect>"
    )
