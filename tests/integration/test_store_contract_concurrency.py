"""Store contract under concurrency: several workers (threads, each with a store and a
worker id of its own) claiming and finishing at once on one database.

On SQLite this exercises BEGIN IMMEDIATE; on PostgreSQL FOR UPDATE SKIP LOCKED and the
lock that serialises concurrency-limited claims."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from store_helpers import LEASE, T0, new_request

from conveyor.requests import RequestStatus
from conveyor.store import Store, open_store
from conveyor.tasks import Outcome, Task, TaskAction, TaskStatus

THREADS = 4


def run_threads(n: int, body: Callable[[int], None], timeout: float = 60) -> None:
    """Run body(i) in n threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            barrier.wait()
            body(i)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def test_concurrent_workers_claim_every_task_exactly_once(store: Store, db_url: str) -> None:
    requests = [
        store.submit(new_request("p", [f"r{r}-{i}" for i in range(100)]), T0).request.id
        for r in range(4)
    ]
    claimed: list[list[int]] = [[] for _ in range(THREADS)]
    finished: list[list[int]] = [[] for _ in range(THREADS)]
    stores = [open_store(db_url) for _ in range(THREADS)]

    def work(i: int) -> None:
        s, worker = stores[i], f"w{i}"
        idle = 0
        while idle < 3:
            tasks = s.claim(worker, ["default"], 7, LEASE, T0 + 1)
            if not tasks:
                idle += 1
                continue
            idle = 0
            assert all(t.lease_owner == worker and t.attempts == 1 for t in tasks)
            claimed[i] += [t.id for t in tasks]
            finished[i] += s.finish(
                worker, [Outcome(t.id, TaskAction.SUCCEED, result=t.id) for t in tasks], T0 + 2
            )

    try:
        run_threads(THREADS, work)
    finally:
        for s in stores:
            s.close()

    every_claim = [tid for ids in claimed for tid in ids]
    every_finish = [tid for ids in finished for tid in ids]
    duplicates = [tid for tid, n in Counter(every_claim).items() if n > 1]
    assert duplicates == []
    assert len(every_claim) == 400
    assert sorted(every_finish) == sorted(every_claim)

    assert store.count_tasks(status=TaskStatus.SUCCEEDED.value) == 400
    for rid in requests:
        req = store.get_request(rid)
        assert req is not None
        assert req.status == RequestStatus.SUCCEEDED
        assert (req.counts.total, req.counts.succeeded, req.counts.failed) == (100, 100, 0)
        assert all(t.attempts == 1 and t.result == t.id for t in req.tasks)
        ev = [e.kind for e in store.events(request_id=rid, limit=10_000)]
        assert ev.count("task.running") == 100
        assert ev.count("task.succeeded") == 100
        assert ev.count("request.running") == 1
        assert ev.count("request.succeeded") == 1


def test_concurrent_claims_respect_a_pipeline_limit(store: Store, db_url: str) -> None:
    store.submit(new_request("p", [f"p{i}" for i in range(50)]), T0)
    store.submit(new_request("q", [f"q{i}" for i in range(200)]), T0)
    limits = {"p": 2}
    workers, claims_each = 8, 6
    stores = [open_store(db_url) for _ in range(workers)]
    got: list[list[Task]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        for _ in range(claims_each):
            got[i] += stores[i].claim(f"w{i}", ["default"], 2, LEASE, T0 + 1, limits=limits)

    try:
        run_threads(workers, work)
    finally:
        for s in stores:
            s.close()

    p_claimed = [t.id for tasks in got for t in tasks if t.pipeline == "p"]
    q_claimed = [t.id for tasks in got for t in tasks if t.pipeline == "q"]
    running_p = store.count_tasks(pipeline="p", status="running")
    assert running_p == len(p_claimed)
    assert running_p == 2, f"{running_p} tasks of p running with a limit of 2"
    # the unlimited pipeline is still served
    assert len(q_claimed) == store.count_tasks(pipeline="q", status="running") > 0
