"""Group commit: submissions that arrive together are stored in one transaction, and
each still gets its own answer. On SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import itertools
from concurrent.futures import Future

import pytest
from store_helpers import T0, new_request

from conveyor.group_commit import Closed, SubmitBatcher
from conveyor.requests import NewRequest
from conveyor.store import Conflict, Store, Submitted


def _burst(store: Store, news: list[NewRequest]) -> list[Future[Submitted]]:
    # Every commit reads the clock once: a request's created_at tells its transaction.
    ticks = itertools.count()
    batcher = SubmitBatcher(store, lambda: T0 + next(ticks))
    try:
        # Queued faster than one commit takes, so all but the first few share batches.
        futures = [batcher.submit(n) for n in news]
        for f in futures:
            f.exception(timeout=30)
    finally:
        batcher.close()
    return futures


def test_a_burst_is_stored_in_batches_and_every_submit_gets_its_own_request(
    store: Store,
) -> None:
    news = [new_request("p", [f"r{i}-a", f"r{i}-b"], submitter=f"s{i}") for i in range(60)]
    futures = _burst(store, news)

    answers = [f.result() for f in futures]
    assert all(a.created for a in answers)
    assert len({a.request.id for a in answers}) == 60
    for i, a in enumerate(answers):
        # each answer is its own submission's, with its tasks, as a single submit's is
        assert a.request.submitter == f"s{i}"
        assert [t.params["item"] for t in a.request.tasks] == [f"r{i}-a", f"r{i}-b"]
        stored = store.get_request(a.request.id)
        assert stored is not None and stored.counts.total == 2
    transactions = {a.request.created_at for a in answers}
    assert len(transactions) < 30, "submits queued together should share commits"


def test_one_bad_submit_does_not_fail_the_others_in_its_batch(store: Store) -> None:
    first = store.submit(new_request("p", ["x"], idempotency_key="k1"), T0)
    news = [new_request("p", [f"ok{i}"]) for i in range(20)]
    # same key, other params: a conflict; and the same new key twice in one burst
    news.insert(5, new_request("p", ["other"], idempotency_key="k1"))
    news.insert(10, new_request("p", ["twice"], idempotency_key="k2"))
    news.insert(15, new_request("p", ["twice"], idempotency_key="k2"))
    futures = _burst(store, news)

    assert isinstance(futures[5].exception(), Conflict)
    k2 = [futures[10].result(), futures[15].result()]
    assert sorted(s.created for s in k2) == [False, True]
    assert k2[0].request.id == k2[1].request.id
    others = [f.result() for i, f in enumerate(futures) if i not in (5, 10, 15)]
    assert all(s.created for s in others) and len(others) == 20
    assert store.get_request(first.request.id) is not None


def test_a_closed_batcher_refuses_new_submits(store: Store) -> None:
    batcher = SubmitBatcher(store, lambda: T0)
    done = batcher.submit(new_request("p", ["a"])).result(timeout=30)
    batcher.close()
    assert done.created
    with pytest.raises(Closed):
        batcher.submit(new_request("p", ["b"]))
