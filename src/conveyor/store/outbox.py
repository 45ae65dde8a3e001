"""The store's verbs over artifact records and the notifications outbox, shared by both
dialects. The outbox is filled from the events table, which every state change already
writes in its own transaction: a named cursor and the rows it makes advance together, so
a process that dies loses no completion and announces none twice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from conveyor.artifacts import Artifact, ArtifactKind
from conveyor.events import Event
from conveyor.notifications import NewNotification, Notification, NotificationStatus
from conveyor.store import schema as t
from conveyor.store.rows import event_from_row, event_row
from conveyor.store.sqlbase import SQLBase

Planner = Callable[[Sequence[Event]], list[NewNotification]]


def settled_prefix(events: Sequence[Event], after: int, now: float, settle: float) -> list[Event]:
    """The events that can be handed on without skipping one still to come. Ids are
    handed out when rows are written but seen when they commit, so a gap in the ids may
    be a transaction still in flight: stop before a gap until `settle` seconds have
    passed since the event after it (then the gap was a rollback)."""
    out: list[Event] = []
    expected = after + 1
    for ev in events:
        if ev.id != expected and ev.ts > now - settle:
            break
        out.append(ev)
        expected = ev.id + 1
    return out


def _artifact(r: Any) -> Artifact:
    return Artifact(
        task_id=r.task_id,
        request_id=r.request_id,
        attempt=r.attempt,
        kind=ArtifactKind(r.kind),
        name=r.name,
        key=r.key,
        url=r.url,
        size=r.size,
        sha256=r.sha256,
        created_at=r.created_at,
    )


def _notification(r: Any) -> Notification:
    return Notification(
        id=r.id,
        event_id=r.event_id,
        subject=r.subject,
        status=r.status,
        pipeline=r.pipeline,
        request_id=r.request_id,
        task_id=r.task_id,
        url=r.url,
        state=NotificationStatus(r.state),
        attempts=r.attempts,
        max_attempts=r.max_attempts,
        next_at=r.next_at,
        last_error=r.last_error,
        created_at=r.created_at,
        sent_at=r.sent_at,
    )


class OutboxVerbs(SQLBase):
    # ---------------------------------------------------------------- artifacts
    def record_artifacts(self, artifacts: Sequence[Artifact]) -> None:
        """Record what attempts kept; recording an attempt's artifact again replaces it."""
        if not artifacts:
            return
        c = t.artifacts.c
        with self._write() as conn:
            for a in artifacts:
                conn.execute(
                    t.artifacts.delete().where(
                        c.task_id == a.task_id,
                        c.attempt == a.attempt,
                        c.kind == a.kind.value,
                        c.name == a.name,
                    )
                )
            conn.execute(
                t.artifacts.insert(),
                [
                    {**dataclasses.asdict(a), "kind": a.kind.value}  # the table's columns
                    for a in artifacts
                ],
            )

    def list_artifacts(
        self, task_id: int | None = None, request_id: int | None = None
    ) -> list[Artifact]:
        with self._read() as conn:
            return self._artifacts(conn, task_id, request_id)

    def _artifacts(
        self, conn: Connection, task_id: int | None = None, request_id: int | None = None
    ) -> list[Artifact]:
        c = t.artifacts.c
        q = sa.select(t.artifacts).order_by(c.task_id, c.attempt, c.kind, c.name)
        if task_id is not None:
            q = q.where(c.task_id == task_id)
        if request_id is not None:
            q = q.where(c.request_id == request_id)
        return [_artifact(r) for r in conn.execute(q)]

    # ------------------------------------------------------------ notifications
    def _ensure_cursor(self, name: str, now: float) -> None:
        """A new cursor starts at the newest event: what finished before a notifier
        ever ran is not announced."""
        made: set[str] = self.__dict__.setdefault("_cursors_made", set())
        if name in made:
            return
        try:
            with self._write() as conn:
                found = conn.execute(
                    sa.select(t.event_cursors.c.name).where(t.event_cursors.c.name == name)
                ).first()
                if found is None:
                    latest = conn.execute(sa.select(sa.func.max(t.events.c.id))).scalar()
                    conn.execute(
                        t.event_cursors.insert().values(
                            name=name, event_id=int(latest or 0), updated_at=now
                        )
                    )
        except sa.exc.IntegrityError:
            pass  # another notifier made it first
        made.add(name)

    def enqueue_notifications(
        self, cursor: str, plan: Planner, now: float, limit: int = 500, settle: float = 10.0
    ) -> tuple[int, int]:
        """Follow the events from the cursor: write the notifications `plan` makes of
        them and move the cursor, in one transaction. Returns how many were written and
        the event id the cursor is at."""
        self._ensure_cursor(cursor, now)
        with self._write() as conn:
            q = sa.select(t.event_cursors.c.event_id).where(t.event_cursors.c.name == cursor)
            if self.dialect == "postgresql":
                q = q.with_for_update()
            after = int(conn.execute(q).scalar_one())
            events = settled_prefix(self._events_after(conn, after, limit), after, now, settle)
            if not events:
                return 0, after
            new = plan(events)
            if new:
                conn.execute(
                    t.notifications.insert(),
                    [
                        {
                            "event_id": n.event_id,
                            "subject": n.subject,
                            "status": n.status,
                            "pipeline": n.pipeline,
                            "request_id": n.request_id,
                            "task_id": n.task_id,
                            "url": n.url,
                            "state": NotificationStatus.PENDING.value,
                            "attempts": 0,
                            "max_attempts": n.max_attempts,
                            "next_at": now,
                            "created_at": now,
                        }
                        for n in new
                    ],
                )
            conn.execute(
                t.event_cursors.update()
                .where(t.event_cursors.c.name == cursor)
                .values(event_id=events[-1].id, updated_at=now)
            )
            return len(new), events[-1].id

    def _events_after(self, conn: Connection, after: int, limit: int) -> list[Event]:
        q = sa.select(t.events).where(t.events.c.id > after).order_by(t.events.c.id).limit(limit)
        return [event_from_row(r) for r in conn.execute(q)]

    def next_notification_at(self) -> float | None:
        with self._read() as conn:
            value = conn.execute(
                sa.select(sa.func.min(t.notifications.c.next_at)).where(
                    t.notifications.c.state == NotificationStatus.PENDING.value
                )
            ).scalar()
        return None if value is None else float(value)

    def claim_notifications(self, n: int, lease: float, now: float) -> list[Notification]:
        """Take up to n due notifications for `lease` seconds: a notifier that dies
        while sending leaves them due again once the lease is over."""
        if n <= 0:
            return []
        with self._write() as conn:
            rows = conn.execute(
                sa.text(
                    "UPDATE notifications SET next_at = :until WHERE id IN ("
                    "SELECT id FROM notifications WHERE state = 'pending' AND next_at <= :now "
                    "ORDER BY next_at, id LIMIT :n) AND state = 'pending' AND next_at <= :now "
                    "RETURNING *"
                ),
                {"until": now + lease, "now": now, "n": n},
            ).all()
        return sorted((_notification(r) for r in rows), key=lambda x: x.id)

    def settle_notification(
        self,
        notification_id: int,
        now: float,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> None:
        """After one delivery attempt: sent (no error), due again at `retry_at`, or
        failed for good (an error and no retry_at). Sent and failed are events too."""
        if error is None:
            values: dict[str, Any] = {
                "state": NotificationStatus.SENT.value,
                "sent_at": now,
                "last_error": None,
            }
        elif retry_at is not None:
            values = {"next_at": retry_at, "last_error": error}
        else:
            values = {"state": NotificationStatus.FAILED.value, "last_error": error}
        c = t.notifications.c
        with self._write() as conn:
            row = conn.execute(
                t.notifications.update()
                .where(c.id == notification_id, c.state == NotificationStatus.PENDING.value)
                .values(attempts=c.attempts + 1, **values)
                .returning(*t.notifications.c)
            ).first()
            if row is None or (error is not None and retry_at is not None):
                return
            data: dict[str, Any] = {
                "notification": row.id,
                "subject": row.subject,
                "status": row.status,
                "attempts": row.attempts,
            }
            if error is not None:
                data["error"] = error
            kind = "notification.sent" if error is None else "notification.failed"
            self._insert_events(
                conn,
                [event_row(now, kind, row.request_id, row.task_id, row.pipeline, data=data)],
            )

    def list_notifications(
        self, request_id: int | None = None, limit: int = 100
    ) -> list[Notification]:
        c = t.notifications.c
        q = sa.select(t.notifications).order_by(c.id).limit(limit)
        if request_id is not None:
            q = q.where(c.request_id == request_id)
        with self._read() as conn:
            return [_notification(r) for r in conn.execute(q)]
