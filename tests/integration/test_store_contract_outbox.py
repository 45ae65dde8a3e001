"""The store contract for artifact records and the notifications outbox, on SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from store_helpers import T0, claim, run_to_success, submit

from conveyor.artifacts import Artifact, ArtifactKind
from conveyor.events import Event
from conveyor.notifications import NewNotification, NotificationStatus, NotifySettings, plan
from conveyor.store import Store


def _artifact(task_id: int, request_id: int, attempt: int, name: str, sha: str) -> Artifact:
    return Artifact(
        task_id,
        request_id,
        attempt,
        ArtifactKind.OUTPUT,
        name,
        f"k/{name}",
        f"s3://b/k/{name}",
        3,
        sha,
        T0,
    )


def test_artifacts_are_recorded_listed_and_replaced(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    t1, t2 = claim(store)
    store.record_artifacts(
        [
            _artifact(t1.id, rid, 1, "x.csv", "aa"),
            _artifact(t1.id, rid, 1, "out/y.db", "bb"),
            _artifact(t2.id, rid, 1, "x.csv", "cc"),
        ]
    )
    # the same attempt's artifact recorded again replaces the first record
    store.record_artifacts([_artifact(t1.id, rid, 1, "x.csv", "dd")])
    mine = store.list_artifacts(task_id=t1.id)
    assert [(a.name, a.sha256) for a in mine] == [("out/y.db", "bb"), ("x.csv", "dd")]
    assert mine[0].kind == ArtifactKind.OUTPUT and mine[0].url == "s3://b/k/out/y.db"
    assert len(store.list_artifacts(request_id=rid)) == 3
    assert store.list_artifacts(task_id=t2.id + 100) == []

    # a request and its artifacts, read together
    found = store.get_request_artifacts(rid)
    assert found is not None
    req, kept = found
    assert req.id == rid and [t.id for t in req.tasks] == [t1.id, t2.id]
    assert kept == store.list_artifacts(request_id=rid)
    other = submit(store)
    assert store.get_request_artifacts(other) is not None
    assert store.get_request_artifacts(other)[1] == []  # type: ignore[index]
    assert store.get_request_artifacts(other + 100) is None


SETTINGS = {"p": NotifySettings(webhook="http://127.0.0.1:9/hook")}


def _plan(events: Sequence[Event]) -> list[NewNotification]:
    return plan(events, SETTINGS, T0)


def test_the_outbox_follows_completions_from_where_its_cursor_began(store: Store) -> None:
    before = submit(store)
    run_to_success(store, before, T0)
    # a new cursor starts at the newest event: what finished earlier is not announced
    assert store.enqueue_notifications("n", _plan, T0 + 1) == (0, store.latest_event_id())
    rid = submit(store, now=T0 + 2, items=["a", "b"])
    run_to_success(store, rid, T0 + 3)
    written, at = store.enqueue_notifications("n", _plan, T0 + 30)
    assert written == 3 and at == store.latest_event_id()
    # nothing is written twice
    assert store.enqueue_notifications("n", _plan, T0 + 31)[0] == 0
    found = store.list_notifications(request_id=rid)
    assert sorted((n.subject, n.status) for n in found) == [
        ("request", "succeeded"),
        ("task", "succeeded"),
        ("task", "succeeded"),
    ]
    assert all(n.state == NotificationStatus.PENDING and n.attempts == 0 for n in found)


def test_deliveries_are_claimed_retried_and_settled_with_events(store: Store) -> None:
    store.enqueue_notifications("n", _plan, T0)
    rid = submit(store)
    run_to_success(store, rid, T0 + 1)
    store.enqueue_notifications("n", _plan, T0 + 30)
    assert store.next_notification_at() == T0 + 30
    got = store.claim_notifications(10, lease=60, now=T0 + 31)
    assert len(got) == 2
    # claimed: not due again until the lease ends
    assert store.claim_notifications(10, lease=60, now=T0 + 32) == []
    task_n, req_n = sorted(got, key=lambda n: n.subject == "request")
    store.settle_notification(task_n.id, T0 + 33)
    store.settle_notification(req_n.id, T0 + 33, error="HTTP 500", retry_at=T0 + 40)
    assert store.claim_notifications(10, 60, T0 + 39) == []
    again = store.claim_notifications(10, 60, T0 + 40)
    assert [(n.id, n.attempts, n.last_error) for n in again] == [(req_n.id, 1, "HTTP 500")]
    store.settle_notification(req_n.id, T0 + 41, error="HTTP 500 again")
    final = {n.id: n for n in store.list_notifications(request_id=rid)}
    assert final[task_n.id].state == NotificationStatus.SENT
    assert final[task_n.id].sent_at == T0 + 33
    assert final[req_n.id].state == NotificationStatus.FAILED
    assert (final[req_n.id].attempts, final[req_n.id].last_error) == (2, "HTTP 500 again")
    kinds = [
        (e.kind, e.data.get("error"))
        for e in store.events(request_id=rid)
        if e.kind.startswith("notification.")
    ]
    assert kinds == [("notification.sent", None), ("notification.failed", "HTTP 500 again")]
    # settled ones are not sent again
    assert store.claim_notifications(10, 60, T0 + 1000) == []
    assert store.next_notification_at() is None
