"""How many tasks a worker claims, and how many it holds ahead of its free slots."""

from __future__ import annotations

from conveyor.worker import claim_ahead, claim_threshold, claim_wanted


def test_nothing_is_claimed_ahead_before_attempts_have_been_timed() -> None:
    assert claim_ahead(None, concurrency=8, most=8, wait=0.05) == 0


def test_short_attempts_are_claimed_ahead_up_to_the_limit() -> None:
    # 8 slots each starting a 5 ms attempt: 80 would start within 50 ms
    assert claim_ahead(0.005, concurrency=8, most=8, wait=0.05) == 8
    # 100 ms attempts: 4 start within 50 ms
    assert claim_ahead(0.1, concurrency=8, most=8, wait=0.05) == 4


def test_long_attempts_are_never_claimed_ahead() -> None:
    # one would wait a second for a slot while another worker might run it
    assert claim_ahead(1.0, concurrency=8, most=8, wait=0.05) == 0
    assert claim_ahead(0.0001, concurrency=8, most=0, wait=0.05) == 0


def test_idle_slots_are_filled_at_once() -> None:
    assert claim_wanted(held=0, concurrency=8, ahead=0) == 8
    assert claim_wanted(held=7, concurrency=8, ahead=0) == 1
    assert claim_wanted(held=7, concurrency=8, ahead=8) == 9


def test_tasks_held_ahead_are_topped_up_once_half_are_gone() -> None:
    assert claim_wanted(held=16, concurrency=8, ahead=8) == 0
    assert claim_wanted(held=13, concurrency=8, ahead=8) == 0  # 5 of 8 still waiting
    assert claim_wanted(held=12, concurrency=8, ahead=8) == 4
    assert claim_wanted(held=9, concurrency=8, ahead=8) == 7


def test_a_worker_holding_more_than_it_may_claims_nothing() -> None:
    # e.g. the limit fell as attempts got longer
    assert claim_wanted(held=12, concurrency=8, ahead=0) == 0


def test_runners_wake_the_claiming_loop_exactly_when_a_claim_is_due() -> None:
    for concurrency in (1, 2, 8, 64):
        for ahead in (0, 1, 2, 7, 16, 64):
            below = claim_threshold(concurrency, ahead)
            for held in range(0, concurrency + ahead + 2):
                assert (claim_wanted(held, concurrency, ahead) > 0) == (held <= below), (
                    concurrency,
                    ahead,
                    held,
                )
