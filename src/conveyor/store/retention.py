"""The store's retention verbs, shared by both dialects: old finished requests go, with
everything recorded about them, a batch per transaction so no lock is held for long."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from conveyor.requests import RequestStatus
from conveyor.retention import Pruned
from conveyor.store import schema as t
from conveyor.store.sqlbase import SQLBase

_FINISHED = [
    s.value for s in (RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED)
]
# What hangs off a request, deleted before it (children first).
_BELONGING = (
    ("notifications", t.notifications),
    ("artifacts", t.artifacts),
    ("events", t.events),
    ("tasks", t.tasks),
)


def _prunable(finished_before: float) -> sa.Select[Any]:
    """Requests that finished before the cut-off, but not one whose result a request
    still running or finished since reused (it stays while that one does)."""
    r = t.requests.c
    reuse = t.requests.alias("reuse")
    newer_reuse = (
        sa.select(reuse.c.id)
        .where(
            reuse.c.reused_request_id == r.id,
            sa.or_(reuse.c.finished_at.is_(None), reuse.c.finished_at >= finished_before),
        )
        .exists()
    )
    return sa.select(r.id).where(
        r.created_at < finished_before,
        r.finished_at < finished_before,
        r.status.in_(_FINISHED),
        ~newer_reuse,
    )


class RetentionVerbs(SQLBase):
    def prune(self, finished_before: float, limit: int = 500) -> Pruned:
        """Delete up to `limit` prunable requests (oldest first) with their tasks,
        events, artifact records and notifications, in one transaction. The artifact
        keys are returned for the caller to delete from the artifact store once this
        has committed."""
        r = t.requests.c
        counts = dict.fromkeys((name for name, _ in _BELONGING), 0)
        with self._write() as conn:
            ids = list(
                conn.execute(_prunable(finished_before).order_by(r.id).limit(limit)).scalars()
            )
            keys: list[str] = []
            if ids:
                keys = list(
                    conn.execute(
                        sa.select(t.artifacts.c.key).where(t.artifacts.c.request_id.in_(ids))
                    ).scalars()
                )
                # A reuse older than the cut-off goes in a later batch; its link goes now.
                conn.execute(
                    t.requests.update()
                    .where(r.reused_request_id.in_(ids), r.id.not_in(ids))
                    .values(reused_request_id=None)
                )
                # quiet attempts' logs, found by their tasks (they keep no request id)
                tasks = sa.select(t.tasks.c.id).where(t.tasks.c.request_id.in_(ids))
                logs = t.attempt_logs
                conn.execute(logs.delete().where(logs.c.task_id.in_(tasks)))
                for name, table in _BELONGING:
                    counts[name] = conn.execute(
                        table.delete().where(table.c.request_id.in_(ids))
                    ).rowcount
                conn.execute(t.requests.delete().where(r.id.in_(ids)))
        return Pruned(
            requests=len(ids),
            tasks=counts["tasks"],
            events=counts["events"],
            artifacts=counts["artifacts"],
            notifications=counts["notifications"],
            request_ids=tuple(ids),
            artifact_keys=tuple(keys),
        )

    def count_prunable(self, finished_before: float) -> Pruned:
        """What `prune` would delete, in all (request ids are not listed)."""
        cand = _prunable(finished_before).subquery()
        with self._read() as conn:
            requests = conn.execute(sa.select(sa.func.count()).select_from(cand)).scalar_one()
            counts = {
                name: conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.request_id.in_(sa.select(cand.c.id)))
                ).scalar_one()
                for name, table in _BELONGING
            }
        return Pruned(
            requests=requests,
            tasks=counts["tasks"],
            events=counts["events"],
            artifacts=counts["artifacts"],
            notifications=counts["notifications"],
        )

    def prune_unattached(self, before: float) -> int:
        """Forget workers silent since before `before`, and events of no request (queue
        pauses, say) older than that; how many rows went."""
        w = t.workers.c
        e = t.events.c
        with self._write() as conn:
            gone = conn.execute(t.workers.delete().where(w.last_heartbeat < before)).rowcount
            gone += conn.execute(
                t.events.delete().where(e.request_id.is_(None), e.ts < before)
            ).rowcount
            return gone
