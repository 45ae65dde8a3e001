"""Event selectors: dotted names, `*` for one segment, a selector matches everything below it."""

from __future__ import annotations

import pytest

from conveyor.events import Event, event_matches, selector_matches


def ev(kind="task.succeeded", request_id=42, task_id=7, pipeline="spotbot", queue="default"):
    return Event(
        id=1,
        ts=0.0,
        kind=kind,
        request_id=request_id,
        task_id=task_id,
        pipeline=pipeline,
        queue=queue,
    )


@pytest.mark.parametrize(
    ("selector", "topic", "expected"),
    [
        ("request.42", "request.42", True),
        ("request.42", "request.42.task.succeeded", True),
        ("request.42", "request.4", False),
        ("request.4", "request.42.task.succeeded", False),
        ("request.42", "request.420.task.succeeded", False),
        ("request.42.task", "request.42", False),
        ("pipeline.spotbot.*", "pipeline.spotbot.task.succeeded", True),
        ("pipeline.spotbot.*", "pipeline.spotbot2.task.succeeded", False),
        ("task.*", "task.failed", True),
        ("*.failed", "task.failed", True),
        ("*.failed", "task.succeeded", False),
        ("*.*.task", "request.42.task.failed", True),
        ("*", "anything", True),
        ("task", "task.succeeded", True),
        ("task", "tasks.succeeded", False),
        ("queue.urgent", "queue.urgentish.task.queued", False),
    ],
)
def test_selector_matches(selector, topic, expected):
    assert selector_matches(selector, topic) is expected


def test_event_topics():
    assert ev().topics() == [
        "task.succeeded",
        "pipeline.spotbot.task.succeeded",
        "queue.default.task.succeeded",
        "request.42.task.succeeded",
        "task.7.task.succeeded",
    ]
    bare = Event(id=1, ts=0.0, kind="queue.paused", queue="dev")
    assert bare.topics() == ["queue.paused", "queue.dev.queue.paused"]


def test_request_selector_matches_every_event_of_that_request():
    for kind in ("request.running", "task.queued", "task.succeeded", "request.succeeded"):
        assert event_matches("request.42", ev(kind=kind))
    assert not event_matches("request.42", ev(request_id=43))
    assert not event_matches("request.4", ev(request_id=42))


def test_request_zero_is_a_request():
    assert event_matches("request.0", ev(request_id=0, task_id=None))


def test_pipeline_selector():
    assert event_matches("pipeline.spotbot.*", ev())
    assert event_matches("pipeline.spotbot", ev())
    assert event_matches("pipeline.spotbot.task.succeeded", ev())
    assert not event_matches("pipeline.spotbot.task.failed", ev())
    assert not event_matches("pipeline.spotbot.*", ev(pipeline="noop"))
    assert not event_matches("pipeline.spotbot.*", ev(pipeline=None))


def test_kind_selectors():
    assert event_matches("task.succeeded", ev())
    assert event_matches("task.*", ev())
    assert event_matches("task", ev())
    assert not event_matches("request.*", ev(request_id=None, kind="task.succeeded"))


def test_task_and_queue_selectors():
    assert event_matches("task.7", ev())
    assert not event_matches("task.8", ev())
    assert event_matches("queue.default.*", ev())
    assert not event_matches("queue.urgent", ev())


def test_empty_and_star_select_everything():
    for selector in ("", "*"):
        assert event_matches(selector, ev())
        assert event_matches(selector, Event(id=2, ts=1.0, kind="worker.started"))


def test_a_longer_selector_than_any_topic_matches_nothing():
    assert not event_matches("request.42.task.succeeded.extra.more", ev())
