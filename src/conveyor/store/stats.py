"""The store's aggregate reads: what the dashboard and the metrics show. Each is one or
two grouped queries, written to stay cheap on large tables:

- finished tasks are counted from the requests' counters (one row per request), not
  from the tasks; queued and running ones from the tasks' partial indexes on those
  states;
- throughput reads only the tasks finished in a bounded window, in coarse buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from conveyor.stats import ActivityRow, PipelineTotals, StatusCount
from conveyor.store import schema as t
from conveyor.store.rows import task_from_row
from conveyor.store.sqlbase import SQLBase, params_pattern
from conveyor.tasks import Task, TaskStatus


class SQLStats(SQLBase):
    def _bucket(self, column: Any, width: float) -> Any:
        """The start of the `width`-second bucket `column` falls in."""
        if self.dialect == "postgresql":
            return sa.func.floor(column / width) * width
        # SQLite may lack floor(); times are positive, so truncation is the floor.
        return sa.cast(column / width, sa.Integer) * width

    def status_counts(self) -> list[StatusCount]:
        r = t.requests.c
        out: list[StatusCount] = []
        finished: dict[tuple[str, str], list[int]] = {}
        with self._read() as conn:
            for queue, pipeline, status, n, ok, bad, cancelled in conn.execute(
                sa.select(
                    r.queue,
                    r.pipeline,
                    r.status,
                    sa.func.count(),
                    sa.func.sum(r.tasks_succeeded),
                    sa.func.sum(r.tasks_failed),
                    sa.func.sum(r.tasks_cancelled),
                ).group_by(r.queue, r.pipeline, r.status)
            ):
                out.append(StatusCount("request", queue, pipeline, status, int(n)))
                sums = finished.setdefault((queue, pipeline), [0, 0, 0])
                sums[0] += int(ok or 0)
                sums[1] += int(bad or 0)
                sums[2] += int(cancelled or 0)
            # One statement per state, each matching a partial index's predicate.
            for status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
                c = t.tasks.c
                for queue, pipeline, n in conn.execute(
                    sa.select(c.queue, c.pipeline, sa.func.count())
                    .where(c.status == status.value)
                    .group_by(c.queue, c.pipeline)
                ):
                    out.append(StatusCount("task", queue, pipeline, status.value, int(n)))
        for (queue, pipeline), (ok, bad, cancelled) in finished.items():
            for status, n in (
                (TaskStatus.SUCCEEDED, ok),
                (TaskStatus.FAILED, bad),
                (TaskStatus.CANCELLED, cancelled),
            ):
                if n:
                    out.append(StatusCount("task", queue, pipeline, status.value, n))
        return out

    def activity(self, since: float, width: float) -> list[ActivityRow]:
        c = t.tasks.c
        bucket = self._bucket(c.finished_at, width).label("bucket")
        q = (
            sa.select(bucket, c.queue, c.pipeline, c.status, sa.func.count())
            .where(
                c.finished_at >= since,
                c.status.in_([TaskStatus.SUCCEEDED.value, TaskStatus.FAILED.value]),
            )
            .group_by(bucket, c.queue, c.pipeline, c.status)
        )
        with self._read() as conn:
            return [
                ActivityRow(float(b), queue, pipeline, status, int(n))
                for b, queue, pipeline, status, n in conn.execute(q)
            ]

    def pipeline_totals(self, bounds: Sequence[float]) -> list[PipelineTotals]:
        c = t.tasks.c
        done = c.status.in_([TaskStatus.SUCCEEDED.value, TaskStatus.FAILED.value]) & (
            c.started_at.is_not(None)
        )
        duration = c.finished_at - c.started_at

        def count_if(cond: Any) -> Any:
            return sa.func.sum(sa.case((cond, 1), else_=0))

        q = sa.select(
            c.pipeline,
            sa.func.sum(c.attempts),
            count_if(c.status == TaskStatus.SUCCEEDED.value),
            count_if(c.status == TaskStatus.FAILED.value),
            sa.func.sum(sa.case((c.attempts > 1, c.attempts - 1), else_=0)),
            count_if(done),
            sa.func.sum(sa.case((done, duration), else_=0.0)),
            *[count_if(done & (duration <= b)) for b in bounds],
        ).group_by(c.pipeline)
        with self._read() as conn:
            rows = conn.execute(q).all()
        return [
            PipelineTotals(
                pipeline=row[0],
                started=int(row[1] or 0),
                succeeded=int(row[2] or 0),
                failed=int(row[3] or 0),
                retried=int(row[4] or 0),
                duration_count=int(row[5] or 0),
                duration_sum=float(row[6] or 0.0),
                duration_counts=tuple(int(v or 0) for v in row[7:]),
            )
            for row in rows
        ]

    def count_events(self, kind: str) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(t.events).where(t.events.c.kind == kind)
                ).scalar()
                or 0
            )

    def failed_tasks(
        self, limit: int = 50, before_id: int | None = None, text: str | None = None
    ) -> list[Task]:
        c = t.tasks.c
        # A failed task's request counts it: the few requests with failures lead to
        # their tasks through the request index, whatever the size of the tasks table.
        with_failures = sa.select(t.requests.c.id).where(t.requests.c.tasks_failed > 0)
        q = (
            sa.select(t.tasks)
            .where(c.status == TaskStatus.FAILED.value, c.request_id.in_(with_failures))
            .order_by(c.id.desc())
            .limit(max(1, min(limit, 1000)))
        )
        if before_id is not None:
            q = q.where(c.id < before_id)
        if text:
            needle = text.strip()
            if needle.isdigit() and len(needle) < 19:
                q = q.where((c.id == int(needle)) | (c.request_id == int(needle)))
            else:
                pattern = params_pattern(needle)
                q = q.where(
                    sa.func.lower(c.error).like(f"%{_like(needle.lower())}%", escape="!")
                    | sa.func.lower(sa.cast(c.params, sa.Text)).like(pattern, escape="!")
                )
        with self._read() as conn:
            return [task_from_row(r) for r in conn.execute(q)]


def _like(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")
