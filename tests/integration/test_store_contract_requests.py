"""Store contract, requests side: submitting, listing, idempotency, the result cache,
cancelling and retrying requests, workers, events and opening a store.

Every test runs on SQLite and on PostgreSQL (the `store` / `make_app` fixtures)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from store_helpers import (
    LEASE,
    T0,
    claim,
    kinds,
    new_request,
    run_to_success,
    submit,
    succeed,
)

from conveyor.requests import CachePolicy, RequestStatus
from conveyor.store import (
    Conflict,
    NotFound,
    RequestFilter,
    Store,
    StoreError,
    WorkerInfo,
    open_store,
)
from conveyor.store.postgres import PostgresStore
from conveyor.store.sqlite import SQLiteStore
from conveyor.tasks import Outcome, TaskAction, TaskStatus

# ------------------------------------------------------------------------------ submit


def test_submit_creates_the_request_and_one_task_per_item(store: Store) -> None:
    done = store.submit(
        new_request(
            "p", ["a", "b", "c"], max_attempts=3, timeout=60.0, submitter="ann", extra={"shared": 1}
        ),
        T0,
    )

    assert done.created
    req = done.request
    assert req.status == RequestStatus.REQUESTED
    assert req.pipeline == "p"
    assert req.params == {"items": ["a", "b", "c"], "shared": 1}
    assert req.counts.total == 3 and req.counts.finished == 0
    assert req.created_at == T0 and req.started_at is None and req.finished_at is None
    assert req.submitter == "ann"

    got = store.get_request(req.id)
    assert got is not None
    assert [t.seq for t in got.tasks] == [0, 1, 2]
    assert [t.params for t in got.tasks] == [
        {"shared": 1, "items": "a", "item": "a"},
        {"shared": 1, "items": "b", "item": "b"},
        {"shared": 1, "items": "c", "item": "c"},
    ]
    for task in got.tasks:
        assert task.request_id == req.id
        assert task.status == TaskStatus.QUEUED
        assert task.attempts == 0 and task.max_attempts == 3
        assert task.timeout == 60.0
        assert task.available_at == T0 and task.created_at == T0
        assert task.lease_owner is None
    assert store.count_tasks(request_id=req.id, status="queued") == 3

    events = store.events(request_id=req.id)
    assert kinds(events) == ["request.submitted"]
    assert events[0].pipeline == "p" and events[0].queue == "default"
    assert events[0].data["tasks"] == 3


def test_get_request_without_tasks_and_unknown_ids(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    bare = store.get_request(rid, with_tasks=False)
    assert bare is not None and bare.tasks == () and bare.counts.total == 2
    assert store.get_request(rid + 1000) is None
    assert store.get_task(10_000) is None


def test_submit_many_stores_every_request_in_order(store: Store) -> None:
    batch = [
        new_request("p", ["a"]),
        new_request("q", ["b", "c"], queue="urgent", priority=4),
        new_request("r", ["d", "e", "f"], submitter="bob"),
    ]
    out = store.submit_many(batch, T0)

    assert [s.created for s in out] == [True, True, True]
    assert [s.request.pipeline for s in out] == ["p", "q", "r"]
    assert len({s.request.id for s in out}) == 3
    for s, n in zip(out, [1, 2, 3], strict=True):
        got = store.get_request(s.request.id)
        assert got is not None and len(got.tasks) == n
        assert got.status == RequestStatus.REQUESTED
        assert kinds(store.events(request_id=got.id)) == ["request.submitted"]
    q = store.get_request(out[1].request.id)
    assert q is not None
    assert {(t.queue, t.priority) for t in q.tasks} == {("urgent", 4)}
    assert store.count_tasks() == 6


def test_app_submit_splits_and_routes_as_the_pipeline_says(make_app) -> None:
    app = make_app(
        """
        [pipelines.p]
        executor = "python"
        handler = "conveyor.examples.handlers:noop"
        split = "items"
        queue = "urgent"
        priority = 7
        retries = 2
        timeout = 90
        """
    )
    done = app.submit("p", {"items": [{"x": 1}, {"x": 2}], "mode": "fast"})
    req = app.get(done.request.id)

    assert req.status == RequestStatus.REQUESTED
    assert [t.params for t in req.tasks] == [{"mode": "fast", "x": 1}, {"mode": "fast", "x": 2}]
    assert {(t.queue, t.priority, t.max_attempts, t.timeout) for t in req.tasks} == {
        ("urgent", 7, 3, 90.0)
    }
    assert app.store.claim("w", ["default"], 10, LEASE, app.clock()) == []
    assert len(app.store.claim("w", ["urgent"], 10, LEASE, app.clock())) == 2


# ------------------------------------------------------------------------------- list


def test_list_requests_filters_and_pages_newest_first(store: Store) -> None:
    a = submit(store, T0 + 0, pipeline="p", submitter="ann")
    b = submit(store, T0 + 10, pipeline="q", queue="urgent", submitter="bob")
    c = submit(store, T0 + 20, pipeline="p", queue="urgent", submitter="ann")
    d = submit(store, T0 + 30, pipeline="q", submitter="bob")
    run_to_success(store, c, T0 + 40)

    def ids(**kw) -> list[int]:
        return [r.id for r in store.list_requests(RequestFilter(**kw))]

    assert ids() == [d, c, b, a]
    assert ids(limit=2) == [d, c]
    assert ids(before_id=c) == [b, a]
    assert ids(before_id=c, limit=1) == [b]
    assert ids(status="succeeded") == [c]
    # b shares c's queue: claimed on the way and handed back, it has started
    assert ids(status="running") == [b]
    assert ids(status="requested") == [d, a]
    assert ids(pipeline="p") == [c, a]
    assert ids(queue="urgent") == [c, b]
    assert ids(submitter="bob") == [d, b]
    assert ids(created_after=T0 + 10) == [d, c, b]
    assert ids(created_before=T0 + 20) == [b, a]
    assert ids(created_after=T0 + 10, created_before=T0 + 30) == [c, b]
    assert ids(pipeline="p", queue="urgent", submitter="ann", status="succeeded") == [c]
    assert ids(pipeline="nope") == []
    # the listing carries the counts without loading the tasks
    listed = store.list_requests(RequestFilter(status="succeeded"))[0]
    assert listed.counts.total == 1 and listed.counts.succeeded == 1


# ------------------------------------------------------------------------ idempotency


def test_same_idempotency_key_and_params_return_the_existing_request(store: Store) -> None:
    first = store.submit(new_request("p", ["a", "b"], idempotency_key="k-1"), T0)
    again = store.submit(new_request("p", ["a", "b"], idempotency_key="k-1"), T0 + 5)

    assert first.created and not again.created
    assert again.request.id == first.request.id
    assert again.request.idempotency_key == "k-1"
    assert [t.seq for t in again.request.tasks] == [0, 1]
    assert store.count_tasks() == 2
    assert len(store.list_requests(RequestFilter())) == 1
    assert kinds(store.events()) == ["request.submitted"]


def test_same_idempotency_key_with_other_params_is_a_conflict_naming_the_key(
    store: Store,
) -> None:
    store.submit(new_request("p", ["a"], idempotency_key="order-77"), T0)

    with pytest.raises(Conflict, match="order-77"):
        store.submit(new_request("p", ["b"], idempotency_key="order-77"), T0 + 1)
    with pytest.raises(Conflict, match="order-77"):
        store.submit(new_request("other", ["a"], idempotency_key="order-77"), T0 + 1)
    assert store.count_tasks() == 1
    assert len(store.list_requests(RequestFilter())) == 1


def test_submit_many_mixes_existing_and_new_idempotent_requests(store: Store) -> None:
    old = store.submit(new_request("p", ["a"], idempotency_key="k-old"), T0).request
    out = store.submit_many(
        [
            new_request("p", ["z"], idempotency_key="k-new"),
            new_request("p", ["a"], idempotency_key="k-old"),
        ],
        T0 + 1,
    )
    assert [s.created for s in out] == [True, False]
    assert out[1].request.id == old.id
    assert out[0].request.id != old.id
    assert store.count_tasks() == 2


def test_concurrent_submits_with_one_key_make_one_request(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[object] = [None] * len(stores)

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stores[i].submit(new_request("p", ["a"], idempotency_key="race"), T0)
        except Exception as exc:  # recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert len({r.request.id for r in results}) == 1  # type: ignore[union-attr]
        assert sum(r.created for r in results) == 1  # type: ignore[union-attr]
        assert stores[0].count_tasks() == 1
    finally:
        for s in stores:
            s.close()


# ---------------------------------------------------------------------- result cache

TTL = 3600.0


def _cached(store: Store, now: float, **kw) -> int:
    return submit(store, now, items=["a", "b"], cache_ttl=TTL, **kw)


def test_a_recent_success_is_reused(store: Store) -> None:
    original = _cached(store, T0)
    run_to_success(store, original, T0 + 10)

    done = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 100)

    assert done.created
    reuse = store.get_request(done.request.id)
    assert reuse is not None
    assert reuse.id != original
    assert reuse.status == RequestStatus.SUCCEEDED
    assert reuse.reused_request_id == original
    assert reuse.tasks == () and reuse.counts.total == 0
    assert reuse.finished_at == T0 + 100
    assert store.count_tasks() == 2  # only the original's
    assert kinds(store.events(request_id=reuse.id)) == ["request.submitted", "request.succeeded"]
    assert claim(store, now=T0 + 100) == []


def test_a_success_older_than_the_ttl_is_not_reused(store: Store) -> None:
    original = _cached(store, T0)
    run_to_success(store, original, T0 + 10)

    inside = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 10 + TTL - 1)
    assert inside.request.reused_request_id == original

    late = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 10 + TTL + 1)
    assert late.created
    assert late.request.reused_request_id is None
    assert late.request.status == RequestStatus.REQUESTED
    assert late.request.counts.total == 2


def test_other_params_or_pipeline_are_not_reused(store: Store) -> None:
    original = _cached(store, T0)
    run_to_success(store, original, T0 + 10)

    other_params = store.submit(new_request("p", ["a", "c"], cache_ttl=TTL), T0 + 20)
    other_pipeline = store.submit(new_request("q", ["a", "b"], cache_ttl=TTL), T0 + 20)
    assert other_params.request.reused_request_id is None
    assert other_pipeline.request.reused_request_id is None


def test_without_a_ttl_nothing_is_reused(store: Store) -> None:
    original = _cached(store, T0)
    run_to_success(store, original, T0 + 10)

    done = store.submit(new_request("p", ["a", "b"], cache_ttl=None), T0 + 20)
    assert done.request.reused_request_id is None
    assert done.request.status == RequestStatus.REQUESTED


def test_cache_read_bypass_runs_the_work_again(store: Store) -> None:
    original = _cached(store, T0)
    run_to_success(store, original, T0 + 10)

    fresh = store.submit(
        new_request("p", ["a", "b"], cache_ttl=TTL, cache=CachePolicy(read=False)), T0 + 20
    )
    assert fresh.request.reused_request_id is None
    assert fresh.request.status == RequestStatus.REQUESTED
    assert len(claim(store, now=T0 + 20)) == 2


def test_a_request_that_does_not_write_the_cache_is_never_reused(store: Store) -> None:
    private = _cached(store, T0, cache=CachePolicy(write=False))
    run_to_success(store, private, T0 + 10)

    done = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 20)
    assert done.request.reused_request_id is None
    assert done.request.status == RequestStatus.REQUESTED


def test_a_failed_request_is_never_reused(store: Store) -> None:
    failed = _cached(store, T0)
    tasks = claim(store, now=T0 + 1)
    store.finish("w1", [Outcome(t.id, TaskAction.FAIL, error="boom") for t in tasks], T0 + 2)
    got = store.get_request(failed)
    assert got is not None and got.status == RequestStatus.FAILED

    done = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 3)
    assert done.request.reused_request_id is None
    assert done.request.status == RequestStatus.REQUESTED


def test_an_unfinished_request_is_not_reused(store: Store) -> None:
    _cached(store, T0)
    claim(store, now=T0 + 1, n=1)
    done = store.submit(new_request("p", ["a", "b"], cache_ttl=TTL), T0 + 2)
    assert done.request.reused_request_id is None


# ---------------------------------------------------------------------------- cancel


def test_cancel_stops_queued_and_running_tasks(store: Store) -> None:
    rid = submit(store, items=["a", "b", "c"])
    running = claim(store, "w1", n=1, now=T0 + 1)
    assert len(running) == 1

    req = store.cancel_request(rid, T0 + 2)

    assert req.status == RequestStatus.CANCELLED
    assert req.finished_at == T0 + 2
    assert req.counts.cancelled == 3
    assert {t.status for t in req.tasks} == {TaskStatus.CANCELLED}
    ev = kinds(store.events(request_id=rid))
    assert ev.count("task.cancelled") == 3
    assert ev[-1] == "request.cancelled"
    # the worker that was running one loses it and cannot record it any more
    assert store.heartbeat("w1", LEASE, T0 + 3, 1) == set()
    assert succeed(store, "w1", running, T0 + 4) == []
    got = store.get_task(running[0].id)
    assert got is not None and got.status == TaskStatus.CANCELLED
    assert claim(store, now=T0 + 5) == []


def test_cancel_keeps_finished_tasks_and_a_finished_request(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    first = claim(store, n=1, now=T0 + 1)
    succeed(store, "w1", first, T0 + 2)

    req = store.cancel_request(rid, T0 + 3)
    assert req.status == RequestStatus.CANCELLED
    assert [t.status for t in req.tasks] == [TaskStatus.SUCCEEDED, TaskStatus.CANCELLED]
    assert req.counts.succeeded == 1 and req.counts.cancelled == 1

    done = submit(store, T0 + 4, items=["x"])
    run_to_success(store, done, T0 + 5)
    again = store.cancel_request(done, T0 + 6)
    assert again.status == RequestStatus.SUCCEEDED
    assert again.tasks[0].status == TaskStatus.SUCCEEDED


def test_cancel_unknown_request_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.cancel_request(12345, T0)


# ----------------------------------------------------------------------------- retry


def test_retry_requeues_failed_tasks_and_leaves_succeeded_ones(store: Store) -> None:
    rid = submit(store, items=["a", "b", "c"], max_attempts=1)
    a, b, c = claim(store, n=3, now=T0 + 1)
    store.finish(
        "w1",
        [
            Outcome(a.id, TaskAction.SUCCEED, result={"ok": 1}),
            Outcome(b.id, TaskAction.FAIL, error="boom"),
            Outcome(c.id, TaskAction.FAIL, error="bang"),
        ],
        T0 + 2,
    )
    failed = store.get_request(rid)
    assert failed is not None and failed.status == RequestStatus.FAILED

    req = store.retry_request(rid, 2, T0 + 10)

    assert req.status == RequestStatus.RUNNING
    assert req.finished_at is None
    assert req.counts.succeeded == 1 and req.counts.failed == 0
    ta, tb, tc = req.tasks
    assert ta.status == TaskStatus.SUCCEEDED and ta.result == {"ok": 1}
    for t in (tb, tc):
        assert t.status == TaskStatus.QUEUED
        assert t.attempts == 1 and t.max_attempts == 3
        assert t.error is None and t.available_at == T0 + 10
    ev = kinds(store.events(request_id=rid))
    assert ev.count("task.requeued") == 2 and ev[-1] == "request.running"

    again = claim(store, "w2", now=T0 + 11)
    assert sorted(t.id for t in again) == [b.id, c.id]
    assert {t.attempts for t in again} == {2}
    succeed(store, "w2", again, T0 + 12)
    done = store.get_request(rid)
    assert done is not None
    assert done.status == RequestStatus.SUCCEEDED and done.counts.succeeded == 3


def test_retry_of_a_request_cancelled_before_it_started_makes_it_requested(
    store: Store,
) -> None:
    rid = submit(store, items=["a", "b"])
    store.cancel_request(rid, T0 + 1)

    req = store.retry_request(rid, 1, T0 + 2)

    assert req.status == RequestStatus.REQUESTED
    assert req.counts.cancelled == 0
    assert {t.status for t in req.tasks} == {TaskStatus.QUEUED}
    assert len(claim(store, now=T0 + 3)) == 2


def test_retry_of_a_request_that_did_not_fail_is_a_conflict(store: Store) -> None:
    requested = submit(store, items=["a"])
    with pytest.raises(Conflict):
        store.retry_request(requested, 1, T0 + 1)

    claim(store, now=T0 + 1)
    with pytest.raises(Conflict):
        store.retry_request(requested, 1, T0 + 2)  # running

    done = submit(store, T0 + 3, items=["b"])
    run_to_success(store, done, T0 + 4)
    with pytest.raises(Conflict):
        store.retry_request(done, 1, T0 + 5)
    got = store.get_request(done)
    assert got is not None and got.status == RequestStatus.SUCCEEDED

    with pytest.raises(NotFound):
        store.retry_request(99_999, 1, T0)


# ---------------------------------------------------------------------------- workers


def _worker(wid: str, queues: tuple[str, ...] = ("default",)) -> WorkerInfo:
    return WorkerInfo(id=wid, host="h1", pid=42, queues=queues, concurrency=4)


def test_workers_register_heartbeat_and_stop(store: Store) -> None:
    store.register_worker(_worker("w1", ("urgent", "default")), T0)
    store.register_worker(_worker("w2"), T0 + 1)
    store.register_worker(_worker("w3"), T0 + 2)

    everyone = {w.id: w for w in store.list_workers()}
    assert set(everyone) == {"w1", "w2", "w3"}
    w1 = everyone["w1"]
    assert (w1.host, w1.pid, w1.queues, w1.concurrency) == ("h1", 42, ("urgent", "default"), 4)
    assert w1.status == "running" and w1.started_at == T0 and w1.last_heartbeat == T0

    store.heartbeat("w1", LEASE, T0 + 100, running=3)
    store.stop_worker("w3", T0 + 100)

    alive = {w.id: w for w in store.list_workers(alive_since=T0 + 50)}
    assert set(alive) == {"w1"}
    assert alive["w1"].last_heartbeat == T0 + 100 and alive["w1"].running == 3
    assert {w.id for w in store.list_workers(alive_since=T0)} == {"w1", "w2"}

    stopped = {w.id: w for w in store.list_workers()}["w3"]
    assert stopped.status == "stopped" and stopped.stopped_at == T0 + 100
    assert kinds(store.events()) == [
        "worker.started",
        "worker.started",
        "worker.started",
        "worker.stopped",
    ]


# ----------------------------------------------------------------------------- events


def test_events_are_ordered_and_filtered(store: Store) -> None:
    r1 = submit(store, T0, items=["a"])
    r2 = submit(store, T0 + 1, items=["b"])
    tasks = claim(store, n=10, now=T0 + 2)
    succeed(store, "w1", tasks, T0 + 3)

    every = store.events()
    ids = [e.id for e in every]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.ts for e in every] == sorted(e.ts for e in every)

    mine = store.events(request_id=r1)
    assert kinds(mine) == [
        "request.submitted",
        "request.running",
        "task.running",
        "task.succeeded",
        "request.succeeded",
    ] or kinds(mine) == [
        "request.submitted",
        "task.running",
        "request.running",
        "task.succeeded",
        "request.succeeded",
    ]
    assert {e.request_id for e in mine} == {r1}
    assert all(e.pipeline == "p" for e in mine)

    cut = mine[1].id
    later = store.events(after_id=cut, request_id=r1)
    assert [e.id for e in later] == [e.id for e in mine if e.id > cut]
    assert [e.id for e in store.events(after_id=cut)] == [i for i in ids if i > cut]
    assert [e.id for e in store.events(limit=2)] == ids[:2]
    assert store.events(request_id=r2)[0].kind == "request.submitted"
    assert store.events(after_id=ids[-1]) == []


def test_queue_pause_and_resume_are_recorded(store: Store) -> None:
    store.pause("urgent", T0)
    store.resume("urgent", T0 + 1)
    got = [(e.kind, e.queue) for e in store.events()]
    assert got == [("queue.paused", "urgent"), ("queue.resumed", "urgent")]


# -------------------------------------------------------------------------- open_store


def test_open_store_takes_sqlite_urls(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.db"
    s = open_store(f"sqlite:///{path}")
    try:
        assert isinstance(s, SQLiteStore) and s.dialect == "sqlite"
        s.upgrade()
        s.ping()
        assert s.list_requests(RequestFilter()) == []
    finally:
        s.close()
    assert path.exists()


def test_open_store_takes_libpq_style_postgresql_urls(pg_url: str) -> None:
    url = sa.engine.make_url(pg_url)
    libpq = f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}"
    first = open_store(libpq)
    second = open_store(pg_url)
    try:
        assert isinstance(first, PostgresStore) and first.dialect == "postgresql"
        first.ping()
        rid = submit(first)
        got = second.get_request(rid)
        assert got is not None and got.pipeline == "p"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("url", ["mysql://u@h/db", "mongodb://h:27017/x", "oracle+cx://h"])
def test_open_store_rejects_unknown_schemes(url: str) -> None:
    scheme = url.split(":", 1)[0]
    with pytest.raises(StoreError, match=re.escape(f"unsupported database URL scheme '{scheme}'")):
        open_store(url)
