"""Artifact keys and templates, output globs, and the notification decisions: pure parts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conveyor.artifacts import (
    Artifact,
    ArtifactError,
    ArtifactKind,
    latest_outputs,
    local_store_path,
    open_artifact_store,
)
from conveyor.artifacts.keys import ArtifactKeyError, check_key, check_template, render_key
from conveyor.config import ConfigError, parse_config
from conveyor.events import Event
from conveyor.notifications import NotifySettings, completion, plan, sign, verify
from conveyor.outputs import collect_outputs
from conveyor.store.outbox import settled_prefix

NOON = 1_795_000_000.0  # 2026-11-18 UTC


def test_the_default_template_renders_date_pipeline_ids_and_name() -> None:
    key = render_key(
        "{date}/{pipeline}/{request_id}/{task_id}/{attempt}/{name}",
        pipeline="spiders",
        request_id=7,
        task_id=42,
        attempt=2,
        name="out/ranks.csv",
        created_at=NOON,
    )
    assert key == "2026-11-18/spiders/7/42/2/out/ranks.csv"


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{date}/{bogus}/{name}", "{bogus}"),
        ("{date}/{task_id}", "{name}"),
        ("/abs/{task_id}/{name}", "absolute"),
        ("../{task_id}/{name}", "'..'"),
        ("{name:>10}", "format"),
        ("{name", "key template"),
        # two tasks' outputs of one name would share a key
        ("{date}/{pipeline}/{name}", "{task_id}, set apart"),
        ("{request_id}{task_id}/{name}", "{task_id}, set apart"),
        ("{task_id}{name}", "{task_id}, set apart"),
        ("r1{task_id}/{name}", "{task_id}, set apart"),
        # pipeline a_2 task 7, and pipeline a task 2 with an output 7_x
        ("{pipeline}_{task_id}_{name}", "{task_id}, set apart"),
        ("{name}/{task_id}", "{task_id}, set apart"),
    ],
)
def test_bad_templates_are_refused_naming_the_problem(template: str, named: str) -> None:
    with pytest.raises(ArtifactKeyError, match=named.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)


@pytest.mark.parametrize(
    "template",
    [
        "{date}/{pipeline}/{request_id}/{task_id}/{name}",
        "{request_id}-{task_id}/{name}",
        "{pipeline}/{task_id}-{attempt}/{name}",
        "{task_id}_{name}",
        "{date}-{request_id}-{task_id}/{name}",
    ],
)
def test_templates_that_keep_each_tasks_keys_apart_are_accepted(template: str) -> None:
    check_template(template)


def test_an_unknown_template_field_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"artifacts\.key: .*unknown field \{tenant\}"):
        parse_config({"artifacts": {"key": "{tenant}/{name}"}}, Path("/srv"), {})


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "a/../../b", "a//b", "./a", "a/.", "a\\b", "a\x00b", "a\nb", "x" * 2000],
)
def test_hostile_keys_are_refused(key: str) -> None:
    with pytest.raises(ArtifactKeyError):
        check_key(key)


def test_a_key_made_from_a_hostile_name_is_refused() -> None:
    with pytest.raises(ArtifactKeyError):
        render_key(
            "{pipeline}/{name}",
            pipeline="p",
            request_id=1,
            task_id=1,
            attempt=1,
            name="../../etc/passwd",
            created_at=NOON,
        )


@pytest.mark.parametrize("glob", ["/etc/*", "../*.csv", "out/../../x", "C:/data/*", ""])
def test_output_globs_must_stay_in_the_work_dir(glob: str) -> None:
    data = {"pipelines": {"p": {"executor": "python", "handler": "m:f", "outputs": [glob]}}}
    with pytest.raises(ConfigError, match=r"pipelines\.p\.outputs"):
        parse_config(data, Path("/srv"), {})


def test_the_store_defaults_to_a_directory_beside_the_logs_and_s3_is_taken() -> None:
    cfg = parse_config({}, Path("/srv/conf"), {})
    assert cfg.artifact_settings.url == "/srv/conf/artifacts/objects"
    cfg = parse_config(
        {"artifacts": {"url": "s3://b/p", "endpoint_url": "http://127.0.0.1:9000"}},
        Path("/srv"),
        {},
    )
    assert cfg.artifact_settings.url == "s3://b/p"
    with pytest.raises(ConfigError, match=r"artifacts\.url"):
        parse_config({"artifacts": {"url": "ftp://x/y"}}, Path("/srv"), {})


def test_collect_outputs_matches_globs_once_and_skips_links_out(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out" / "deep").mkdir(parents=True)
    (work / "a.csv").write_text("a")
    (work / "out" / "deep" / "r.db").write_text("db")
    (work / "out" / "notes.txt").write_text("n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, work / "leak.csv")
    found = collect_outputs(work, ["*.csv", "out/**/*.db", "*.csv"], limit=100)
    assert [name for name, _ in found.files] == ["a.csv", "out/deep/r.db"]
    assert found.skipped == ["leak.csv: leads outside the work dir"]
    limited = collect_outputs(work, ["**/*"], limit=1)
    assert len(limited.files) == 1 and "more files than the limit" in limited.skipped[-1]


def _artifact(attempt: int, kind: ArtifactKind, name: str) -> Artifact:
    return Artifact(1, 1, attempt, kind, name, f"k/{attempt}/{name}", "u", 1, "s", 0.0)


def test_a_task_shows_its_latest_outputs_and_every_log() -> None:
    rows = [
        _artifact(1, ArtifactKind.OUTPUT, "old.csv"),
        _artifact(1, ArtifactKind.LOG, "attempt-1.log"),
        _artifact(2, ArtifactKind.OUTPUT, "a.csv"),
        _artifact(2, ArtifactKind.LOG, "attempt-2.log"),
    ]
    shown = [(a.attempt, a.name) for a in latest_outputs(rows)]
    assert shown == [(2, "a.csv"), (1, "attempt-1.log"), (2, "attempt-2.log")]


def _event(i: int, kind: str, pipeline: str = "p", data: object = None, ts: float = 0) -> Event:
    return Event(i, ts, kind, request_id=1, task_id=2, pipeline=pipeline, data=data)


def test_completions_are_the_terminal_task_and_request_events() -> None:
    assert completion(_event(1, "task.succeeded")) == ("task", "succeeded")
    assert completion(_event(1, "request.cancelled")) == ("request", "cancelled")
    assert completion(_event(1, "task.lease_expired", data={"then": "fail"})) == (
        "task",
        "failed",
    )
    for kind in ("task.running", "task.retrying", "request.running", "notification.sent"):
        assert completion(_event(1, kind)) is None
    assert completion(_event(1, "task.lease_expired", data={"then": "retry"})) is None


def test_plan_follows_each_pipelines_settings() -> None:
    settings = {
        "p": NotifySettings(webhook="http://h/x"),
        "q": NotifySettings(webhook="http://h/y", on=frozenset({"request"})),
    }
    events = [
        _event(1, "task.succeeded", "p"),
        _event(2, "task.failed", "q"),  # q wants requests only
        _event(3, "request.failed", "q"),
        _event(4, "task.succeeded", "other"),  # no notify configured
        _event(5, "task.running", "p"),
    ]
    made = plan(events, settings, now=5.0)
    assert [(n.event_id, n.subject, n.status, n.url) for n in made] == [
        (1, "task", "succeeded", "http://h/x"),
        (3, "request", "failed", "http://h/y"),
    ]
    assert made[0].max_attempts == settings["p"].retry.max_attempts


def test_signatures_are_hmac_sha256_of_the_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    header = sign(body, "s3cret")
    assert header == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert verify(body, "s3cret", header)
    assert not verify(body + b" ", "s3cret", header)
    assert not verify(body, "other", header)


def test_the_outbox_waits_at_a_young_gap_in_event_ids_only() -> None:
    now = 100.0
    events = [_event(11, "a", ts=99), _event(12, "b", ts=99), _event(14, "c", ts=99.5)]
    assert [e.id for e in settled_prefix(events, 10, now, settle=5)] == [11, 12]
    # once the gap is older than `settle`, it was a rollback: go past it
    assert [e.id for e in settled_prefix(events, 10, now + 10, settle=5)] == [11, 12, 14]
    assert settled_prefix([_event(12, "b", ts=99)], 10, now, settle=5) == []


# file: URLs of a local store -----------------------------------------------------------
@pytest.mark.parametrize(
    "prefix", ["file://", "file://localhost", "file://LocalHost", "file:", "FILE://"]
)
def test_a_file_url_of_this_host_stores_where_its_path_says(tmp_path: Path, prefix: str) -> None:
    folder = tmp_path / "my objects"
    url = prefix + folder.as_uri().removeprefix("file://")  # "my%20objects"
    assert "%20" in url
    store = open_artifact_store(url)
    try:
        store.put_bytes("a/b.txt", b"kept\n")
        assert (folder / "a" / "b.txt").read_bytes() == b"kept\n"
        assert store.url("a/b.txt") == (folder / "a" / "b.txt").as_uri()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("file://otherhost/srv/objects", "names the host 'otherhost'"),
        ("file://nas.example:445/share", "names the host 'nas.example:445'"),
        ("file://", "absolute path"),
        ("file:objects", "absolute path"),
        ("file:///srv/objects?mode=ro", "takes no ? or #"),
        ("file:///srv/objects#top", "takes no ? or #"),
        ("file:///srv/ob%00jects", "NUL"),
    ],
)
def test_a_file_url_that_is_not_a_folder_of_this_host_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, says: str
) -> None:
    monkeypatch.chdir(tmp_path)  # read as a path, such a URL would land in here
    with pytest.raises(ArtifactError, match=re.escape(says)):
        local_store_path(url)
    with pytest.raises(ArtifactError, match=re.escape(says)):
        open_artifact_store(url)
    with pytest.raises(ConfigError, match=r"^artifacts\.url: .*" + re.escape(says)):
        parse_config({"artifacts": {"url": url}}, tmp_path, {})
    with pytest.raises(ConfigError, match=r"^artifacts\.url: .*" + re.escape(says)):
        parse_config({}, tmp_path, {"CONVEYOR_ARTIFACTS_URL": url})
    assert list(tmp_path.iterdir()) == []


def test_a_percent_escape_in_a_file_url_is_the_byte_it_stands_for() -> None:
    assert local_store_path("file:///srv/a%20b/%C3%A9t%C3%A9") == Path("/srv/a b/été")
    assert os.fsencode(local_store_path("file:///srv/raw%FF")) == b"/srv/raw\xff"
