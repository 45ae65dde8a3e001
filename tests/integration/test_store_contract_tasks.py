"""Store contract, task side: claiming (queue order, priority, pauses, concurrency
limits), finishing, heartbeats, lease expiry and progress.

Every test runs on SQLite and on PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import pytest
from store_helpers import LEASE, T0, claim, kinds, submit, succeed, task_events

from conveyor.queues import ALL_QUEUES
from conveyor.requests import RequestStatus
from conveyor.store import Store
from conveyor.tasks import Outcome, Progress, RetryPolicy, TaskAction, TaskStatus

# ------------------------------------------------------------------------------ claim


def test_the_workers_queue_order_is_the_priority(store: Store) -> None:
    old_default = submit(store, T0, queue="default", items=["d1", "d2"])
    urgent = submit(store, T0 + 10, queue="urgent", items=["u1", "u2"])

    first = claim(store, queues=["urgent", "default"], n=1, now=T0 + 20)
    assert [t.request_id for t in first] == [urgent]
    # an urgent task arriving later is still taken before the older default one:
    # the order is checked again at every claim
    late_urgent = submit(store, T0 + 21, queue="urgent", items=["u3"])
    second = claim(store, queues=["urgent", "default"], n=2, now=T0 + 22)
    assert sorted(t.request_id for t in second) == [urgent, late_urgent]

    third = claim(store, queues=["urgent", "default"], n=5, now=T0 + 23)
    assert [t.request_id for t in third] == [old_default, old_default]

    # a worker that lists default first takes default first
    submit(store, T0 + 30, queue="urgent", items=["u4"])
    d = submit(store, T0 + 31, queue="default", items=["d3"])
    assert [t.request_id for t in claim(store, queues=["default", "urgent"], n=1, now=T0 + 32)] == [
        d
    ]


def test_a_batch_spans_queues_in_order(store: Store) -> None:
    submit(store, T0, queue="default", items=["d1", "d2", "d3"])
    submit(store, T0 + 1, queue="urgent", items=["u1", "u2"])
    got = claim(store, queues=["urgent", "default"], n=4, now=T0 + 2)
    assert sorted(t.queue for t in got) == ["default", "default", "urgent", "urgent"]
    assert sorted(t.params["item"] for t in got if t.queue == "default") == ["d1", "d2"]
    assert claim(store, queues=["urgent"], n=4, now=T0 + 3) == []


def test_within_a_queue_higher_priority_first_then_fifo(store: Store) -> None:
    low = submit(store, T0, items=["l1", "l2"], priority=0)
    high = submit(store, T0 + 1, items=["h1", "h2"], priority=5)
    mid = submit(store, T0 + 2, items=["m1"], priority=2)

    order = [claim(store, n=1, now=T0 + 10 + i)[0] for i in range(5)]
    assert [t.params["item"] for t in order] == ["h1", "h2", "m1", "l1", "l2"]
    assert [t.request_id for t in order] == [high, high, mid, low, low]

    submit(store, T0 + 20, items=["x1", "x2", "x3"], priority=1)
    submit(store, T0 + 21, items=["y1", "y2"], priority=3)
    batch = claim(store, n=3, now=T0 + 30)
    assert sorted(t.params["item"] for t in batch) == ["x1", "y1", "y2"]


def test_n_limits_the_batch(store: Store) -> None:
    submit(store, items=[str(i) for i in range(7)])
    assert len(claim(store, n=3, now=T0 + 1)) == 3
    assert len(claim(store, n=3, now=T0 + 1)) == 3
    assert len(claim(store, n=3, now=T0 + 1)) == 1
    assert claim(store, n=3, now=T0 + 1) == []
    assert claim(store, n=0, now=T0 + 1) == []
    assert store.claim("w1", [], 5, LEASE, T0 + 1) == []


def test_tasks_not_yet_available_are_not_claimed(store: Store) -> None:
    submit(store, T0 + 100, items=["later"])
    assert claim(store, now=T0 + 99) == []
    assert len(claim(store, now=T0 + 100)) == 1


def test_a_claim_leases_the_task_and_starts_the_request(store: Store) -> None:
    rid = submit(store, items=["a", "b"], max_attempts=3)
    got = claim(store, "w-7", n=1, now=T0 + 5, lease=60)

    assert len(got) == 1
    task = got[0]
    assert task.status == TaskStatus.RUNNING
    assert task.attempts == 1 and task.max_attempts == 3
    assert task.lease_owner == "w-7" and task.lease_expires_at == T0 + 65
    assert task.started_at == T0 + 5
    assert task.params == {"items": "a", "item": "a"}
    stored = store.get_task(task.id)
    assert stored is not None
    assert (stored.status, stored.attempts, stored.lease_owner, stored.lease_expires_at) == (
        TaskStatus.RUNNING,
        1,
        "w-7",
        T0 + 65,
    )

    req = store.get_request(rid)
    assert req is not None
    assert req.status == RequestStatus.RUNNING and req.started_at == T0 + 5
    ev = store.events(request_id=rid)
    assert sorted(kinds(ev)) == ["request.running", "request.submitted", "task.running"]
    running = next(e for e in ev if e.kind == "task.running")
    assert running.task_id == task.id and running.data["worker"] == "w-7"
    assert running.data["attempt"] == 1

    # the second task's claim does not start the request again
    claim(store, "w-8", n=1, now=T0 + 6)
    assert kinds(store.events(request_id=rid)).count("request.running") == 1
    assert store.count_tasks(status="running") == 2


# ------------------------------------------------------------------------ pause/resume


def test_a_paused_queue_is_not_claimed_and_resume_restores_it(store: Store) -> None:
    submit(store, queue="urgent", items=["u1", "u2"])
    submit(store, queue="default", items=["d1"])
    store.pause("urgent", T0)
    assert store.paused_queues() == {"urgent"}

    got = claim(store, queues=["urgent", "default"], n=5, now=T0 + 1)
    assert [t.queue for t in got] == ["default"]
    assert claim(store, queues=["urgent"], now=T0 + 1) == []

    store.resume("urgent", T0 + 2)
    assert store.paused_queues() == set()
    assert len(claim(store, queues=["urgent"], now=T0 + 3)) == 2


def test_pausing_everything_stops_every_claim(store: Store) -> None:
    submit(store, queue="urgent", items=["u1"])
    submit(store, queue="default", items=["d1"])
    store.pause(ALL_QUEUES, T0)

    assert claim(store, queues=["urgent", "default"], now=T0 + 1) == []
    assert claim(store, queues=["default"], now=T0 + 1) == []

    store.resume(ALL_QUEUES, T0 + 2)
    assert len(claim(store, queues=["urgent", "default"], now=T0 + 3)) == 2


def test_queue_stats_reports_counts_and_pauses(store: Store) -> None:
    submit(store, queue="default", items=["a", "b", "c", "d"])
    submit(store, queue="urgent", items=["u"])
    a, b, _ = claim(store, queues=["default"], n=3, now=T0 + 1)
    store.finish(
        "w1",
        [Outcome(a.id, TaskAction.SUCCEED), Outcome(b.id, TaskAction.FAIL, error="x")],
        T0 + 2,
    )
    store.pause("urgent", T0 + 3)

    stats = {q.name: q for q in store.queue_stats()}
    d = stats["default"]
    assert (d.queued, d.running, d.succeeded, d.failed, d.cancelled, d.paused) == (
        1,
        1,
        1,
        1,
        0,
        False,
    )
    u = stats["urgent"]
    assert (u.queued, u.running, u.paused) == (1, 0, True)

    store.pause("idle", T0 + 4)  # a paused queue with no tasks is still reported
    store.pause(ALL_QUEUES, T0 + 4)
    stats = {q.name: q for q in store.queue_stats()}
    assert ALL_QUEUES not in stats
    assert stats["idle"].paused and stats["idle"].queued == 0
    assert all(q.paused for q in stats.values())

    store.resume(ALL_QUEUES, T0 + 5)
    store.resume("urgent", T0 + 5)
    stats = {q.name: q for q in store.queue_stats()}
    assert not stats["default"].paused and not stats["urgent"].paused


# ----------------------------------------------------------------- concurrency limits


def test_a_pipeline_limit_holds_across_workers_and_claims(store: Store) -> None:
    submit(store, pipeline="p", items=[f"p{i}" for i in range(6)])
    submit(store, T0 + 1, pipeline="q", items=[f"q{i}" for i in range(3)])
    limits = {"p": 2}

    got: list = []
    for i, worker in enumerate(["w1", "w2", "w3", "w4"]):
        got += claim(store, worker, n=2, now=T0 + 10 + i, limits=limits)
        assert store.count_tasks(pipeline="p", status="running") <= 2
    assert sorted(t.pipeline for t in got) == ["p", "p", "q", "q", "q"]
    assert claim(store, "w5", n=5, now=T0 + 20, limits=limits) == []

    p_task = next(t for t in got if t.pipeline == "p")
    succeed(store, p_task.lease_owner, [p_task], T0 + 21)
    more = claim(store, "w6", n=5, now=T0 + 22, limits=limits)
    assert [t.pipeline for t in more] == ["p"]
    assert store.count_tasks(pipeline="p", status="running") == 2


def test_a_pipeline_limit_holds_across_queues_in_one_claim(store: Store) -> None:
    # A request may be sent to another queue than its pipeline's default: the limit is
    # the pipeline's, whichever queues its tasks wait in.
    submit(store, pipeline="p", queue="urgent", items=["u1", "u2", "u3"])
    submit(store, pipeline="p", queue="default", items=["d1", "d2", "d3"])

    got = claim(store, queues=["urgent", "default"], n=10, now=T0 + 1, limits={"p": 2})

    assert len(got) == 2
    assert store.count_tasks(pipeline="p", status="running") == 2


def test_a_limit_of_a_pipeline_with_running_tasks_counts_them(store: Store) -> None:
    submit(store, pipeline="p", items=["a", "b", "c"])
    claim(store, "w1", n=2, now=T0 + 1)  # claimed without limits
    assert claim(store, "w2", n=5, now=T0 + 2, limits={"p": 2}) == []
    assert len(claim(store, "w2", n=5, now=T0 + 2, limits={"p": 3})) == 1


# ----------------------------------------------------------------------------- finish


def test_succeed_records_the_result_and_finishes_the_request(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, b = claim(store, "w1", n=2, now=T0 + 1)

    assert store.finish(
        "w1", [Outcome(a.id, TaskAction.SUCCEED, result={"n": [1, 2]})], T0 + 2
    ) == [a.id]
    half = store.get_request(rid)
    assert half is not None
    assert half.status == RequestStatus.RUNNING and half.finished_at is None
    assert half.counts.succeeded == 1

    assert store.finish("w1", [Outcome(b.id, TaskAction.SUCCEED, result="ok")], T0 + 3) == [b.id]
    done = store.get_request(rid)
    assert done is not None
    assert done.status == RequestStatus.SUCCEEDED and done.finished_at == T0 + 3
    assert (done.counts.total, done.counts.succeeded, done.counts.failed) == (2, 2, 0)
    ta, tb = done.tasks
    assert ta.status == TaskStatus.SUCCEEDED and ta.result == {"n": [1, 2]}
    assert ta.finished_at == T0 + 2 and ta.lease_expires_at is None
    assert tb.result == "ok"
    ev = kinds(store.events(request_id=rid))
    assert ev.count("task.succeeded") == 2 and ev[-1] == "request.succeeded"


def test_a_failed_task_fails_the_request_once_all_are_done(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, b = claim(store, "w1", n=2, now=T0 + 1)

    assert store.finish("w1", [Outcome(a.id, TaskAction.FAIL, error="exit 3")], T0 + 2) == [a.id]
    mid = store.get_request(rid)
    assert mid is not None and mid.status == RequestStatus.RUNNING
    assert mid.counts.failed == 1

    succeed(store, "w1", [b], T0 + 3)
    done = store.get_request(rid)
    assert done is not None
    assert done.status == RequestStatus.FAILED and done.finished_at == T0 + 3
    assert (done.counts.succeeded, done.counts.failed) == (1, 1)
    failed = store.get_task(a.id)
    assert failed is not None
    assert failed.status == TaskStatus.FAILED and failed.error == "exit 3"
    assert failed.finished_at == T0 + 2
    assert kinds(store.events(request_id=rid))[-1] == "request.failed"


def test_retry_requeues_after_the_delay_keeping_the_attempt(store: Store) -> None:
    rid = submit(store, items=["a"], max_attempts=3)
    (task,) = claim(store, "w1", now=T0 + 1)

    assert store.finish(
        "w1", [Outcome(task.id, TaskAction.RETRY, error="flaky", delay=30)], T0 + 2
    ) == [task.id]
    got = store.get_task(task.id)
    assert got is not None
    assert got.status == TaskStatus.QUEUED
    assert got.attempts == 1 and got.available_at == T0 + 32
    assert got.error == "flaky" and got.finished_at is None
    req = store.get_request(rid)
    assert req is not None and req.status == RequestStatus.RUNNING
    (ev,) = task_events(store, task.id, "task.retrying")
    assert ev.data["delay"] == 30

    assert claim(store, "w2", now=T0 + 31) == []
    (again,) = claim(store, "w2", now=T0 + 32)
    assert again.id == task.id and again.attempts == 2 and again.lease_owner == "w2"


def test_release_requeues_without_counting_the_attempt(store: Store) -> None:
    rid = submit(store, items=["a"], max_attempts=1)
    (task,) = claim(store, "w1", now=T0 + 1)

    assert store.finish("w1", [Outcome(task.id, TaskAction.RELEASE)], T0 + 2) == [task.id]
    got = store.get_task(task.id)
    assert got is not None
    assert got.status == TaskStatus.QUEUED and got.attempts == 0
    assert got.available_at == T0 + 2
    req = store.get_request(rid)
    assert req is not None and req.status == RequestStatus.RUNNING
    assert req.counts.finished == 0
    assert len(task_events(store, task.id, "task.released")) == 1

    (again,) = claim(store, "w2", now=T0 + 3)
    assert again.attempts == 1


def test_only_the_lease_owner_can_finish_a_running_task(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, _ = claim(store, "w1", n=2, now=T0 + 1)

    assert store.finish("intruder", [Outcome(a.id, TaskAction.SUCCEED)], T0 + 2) == []
    got = store.get_task(a.id)
    assert got is not None and got.status == TaskStatus.RUNNING and got.lease_owner == "w1"

    # in a batch, the owner's outcomes apply and the others are left out
    applied = store.finish(
        "w1",
        [Outcome(a.id, TaskAction.SUCCEED), Outcome(999_999, TaskAction.SUCCEED)],
        T0 + 3,
    )
    assert applied == [a.id]
    req = store.get_request(rid)
    assert req is not None and req.counts.succeeded == 1
    assert task_events(store, a.id, "task.succeeded")[0].ts == T0 + 3
    assert len(task_events(store, a.id, "task.succeeded")) == 1


def test_a_task_is_never_recorded_succeeded_twice(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, _ = claim(store, "w1", n=2, now=T0 + 1)

    assert succeed(store, "w1", [a], T0 + 2) == [a.id]
    assert succeed(store, "w1", [a], T0 + 3) == []
    assert store.finish("w1", [Outcome(a.id, TaskAction.FAIL, error="late")], T0 + 4) == []
    assert store.finish("w1", [Outcome(a.id, TaskAction.RETRY, delay=1)], T0 + 4) == []

    got = store.get_task(a.id)
    assert got is not None
    assert got.status == TaskStatus.SUCCEEDED and got.finished_at == T0 + 2 and got.error is None
    req = store.get_request(rid)
    assert req is not None
    assert req.counts.succeeded == 1 and req.counts.failed == 0
    assert req.status == RequestStatus.RUNNING
    assert len(task_events(store, a.id, "task.succeeded")) == 1


def test_one_task_reported_twice_in_one_batch_is_recorded_once(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, _ = claim(store, "w1", n=2, now=T0 + 1)

    applied = store.finish(
        "w1", [Outcome(a.id, TaskAction.SUCCEED), Outcome(a.id, TaskAction.SUCCEED)], T0 + 2
    )

    assert applied == [a.id]
    req = store.get_request(rid)
    assert req is not None and req.counts.succeeded == 1
    assert len(task_events(store, a.id, "task.succeeded")) == 1


def test_a_cancelled_task_cannot_be_finished(store: Store) -> None:
    rid = submit(store, items=["a"])
    (task,) = claim(store, "w1", now=T0 + 1)
    store.cancel_request(rid, T0 + 2)

    for action in (TaskAction.SUCCEED, TaskAction.FAIL, TaskAction.RETRY, TaskAction.RELEASE):
        assert store.finish("w1", [Outcome(task.id, action)], T0 + 3) == []
    got = store.get_task(task.id)
    assert got is not None and got.status == TaskStatus.CANCELLED
    req = store.get_request(rid)
    assert req is not None and req.status == RequestStatus.CANCELLED
    assert (req.counts.succeeded, req.counts.failed, req.counts.cancelled) == (0, 0, 1)
    assert claim(store, now=T0 + 4) == []


def test_a_queued_task_cannot_be_finished(store: Store) -> None:
    submit(store, items=["a"])
    (task,) = claim(store, "w1", now=T0 + 1)
    store.finish("w1", [Outcome(task.id, TaskAction.RELEASE)], T0 + 2)

    assert succeed(store, "w1", [task], T0 + 3) == []
    got = store.get_task(task.id)
    assert got is not None and got.status == TaskStatus.QUEUED


# ----------------------------------------------------------------------- quiet logs


def test_a_quiet_attempts_log_is_kept_with_its_outcome(store: Store) -> None:
    submit(store, items=["a", "b"])
    a, b = claim(store, "w1", n=2, now=T0 + 1)
    quiet = "$ true\nexit code 0\n"
    store.finish(
        "w1",
        [
            Outcome(a.id, TaskAction.SUCCEED, attempt=1, log=quiet),
            Outcome(b.id, TaskAction.RETRY, error="exit code 1", attempt=1, log="$ x\x00\n"),
        ],
        T0 + 2,
    )
    assert store.attempt_logs(a.id) == {1: quiet}
    assert store.attempt_logs(b.id) == {1: "$ x\ufffd\n"}  # NUL kept as on every text
    (again,) = claim(store, "w1", n=1, now=T0 + 10)
    assert again.id == b.id and again.attempts == 2
    store.finish("w1", [Outcome(b.id, TaskAction.SUCCEED, log="$ x\nexit code 0\n")], T0 + 11)
    assert store.attempt_logs(b.id) == {1: "$ x\ufffd\n", 2: "$ x\nexit code 0\n"}
    assert store.attempt_logs(a.id + b.id + 100) == {}


def test_a_quiet_log_of_an_attempt_run_again_is_added_to(store: Store) -> None:
    submit(store, items=["a"])
    (task,) = claim(store, "w1", now=T0 + 1)
    store.finish("w1", [Outcome(task.id, TaskAction.RELEASE, attempt=1, log="first\n")], T0 + 2)
    (task,) = claim(store, "w1", now=T0 + 3)
    assert task.attempts == 1  # a released attempt's number comes again
    store.finish("w1", [Outcome(task.id, TaskAction.SUCCEED, attempt=1, log="then\n")], T0 + 4)
    assert store.attempt_logs(task.id) == {1: "first\nthen\n"}


def test_an_outcome_written_again_keeps_its_quiet_log_once(store: Store) -> None:
    """A worker writes an outcome again when the answer to its first write was lost:
    the log, stamped when it was taken, is not added twice."""
    submit(store, items=["a"])
    (task,) = claim(store, "w1", now=T0 + 1)
    quiet = "$ true\nexit code 0\n"
    outcome = Outcome(task.id, TaskAction.SUCCEED, attempt=1, log=quiet, logged_at=T0 + 2)
    assert store.finish("w1", [outcome], T0 + 2) == [task.id]
    assert store.finish("w1", [outcome], T0 + 3) == []  # not applied again
    assert store.attempt_logs(task.id) == {1: quiet}


def test_a_quiet_log_is_kept_even_when_its_outcome_no_longer_applies(store: Store) -> None:
    """The attempt ran: its log stays, though the task was cancelled meanwhile. A log
    of a task that is gone is dropped without an error."""
    rid = submit(store, items=["a"])
    (task,) = claim(store, "w1", now=T0 + 1)
    store.cancel_request(rid, T0 + 2)
    late = Outcome(task.id, TaskAction.SUCCEED, attempt=1, log="$ true\nexit code 0\n")
    assert store.finish("w1", [late], T0 + 3) == []
    assert store.attempt_logs(task.id) == {1: "$ true\nexit code 0\n"}
    gone = Outcome(task.id + 1000, TaskAction.SUCCEED, attempt=1, log="x\n")
    assert store.finish("w1", [gone], T0 + 4) == []
    assert store.attempt_logs(task.id + 1000) == {}


# -------------------------------------------------------------------------- heartbeat


def test_heartbeat_extends_the_workers_leases(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    other = submit(store, items=["c"])
    a, b = claim(store, "w1", n=2, now=T0 + 1, lease=10)
    (c,) = claim(store, "w2", n=1, now=T0 + 1, lease=10)
    assert c.request_id == other

    assert store.heartbeat("w1", 10, T0 + 8, running=2) == {a.id, b.id}
    for t in (a, b):
        got = store.get_task(t.id)
        assert got is not None and got.lease_expires_at == T0 + 18
    got_c = store.get_task(c.id)
    assert got_c is not None and got_c.lease_expires_at == T0 + 11  # w2's is not touched

    succeed(store, "w1", [a], T0 + 9)
    assert store.heartbeat("w1", 10, T0 + 10, running=1) == {b.id}
    store.cancel_request(rid, T0 + 11)
    assert store.heartbeat("w1", 10, T0 + 12, running=1) == set()
    assert store.heartbeat("nobody", 10, T0 + 12, running=0) == set()


def test_heartbeat_renews_only_the_tasks_the_worker_still_holds(store: Store) -> None:
    submit(store, items=["a", "b", "c"], max_attempts=2)
    a, b, c = claim(store, "w1", n=3, now=T0, lease=10)
    assert store.heartbeat("w1", 10, T0 + 8, running=1, held=[a.id, c.id, 999]) == {a.id, c.id}
    got = store.get_task(b.id)
    assert got is not None and got.lease_expires_at == T0 + 10  # left to expire
    assert store.heartbeat("w1", 10, T0 + 9, running=0, held=[]) == set()
    assert store.expire_leases(T0 + 11, {}) == [b.id]


# ---------------------------------------------------------------------- lease expiry

RETRY_SLOWLY = {"p": RetryPolicy(retries=5, backoff_base=10.0, jitter=0.0)}


def test_an_expired_lease_requeues_the_task_with_a_backoff(store: Store) -> None:
    rid = submit(store, items=["a"], max_attempts=3)
    (task,) = claim(store, "w1", now=T0, lease=10)

    assert store.expire_leases(T0 + 5, RETRY_SLOWLY) == []  # not yet
    assert store.expire_leases(T0 + 11, RETRY_SLOWLY) == [task.id]

    got = store.get_task(task.id)
    assert got is not None
    assert got.status == TaskStatus.QUEUED and got.attempts == 1
    assert got.available_at == T0 + 21  # back-off of 10 s after the first attempt
    assert "lease expired" in (got.error or "")
    (ev,) = task_events(store, task.id, "task.lease_expired")
    assert ev.data["worker"] == "w1" and ev.request_id == rid
    req = store.get_request(rid)
    assert req is not None and req.status == RequestStatus.RUNNING

    # the worker that lost it cannot finish it, nor keep it alive
    assert succeed(store, "w1", [task], T0 + 12) == []
    assert store.heartbeat("w1", 10, T0 + 12, running=1) == set()
    got = store.get_task(task.id)
    assert got is not None and got.status == TaskStatus.QUEUED

    assert claim(store, "w2", now=T0 + 20) == []
    (again,) = claim(store, "w2", now=T0 + 21)
    assert again.attempts == 2 and again.lease_owner == "w2"
    assert succeed(store, "w1", [again], T0 + 22) == []  # still not the old owner's
    assert succeed(store, "w2", [again], T0 + 22) == [task.id]
    done = store.get_request(rid)
    assert done is not None and done.status == RequestStatus.SUCCEEDED


def test_an_earlier_attempts_outcome_is_not_recorded_on_the_task_claimed_again(
    store: Store,
) -> None:
    # The same worker lost its lease (its heartbeats failed) and claimed the task again
    # before it noticed: what the first attempt reports must not settle the second.
    rid = submit(store, items=["a"], max_attempts=2)
    (first,) = claim(store, "w1", now=T0, lease=10)
    assert store.expire_leases(T0 + 11, {"p": RetryPolicy(retries=1, backoff_base=0)}) == [first.id]
    (second,) = claim(store, "w1", now=T0 + 12)
    assert second.id == first.id and (first.attempts, second.attempts) == (1, 2)

    for action in (TaskAction.RETRY, TaskAction.FAIL, TaskAction.SUCCEED, TaskAction.RELEASE):
        stale = Outcome(first.id, action, error="attempt 1", attempt=first.attempts)
        assert store.finish("w1", [stale], T0 + 13) == []
    got = store.get_task(first.id)
    assert got is not None and got.status == TaskStatus.RUNNING and got.attempts == 2
    assert task_events(store, first.id, "task.failed") == []
    assert claim(store, "w1", now=T0 + 14) == []  # no third attempt beyond the two allowed
    # nor does the first attempt's progress land on the second
    assert not store.report_progress("w1", first.id, Progress(9, 9, "old"), T0 + 14, attempt=1)
    assert store.report_progress("w1", first.id, Progress(1, 9, "new"), T0 + 14, attempt=2)
    got = store.get_task(first.id)
    assert got is not None and got.progress.message == "new"

    current = Outcome(second.id, TaskAction.SUCCEED, result={"n": 2}, attempt=second.attempts)
    assert store.finish("w1", [current], T0 + 15) == [second.id]
    got = store.get_task(second.id)
    assert got is not None and got.status == TaskStatus.SUCCEEDED and got.result == {"n": 2}
    req = store.get_request(rid)
    assert req is not None and req.status == RequestStatus.SUCCEEDED
    assert (req.counts.succeeded, req.counts.failed) == (1, 0)


def test_an_expired_lease_with_no_attempts_left_fails_the_task(store: Store) -> None:
    rid = submit(store, items=["a"], max_attempts=1)
    (task,) = claim(store, "w1", now=T0, lease=10)

    assert store.expire_leases(T0 + 11, RETRY_SLOWLY) == [task.id]

    got = store.get_task(task.id)
    assert got is not None
    assert got.status == TaskStatus.FAILED and got.attempts == 1
    assert got.finished_at == T0 + 11
    req = store.get_request(rid)
    assert req is not None
    assert req.status == RequestStatus.FAILED and req.counts.failed == 1
    assert len(task_events(store, task.id, "task.lease_expired")) == 1
    assert succeed(store, "w1", [task], T0 + 12) == []


def test_a_renewed_lease_does_not_expire(store: Store) -> None:
    submit(store, items=["a"], max_attempts=2)
    (task,) = claim(store, "w1", now=T0, lease=10)
    assert store.heartbeat("w1", 10, T0 + 8, running=1) == {task.id}  # now until T0 + 18

    assert store.expire_leases(T0 + 15, {}) == []
    got = store.get_task(task.id)
    assert got is not None
    assert got.status == TaskStatus.RUNNING and got.lease_expires_at == T0 + 18
    assert task_events(store, task.id, "task.lease_expired") == []
    assert succeed(store, "w1", [task], T0 + 16) == [task.id]
    assert store.expire_leases(T0 + 100, {}) == []


def test_expiry_leaves_other_workers_tasks_alone(store: Store) -> None:
    submit(store, items=["a", "b"], max_attempts=2)
    (dead,) = claim(store, "w-dead", n=1, now=T0, lease=10)
    (alive,) = claim(store, "w-alive", n=1, now=T0, lease=10)
    store.heartbeat("w-alive", 10, T0 + 9, running=1)

    assert store.expire_leases(T0 + 12, {}) == [dead.id]
    got = store.get_task(alive.id)
    assert got is not None and got.status == TaskStatus.RUNNING
    assert succeed(store, "w-alive", [alive], T0 + 13) == [alive.id]


# -------------------------------------------------------------------------- progress


def test_text_with_a_nul_is_kept_with_a_replacement_character(store: Store) -> None:
    # PostgreSQL's text holds no NUL; both stores keep the same text.
    submit(store, items=["a"])
    (task,) = claim(store, "w1")
    assert store.report_progress("w1", task.id, Progress(1, 2, "x\x00y"), T0 + 1)
    failed = Outcome(task.id, TaskAction.FAIL, error="a\x00b", attempt=task.attempts)
    assert store.finish("w1", [failed], T0 + 2) == [task.id]
    got = store.get_task(task.id)
    assert got is not None and got.status == TaskStatus.FAILED
    assert (got.error, got.progress.message) == ("a\ufffdb", "x\ufffdy")
    (ev,) = task_events(store, task.id, "task.failed")
    assert ev.data["error"] == "a\ufffdb"


def test_a_result_json_cannot_hold_is_refused_and_nothing_is_written(store: Store) -> None:
    submit(store, items=["a"])
    (task,) = claim(store, "w1")
    for bad in (float("nan"), float("inf")):
        outcome = Outcome(task.id, TaskAction.SUCCEED, result={"x": bad}, attempt=1)
        with pytest.raises(ValueError, match="JSON compliant"):
            store.finish("w1", [outcome], T0 + 1)
    got = store.get_task(task.id)
    assert got is not None and got.status == TaskStatus.RUNNING


def test_only_the_lease_owner_reports_progress(store: Store) -> None:
    rid = submit(store, items=["a", "b"])
    a, b = claim(store, "w1", n=2, now=T0 + 1)

    assert store.report_progress("w1", a.id, Progress(3, 10, "reading"), T0 + 2)
    got = store.get_task(a.id)
    assert got is not None
    assert got.progress == Progress(3, 10, "reading") and got.progress.fraction == 0.3

    assert not store.report_progress("w2", a.id, Progress(9, 10, "hijack"), T0 + 3)
    got = store.get_task(a.id)
    assert got is not None and got.progress.message == "reading"

    succeed(store, "w1", [a], T0 + 4)
    assert not store.report_progress("w1", a.id, Progress(10, 10, "late"), T0 + 5)
    store.cancel_request(rid, T0 + 6)
    assert not store.report_progress("w1", b.id, Progress(1, 2), T0 + 7)
    assert not store.report_progress("w1", 999_999, Progress(1, 2), T0 + 7)


def test_progress_is_reset_when_the_task_is_claimed_again(store: Store) -> None:
    submit(store, items=["a"], max_attempts=2)
    (task,) = claim(store, "w1", now=T0)
    store.report_progress("w1", task.id, Progress(5, 10, "half"), T0 + 1)
    store.finish("w1", [Outcome(task.id, TaskAction.RETRY, delay=0)], T0 + 2)

    (again,) = claim(store, "w2", now=T0 + 3)
    assert again.progress == Progress(0, None, None)


@pytest.mark.parametrize("action", [TaskAction.FAIL, TaskAction.SUCCEED])
def test_request_counts_follow_every_outcome(store: Store, action: TaskAction) -> None:
    rid = submit(store, items=[str(i) for i in range(5)], max_attempts=2)
    tasks = claim(store, "w1", n=5, now=T0 + 1)
    store.finish(
        "w1",
        [Outcome(tasks[0].id, TaskAction.RETRY, delay=0), Outcome(tasks[1].id, TaskAction.RELEASE)],
        T0 + 2,
    )
    store.finish("w1", [Outcome(t.id, action, error="e") for t in tasks[2:]], T0 + 3)

    req = store.get_request(rid)
    assert req is not None
    done = 3
    assert req.counts.succeeded == (done if action == TaskAction.SUCCEED else 0)
    assert req.counts.failed == (done if action == TaskAction.FAIL else 0)
    assert req.status == RequestStatus.RUNNING
    rest = claim(store, "w2", n=5, now=T0 + 4)
    assert len(rest) == 2
    store.finish("w2", [Outcome(t.id, TaskAction.SUCCEED) for t in rest], T0 + 5)
    req = store.get_request(rid)
    assert req is not None
    assert req.counts.finished == 5
    expected = RequestStatus.SUCCEEDED if action == TaskAction.SUCCEED else RequestStatus.FAILED
    assert req.status == expected


# ------------------------------------------------------------- pipeline configuration


def test_the_pipelines_limits_and_retry_policy_apply(make_app) -> None:
    app = make_app(
        """
        [pipelines.p]
        executor = "python"
        handler = "conveyor.examples.handlers:noop"
        split = "items"
        retries = 1
        backoff = 10
        concurrency = 1

        [pipelines.q]
        executor = "python"
        handler = "conveyor.examples.handlers:noop"
        split = "items"
        """
    )
    store = app.store
    p = app.submit("p", {"items": ["a", "b", "c"]}).request.id
    q = app.submit("q", {"items": ["x", "y"]}).request.id
    now = app.clock() + 1

    got = store.claim("w1", ["default"], 10, 5, now, limits=app.concurrency_limits)
    assert sorted(t.request_id for t in got) == [p, q, q]
    assert store.claim("w2", ["default"], 10, 5, now, limits=app.concurrency_limits) == []
    (task,) = [t for t in got if t.request_id == p]
    assert task.max_attempts == 2

    # the lease runs out: the pipeline's back-off (10 s, +/- 25 %) applies
    assert task.id in store.expire_leases(now + 6, app.retry_policies)
    lost = store.get_task(task.id)
    assert lost is not None and lost.status == TaskStatus.QUEUED
    assert now + 6 + 7.5 <= lost.available_at <= now + 6 + 12.5

    # with the limit's slot free again, the next p task is claimable at once
    (nxt,) = store.claim("w3", ["default"], 10, 5, now + 7, limits=app.concurrency_limits)
    assert nxt.request_id == p and nxt.id != task.id
