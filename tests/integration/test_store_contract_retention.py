"""Store contract, retention: what `prune` deletes and what it keeps. On SQLite and
PostgreSQL (the `store` fixture)."""

from __future__ import annotations

from store_helpers import T0, claim, new_request, run_to_success, submit

from conveyor.artifacts import Artifact, ArtifactKind
from conveyor.store import Store, WorkerInfo
from conveyor.tasks import Outcome, Task, TaskAction

DAY = 86400.0
TTL = 1000 * DAY  # results stay reusable for the whole test


def _artifact(task_id: int, request_id: int, name: str) -> Artifact:
    return Artifact(
        task_id=task_id,
        request_id=request_id,
        attempt=1,
        kind=ArtifactKind.OUTPUT,
        name=name,
        key=f"k/{request_id}/{task_id}/{name}",
        url=f"file:///objects/k/{request_id}/{task_id}/{name}",
        size=3,
        sha256="0" * 64,
        created_at=T0,
    )


def _finished(
    store: Store, now: float, fail: bool = False, quiet_log: str | None = None, **kw: object
) -> int:
    rid = submit(store, now, items=["a", "b"], **kw)
    if fail or quiet_log is not None:
        tasks = claim(store, "w", n=1000, now=now)
        action = TaskAction.FAIL if fail else TaskAction.SUCCEED
        outcomes = [
            Outcome(t.id, action, error="no" if fail else None, log=quiet_log) for t in tasks
        ]
        store.finish("w", outcomes, now)
    else:
        run_to_success(store, rid, now)
    return rid


def _tasks(store: Store, request_id: int) -> list[Task]:
    req = store.get_request(request_id)
    assert req is not None
    return list(req.tasks)


def test_prune_deletes_old_finished_requests_with_all_they_hold(store: Store) -> None:
    old_ok = _finished(store, T0)
    old_failed = _finished(store, T0 + 1, fail=True)
    cancelled = submit(store, T0 + 2)
    store.cancel_request(cancelled, T0 + 2)
    recent = _finished(store, T0 + 10 * DAY)
    # quiet attempts' logs go with their tasks
    logged = _finished(store, T0 + 1, quiet_log="$ true\nexit code 0\n")
    kept = _finished(store, T0 + 10 * DAY, quiet_log="$ true\nexit code 0\n")
    running = submit(store, T0 + 3)
    claim(store, "w2", n=1, now=T0 + 3)
    queued = submit(store, T0 + 4)
    req = store.get_request(old_ok)
    assert req is not None
    store.record_artifacts([_artifact(t.id, old_ok, "out.csv") for t in req.tasks])
    recent_req = store.get_request(recent)
    assert recent_req is not None
    store.record_artifacts([_artifact(recent_req.tasks[0].id, recent, "keep.csv")])

    cutoff = T0 + 5 * DAY
    would = store.count_prunable(cutoff)
    assert (would.requests, would.tasks, would.artifacts) == (4, 7, 2)
    assert would.events > 0
    assert store.get_request(old_ok) is not None, "counting deletes nothing"

    logged_tasks = [t.id for t in _tasks(store, logged)]
    kept_tasks = [t.id for t in _tasks(store, kept)]
    done = store.prune(cutoff)
    assert sorted(done.request_ids) == sorted([old_ok, old_failed, cancelled, logged])
    assert (done.requests, done.tasks, done.artifacts) == (4, 7, 2)
    assert all(store.attempt_logs(t) == {} for t in logged_tasks)
    assert all(store.attempt_logs(t) == {1: "$ true\nexit code 0\n"} for t in kept_tasks)
    assert done.events == would.events
    assert sorted(done.artifact_keys) == sorted(f"k/{old_ok}/{t.id}/out.csv" for t in req.tasks)
    for rid in (old_ok, old_failed, cancelled):
        assert store.get_request(rid) is None
        assert store.events(request_id=rid) == []
        assert store.list_artifacts(request_id=rid) == []
    for rid in (recent, running, queued, kept):
        assert store.get_request(rid) is not None
    assert len(store.list_artifacts(request_id=recent)) == 1
    assert store.count_tasks() == 2 + 1 + 1 + 2  # recent (2), running, queued, kept (2)
    assert store.prune(cutoff).requests == 0, "nothing left to prune"


def test_prune_goes_in_batches_oldest_first(store: Store) -> None:
    ids = [_finished(store, T0 + i) for i in range(5)]
    first = store.prune(T0 + DAY, limit=2)
    assert first.request_ids == tuple(ids[:2])
    second = store.prune(T0 + DAY, limit=2)
    assert second.request_ids == tuple(ids[2:4])
    assert store.prune(T0 + DAY, limit=2).request_ids == (ids[4],)


def test_a_reused_result_stays_while_its_reuse_does(store: Store) -> None:
    source = _finished(store, T0, cache_ttl=TTL)
    reuse = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 10 * DAY)
    assert reuse.request.reused_request_id == source
    assert store.prune(T0 + 5 * DAY).requests == 0
    assert store.get_request(source) is not None
    # once the reuse is old too, both go (the reuse's link first)
    done = store.prune(T0 + 20 * DAY, limit=1)
    assert done.request_ids == (source,)
    left = store.get_request(reuse.request.id)
    assert left is not None and left.reused_request_id is None
    assert store.prune(T0 + 20 * DAY).request_ids == (reuse.request.id,)


def test_prune_unattached_forgets_silent_workers_and_old_request_less_events(
    store: Store,
) -> None:
    store.register_worker(WorkerInfo("gone", "h", 1, ("default",), 1), T0)
    store.register_worker(WorkerInfo("alive", "h", 2, ("default",), 1), T0 + 10 * DAY)
    store.pause("default", T0)
    store.resume("default", T0 + 10 * DAY)
    assert store.prune_unattached(T0 + 5 * DAY) >= 2
    assert [w.id for w in store.list_workers()] == ["alive"]
    kinds = [e.kind for e in store.events(limit=1000) if e.request_id is None]
    assert kinds == ["worker.started", "queue.resumed"]  # the ones since the cut-off


def test_ids_are_never_given_out_again_once_the_newest_rows_are_pruned(store: Store) -> None:
    # An idle service prunes everything: a client may still hold the old request id,
    # and readers of events remember the last id they handled.
    old = _finished(store, T0)
    before = store.get_request(old)
    assert before is not None
    last_event = store.latest_event_id()
    assert store.prune(T0 + 5 * DAY).request_ids == (old,)
    store.prune_unattached(T0 + 5 * DAY)
    assert store.events(limit=1000) == []
    new = store.get_request(_finished(store, T0 + 6 * DAY))
    assert new is not None and new.id > old
    assert min(t.id for t in new.tasks) > max(t.id for t in before.tasks)
    assert min(e.id for e in store.events(limit=1000)) > last_event
