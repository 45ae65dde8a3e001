"""A worker holds short tasks claimed ahead of its free slots, never long ones, and hands
back those it has not started as soon as it stops or their request is cancelled."""

from __future__ import annotations

import time
from typing import Any

import pytest
from worker_support import start, wait_for

from conveyor.app import Conveyor
from conveyor.tasks import TaskStatus
from conveyor.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(60)

SLEEPS = """
[pipelines.nap]
executor = "command"
command = ["sleep", "{seconds}"]
split = "items"
"""


def nap(app: Conveyor, n: int, seconds: float) -> int:
    return app.submit("nap", {"items": [{"seconds": seconds}] * n}).request.id


def statuses(app: Conveyor, request_id: int) -> list[tuple[TaskStatus, int]]:
    return [(t.status, t.attempts) for t in app.get(request_id).tasks]


def held_ahead(app: Conveyor, lease: float | None = None) -> Worker:
    # Whatever the attempts take, two are held ahead of the one slot.
    opts = WorkerOptions(
        concurrency=1, ahead=2, ahead_wait=3600, lease=lease, poll_interval=0.05, grace=10
    )
    return Worker(app, opts)


def test_long_tasks_are_not_claimed_ahead(make_app: Any) -> None:
    app = make_app(SLEEPS)
    rid = nap(app, 3, 0.4)
    worker = Worker(app, WorkerOptions(concurrency=1, burst=True, poll_interval=0.05))
    thread, _ = start(worker)
    # A 0.4 s task held ahead would wait for the slot, claimed, while another worker
    # could run it: two tasks would be seen running together for about 0.4 s. (For a few
    # milliseconds they may be: a slot is free once an attempt ends, before the finisher
    # has written its outcome.)
    together_since: float | None = None
    longest = 0.0
    while thread.is_alive():
        running = sum(1 for s, _ in statuses(app, rid) if s == TaskStatus.RUNNING)
        now = time.monotonic()
        if running > 1:
            together_since = together_since or now
            longest = max(longest, now - together_since)
        else:
            together_since = None
        time.sleep(0.02)
    thread.join()
    assert longest < 0.2
    assert statuses(app, rid) == [(TaskStatus.SUCCEEDED, 1)] * 3


def test_a_stopping_worker_hands_back_at_once_what_it_has_not_started(make_app: Any) -> None:
    app = make_app(SLEEPS)
    rid = nap(app, 5, 0.5)
    worker = held_ahead(app)
    thread, stats = start(worker)
    # the first task timed, the next one runs with two more held (or, on a slow
    # machine seen a task later, the one after it)
    wait_for(lambda: [s for s, _ in statuses(app, rid)].count(TaskStatus.RUNNING) == 3)
    stopped = time.monotonic()
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    # only the started task was waited for: the two held would take 1 s more
    assert time.monotonic() - stopped < 1.5
    assert stats[0].released == 2
    tasks = statuses(app, rid)
    done = tasks.count((TaskStatus.SUCCEEDED, 1))
    # the held ones back in the queue, no attempt counted
    assert done in (2, 3) and tasks.count((TaskStatus.QUEUED, 0)) == 5 - done


def test_tasks_held_ahead_of_a_cancelled_request_never_start(make_app: Any) -> None:
    app = make_app(SLEEPS)
    rid = nap(app, 5, 1.5)
    worker = held_ahead(app, lease=1.5)  # the heartbeat notices the cancel within 0.5 s
    thread, _ = start(worker)
    try:
        wait_for(lambda: [s for s, _ in statuses(app, rid)].count(TaskStatus.RUNNING) == 3)
        app.cancel(rid)
        wait_for(lambda: not worker._running)
    finally:
        worker.stop(hard=True)
        thread.join(10)
    req = app.get(rid)
    assert req.status.value == "cancelled"
    logged = [t for t in req.tasks if app.task_logs(t.id)[1]]
    assert len(logged) == 2  # the one done and the one cancelled while it ran
