"""The HTTP API's pure parts: tokens and roles, the legacy status names, cursors, times,
selectors, log tails, text patterns, the access log's redaction, the event hub's
ordering, and the views held to the documented models."""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor.api.legacy import legacy_status
from conveyor.api.middleware import redacted_query
from conveyor.api.models import Event as EventModel
from conveyor.api.models import Pipeline as PipelineModel
from conveyor.api.models import Request as RequestModel
from conveyor.api.models import Submit
from conveyor.api.problems import Problem, problem_body
from conveyor.api.routes_events import SELECTORS, parse_selectors, sse_event
from conveyor.api.routes_requests import decode_cursor, encode_cursor, parse_time
from conveyor.api.routes_tasks import attempt_may_come, attempt_over
from conveyor.api.stream import EventHub
from conveyor.app import check_json
from conveyor.events import Event
from conveyor.logs import tail_offset
from conveyor.pipelines import ParamsError, Pipeline
from conveyor.requests import Request, RequestStatus, TaskCounts
from conveyor.store.sqlbase import params_pattern
from conveyor.tasks import Progress, Task, TaskStatus
from conveyor.tokens import (
    Role,
    Token,
    TokenNameError,
    check_name,
    hash_secret,
    may_manage,
    needs_touch,
    new_token,
    plausible,
)
from conveyor.views import event_view, pipeline_view, request_view


# ------------------------------------------------------------------------- tokens
def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.SUBMIT) and Role.ADMIN.allows(Role.READ)
    assert Role.SUBMIT.allows(Role.READ) and not Role.SUBMIT.allows(Role.ADMIN)
    assert not Role.READ.allows(Role.SUBMIT)


def test_a_new_token_is_random_and_only_its_hash_and_prefix_are_kept() -> None:
    stored, secret = new_token("etl", Role.SUBMIT)
    other, secret2 = new_token("etl", Role.SUBMIT)
    assert secret != secret2 and secret.startswith("cvy_") and len(secret) == 47
    assert plausible(secret)
    assert stored.token_hash == hash_secret(secret) != secret
    assert len(stored.token_hash) == 64
    assert stored.prefix == secret[:10] and secret.startswith(stored.prefix)
    assert (stored.name, stored.role) == ("etl", Role.SUBMIT)
    assert other.token_hash != stored.token_hash


@pytest.mark.parametrize(
    "secret", ["", "cvy_", "cvy_short", "abc_" + "x" * 40, "cvy_" + "é" * 40, "cvy_" + "x" * 200]
)
def test_implausible_tokens_are_not_looked_up(secret: str) -> None:
    assert not plausible(secret)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "ü"])
def test_token_names_are_plain(name: str) -> None:
    with pytest.raises(TokenNameError):
        check_name(name)


def test_who_may_change_a_request() -> None:
    assert may_manage(Role.SUBMIT, "ann", "ann")
    assert not may_manage(Role.SUBMIT, "ann", "bob")
    assert not may_manage(Role.SUBMIT, "ann", None)
    assert not may_manage(Role.READ, "ann", "ann")
    assert may_manage(Role.ADMIN, "root", "bob")


def test_last_use_is_written_at_most_once_a_minute() -> None:
    t = Token(1, "a", Role.READ, "cvy_abcdef", 0.0)
    assert needs_touch(t, 100.0)
    used = Token(1, "a", Role.READ, "cvy_abcdef", 0.0, last_used_at=100.0)
    assert not needs_touch(used, 159.0) and needs_touch(used, 160.0)


# ------------------------------------------------------------------------- legacy
def test_legacy_status_names() -> None:
    assert legacy_status(RequestStatus.REQUESTED) == "REQUESTED"
    assert legacy_status(RequestStatus.RUNNING) == "QUEUED"
    assert legacy_status(RequestStatus.SUCCEEDED) == "REQ_SUCCESS"
    assert legacy_status(RequestStatus.FAILED) == "REQ_FAILED"
    assert legacy_status(RequestStatus.CANCELLED) == "REQ_FAILED"
    assert legacy_status(None) == "REQ_NOT_FOUND"


# ---------------------------------------------------------------- query parameters
@pytest.mark.parametrize("last", [1, 42, 2**40, 2**63 - 1])
def test_cursors_round_trip(last: int) -> None:
    cursor = encode_cursor(last)
    assert len(cursor) == 11 and cursor.replace("-", "").replace("_", "").isalnum()
    assert decode_cursor(cursor) == last


@pytest.mark.parametrize("bad", ["", "abc", "a" * 12, "!!!!!!!!!!!"])
def test_other_strings_are_not_cursors(bad: str) -> None:
    with pytest.raises(Problem) as err:
        decode_cursor(bad)
    assert err.value.errors == [("query.cursor", "not a cursor this API gave out")]


def test_times_are_epoch_seconds_or_iso() -> None:
    assert parse_time(None, "t") is None
    assert parse_time("1700000000.5", "t") == 1700000000.5
    assert parse_time("1e300", "t") == 1e300
    assert parse_time("1970-01-02T00:00:00Z", "t") == 86400
    assert parse_time("1970-01-02t00:00:00z", "t") == 86400
    assert parse_time("1970-01-02T01:00:00+01:00", "t") == 86400
    assert parse_time("1970-01-02", "t") == 86400  # naive: UTC
    assert parse_time("0001-01-01T00:00:00+01:00", "t") == pytest.approx(-62135600400)
    for bad in ("yesterday", "nan", "inf", "", "2026-13-01"):
        with pytest.raises(Problem):
            parse_time(bad, "t")


def test_selectors() -> None:
    assert parse_selectors(None) == []
    assert parse_selectors("pipeline.spotbot.*, request.42") == ["pipeline.spotbot.*", "request.42"]
    assert parse_selectors(" , ") == []
    with pytest.raises(Problem):
        parse_selectors("request..x")
    pattern = re.compile(SELECTORS)
    for good in ("", "a", "pipeline.spotbot.*", "request.42,task.7", " a , b.c "):
        assert pattern.match(good), good
    for bad in ("a..b", ".a", "a.", "a,,b", "a\x00"):
        assert not pattern.match(bad), bad


def test_an_event_on_the_wire() -> None:
    e = Event(7, 1.5, "task.succeeded", 3, 9, "spotbot", "default", {"msg": "a\nb"})
    assert sse_event(e) == (
        b"id: 7\nevent: task.succeeded\n"
        b'data: {"id":7,"ts":1.5,"kind":"task.succeeded","request_id":3,"task_id":9,'
        b'"pipeline":"spotbot","queue":"default","data":{"msg":"a\\nb"}}\n\n'
    )


# -------------------------------------------------------------------------- logs
@pytest.mark.parametrize(
    ("text", "n", "tail"),
    [
        ("a\nb\nc\n", 2, "b\nc\n"),
        ("a\nb\nc", 2, "b\nc"),
        ("a\nb\nc\n", 0, ""),
        ("a\nb\nc\n", 9, "a\nb\nc\n"),
        ("", 3, ""),
        ("\n\n\n", 2, "\n\n"),
        ("x" * 200_000 + "\nlast\n", 1, "last\n"),
        ("line\n" * 30_000, 20_000, "line\n" * 20_000),
    ],
)
def test_tail_offset(tmp_path: Path, text: str, n: int, tail: str) -> None:
    path = tmp_path / "log"
    path.write_text(text)
    assert text[tail_offset(path, n) :] == tail


def _task(status: TaskStatus, attempts: int) -> Task:
    return Task(1, 1, "p", "q", 0, 0, {}, status, attempts, 3, None, 0.0, 0.0)


def test_when_an_attempt_is_over() -> None:
    running = _task(TaskStatus.RUNNING, 2)
    assert not attempt_over(running, 2) and attempt_over(running, 1)
    assert attempt_over(_task(TaskStatus.QUEUED, 2), 2)  # failed, waiting for a retry
    assert attempt_over(_task(TaskStatus.SUCCEEDED, 2), 2)
    assert attempt_may_come(_task(TaskStatus.QUEUED, 0), None)
    assert attempt_may_come(_task(TaskStatus.QUEUED, 1), 2)
    assert not attempt_may_come(_task(TaskStatus.FAILED, 3), None)


# ---------------------------------------------------------------------- storage
def test_params_patterns_escape_like_and_match_the_stored_json() -> None:
    assert params_pattern("A146B#11") == "%a146b#11%"
    assert params_pattern("100%_!") == "%100!%!_!!%"
    assert params_pattern('say "hi"') == '%say \\"hi\\"%'
    assert params_pattern("Müller") == "%m\\u00fcller%"


def test_params_must_be_json() -> None:
    check_json({"a": [1, 2.5, "x", None, True]})
    with pytest.raises(ParamsError) as err:
        check_json({"a": [1, math.nan]})
    assert err.value.path == "$.a[1]"
    with pytest.raises(ParamsError) as err:
        check_json({"b": {"c": "\ud800"}})
    assert err.value.path == "$.b.c"
    # inside an object or array any integer is kept as written; a bare one is a number
    check_json({"n": [2**64, -(2**63) - 1], "deep": [[[]]], "pair": (1, 2)})
    check_json(2**63 - 1)
    for bad, path, said in [
        (2**63, "$", "beyond 64 bits"),
        (-(2**63) - 1, "$", "beyond 64 bits"),
        ({"deep": deep(250)}, "$.deep" + "[0]" * 199, "deeper than 200"),
        ({"s": "[" * 300}, None, None),  # brackets in a string are no nesting
        ({"wide": [{"k": [1]} for _ in range(500)]}, None, None),
        # nor do they hide nesting: strings opening and closing at each level
        ({"x": deep_hidden(201)}, "$.x" + "[1]" * 199, "deeper than 200"),
        ({"x": deep_hidden(199)}, None, None),
        # objects and arrays in turn are levels each
        ({"x": deep_mixed(201)}, "$.x" + ".a[0]" * 99 + ".a", "deeper than 200"),
        ({"x": deep_mixed(199)}, None, None),
        ({"when": {1, 2}}, "$.when", "a set is not a JSON value"),
    ]:
        if path is None:
            check_json(bad)
            continue
        with pytest.raises(ParamsError) as err:
            check_json(bad)
        assert (err.value.path, said in str(err.value)) == (path, True), err.value


def deep_hidden(levels: int) -> list[object]:
    value: list[object] = []
    for _ in range(levels - 1):
        value = ['x]\\"', value, "\\\\["]
    return value


def deep_mixed(levels: int) -> object:
    value: object = []
    for n in range(levels - 1):
        value = {"a": value} if n % 2 else [value]
    return value


def deep(levels: int) -> list[object]:
    value: list[object] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_the_access_log_hides_tokens() -> None:
    assert redacted_query(b"") == ""
    assert redacted_query(b"a=1&b=2") == "a=1&b=2"
    assert redacted_query(b"context=SUBMIT&token=cvy_secret") == "context=SUBMIT&token=***"


def test_problem_documents() -> None:
    body = problem_body(422, "bad", "validation", [("$.a", "no")])
    assert body == {
        "type": "urn:conveyor:problem:validation",
        "title": "Unprocessable Entity",
        "status": 422,
        "detail": "bad",
        "errors": [{"path": "$.a", "message": "no"}],
    }
    assert problem_body(413, "big")["type"] == "urn:conveyor:problem:request-entity-too-large"


# --------------------------------------------------------------- views and models
def test_the_views_are_the_documented_models() -> None:
    task = Task(
        5, 2, "p", "q", 0, 0, {"x": 1}, TaskStatus.RUNNING, 1, 3, 60.0, 1.0, 1.0, 2.0,
        lease_owner="w", progress=Progress(3, 10, "going"),
    )  # fmt: skip
    req = Request(
        2, "p", {"x": 1}, "q", 0, RequestStatus.RUNNING, TaskCounts(1), 1.0, tasks=(task,)
    )
    assert RequestModel.model_validate(request_view(req)).tasks[0].worker == "w"
    event = Event(1, 1.0, "request.submitted", 2, None, "p", "q", {"tasks": 1})
    assert EventModel.model_validate(event_view(event)).data == {"tasks": 1}
    pipeline = Pipeline("p", "command", ("x",), schema={"type": "object"}, cache=60.0)
    assert PipelineModel.model_validate(pipeline_view(pipeline)).params_schema == {"type": "object"}
    assert Submit.model_validate({"pipeline": "p", "params": None}).cache.read is True


# --------------------------------------------------------------------- event hub
class _FakeApp:
    """An application object whose store holds a list of events, some of them not
    committed yet (invisible)."""

    def __init__(self) -> None:
        self.visible: list[Event] = []

    def latest_event_id(self) -> int:
        return 0

    def events(self, after_id: int = 0, request_id: int | None = None, limit: int = 1000) -> Any:
        return [e for e in sorted(self.visible, key=lambda e: e.id) if e.id > after_id][:limit]


def _ev(i: int) -> Event:
    return Event(i, float(i), "k")


def test_the_hub_hands_out_events_in_id_order_waiting_out_gaps() -> None:
    app = _FakeApp()
    hub = EventHub(app, gap_grace=0.2)  # type: ignore[arg-type]
    hub._follow()
    app.visible = [_ev(1), _ev(2), _ev(4)]  # 3 is still being committed
    hub._follow()
    assert [e.id for e in hub.read(0)[0]] == [1, 2] and hub.released == 2
    app.visible.append(_ev(3))  # it commits
    hub._follow()
    assert [e.id for e in hub.read(0)[0]] == [1, 2, 3, 4]
    app.visible += [_ev(6)]  # 5 was rolled back: given up after the grace
    hub._follow()
    assert hub.released == 4
    time.sleep(0.25)
    hub._follow()
    assert hub.released == 6
    assert [e.id for e in hub.read(4)[0]] == [6]


def test_the_hub_forgets_old_events_and_says_so() -> None:
    app = _FakeApp()
    hub = EventHub(app, keep=3)  # type: ignore[arg-type]
    app.visible = [_ev(i) for i in range(1, 6)]
    hub._follow()
    assert hub.read(0) == ([], False)  # ask the store
    assert [e.id for e in hub.read(2)[0]] == [3, 4, 5]
    events, covered = hub.read(5)
    assert events == [] and covered


def test_closing_the_hub_stops_its_thread() -> None:
    app = _FakeApp()
    hub = EventHub(app, poll=0.01)  # type: ignore[arg-type]

    class _Store:
        def listener(self) -> Any:
            class L:
                def wait(self, timeout: float) -> bool:
                    time.sleep(timeout)
                    return False

                def close(self) -> None:
                    pass

            return L()

    app.store = _Store()  # type: ignore[attr-defined]
    hub.start()
    app.visible = [_ev(1)]
    deadline = time.monotonic() + 2
    while hub.released < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    hub.close()
    names = [t.name for t in threading.enumerate()]
    deadline = time.monotonic() + 2
    while "conveyor-events" in names and time.monotonic() < deadline:
        time.sleep(0.01)
        names = [t.name for t in threading.enumerate()]
    assert "conveyor-events" not in names


# ------------------------------------------------------------------------ config
def _config(data: dict[str, Any]) -> Any:
    from conveyor.config import parse_config

    pipelines = {"spotbot": {"executor": "python", "handler": "a.b:c"}}
    return parse_config({"pipelines": pipelines, **data}, Path("."), {})


def test_api_and_legacy_settings() -> None:
    default = _config({})
    assert (default.api.read_open, default.api.max_body) == (False, 1_048_576)
    assert (default.legacy.pipeline, default.legacy.require_token) == ("spotbot", False)
    cfg = _config({"api": {"read_open": True, "max_body": 4096}, "legacy": {"require_token": True}})
    assert cfg.api.read_open and cfg.api.max_body == 4096 and cfg.legacy.require_token


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"api": {"max_body": 10}}, "api.max_body"),
        ({"api": {"open": True}}, "api.open"),
        ({"legacy": {"pipeline": "nope"}}, "legacy.pipeline: no pipeline 'nope'"),
        ({"legacy": {"token": "x"}}, "legacy.token"),
    ],
)
def test_bad_api_settings_are_named(data: dict[str, Any], message: str) -> None:
    from conveyor.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(data)


def test_without_a_spotbot_pipeline_the_default_legacy_setting_is_fine() -> None:
    from conveyor.config import parse_config

    cfg = parse_config({"pipelines": {}}, Path("."), {})
    assert cfg.legacy.pipeline == "spotbot"  # the endpoint answers 404 until there is one
