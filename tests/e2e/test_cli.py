"""The `conveyor` command as a user runs it: submit, run a worker, wait, inspect; and what
it says when the input is wrong. Every command runs in a process of its own."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import kill_marked, run_many, toml_list

from conftest import cli_env, run_cli, write_config
from conveyor.app import Conveyor
from conveyor.config import builtin_config_path, load_config
from conveyor.examples.spotbot import make_field_test_tree
from conveyor.store import RequestFilter, open_store

# Records when it ran into the file named by its argument; the sleep makes overlap
# (or its absence) unmistakable.
INTERVAL_SCRIPT = (
    "import sys, time; t0 = time.time(); time.sleep(1.0); "
    "open(sys.argv[1], 'w').write('%r %r' % (t0, time.time()))"
)


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a test's commands started (they name files under tmp_path) ends with it."""
    yield
    kill_marked(f"{tmp_path}/")


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}"
    )
    assert "Traceback" not in result.stderr + result.stdout
    return result


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code`, saying why on exactly one line of stderr."""
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text
    assert result.returncode == code, (
        f"{result.args}: exit {result.returncode}, expected {code}; stderr: {result.stderr!r}"
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{result.args}: expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("conveyor: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------- scenario 1
def test_command_fan_out_runs_in_parallel(tmp_path: Path, db_url: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    config = write_config(
        tmp_path,
        f"""
        [conveyor]
        poll_interval = 0.2

        [pipelines.fanout]
        executor = "command"
        command = {
            toml_list(["{conveyor.python}", "-c", INTERVAL_SCRIPT, "{out_dir}/{name}.times"])
        }
        split = "parts"
        queue = "default"
        """,
    )
    env = cli_env(db_url, config)
    params = tmp_path / "params.json"
    params.write_text(
        json.dumps(
            {"out_dir": str(out_dir), "parts": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
        )
    )

    submitted = ok(run_cli("submit", "fanout", str(params), env=env, cwd=tmp_path))
    rid = int(submitted.stdout.strip())

    worker = ok(
        run_cli("worker", "--burst", "--concurrency", "3", env=env, cwd=tmp_path, timeout=60)
    )
    assert "3 succeeded" in worker.stderr, worker.stderr

    intervals = []
    for name in "abc":
        start, end = map(float, (out_dir / f"{name}.times").read_text().split())
        intervals.append((start, end))
    # parallel: every task started before any of them ended
    assert max(s for s, _ in intervals) < min(e for _, e in intervals), intervals

    waited = ok(run_cli("wait", str(rid), "--timeout", "30", env=env, cwd=tmp_path))
    assert f"request {rid} succeeded" in waited.stdout

    status = json.loads(ok(run_cli("status", str(rid), "--json", env=env, cwd=tmp_path)).stdout)
    assert status["id"] == rid
    assert status["pipeline"] == "fanout"
    assert status["status"] == "succeeded"
    assert status["queue"] == "default"
    assert len(status["tasks"]) == 3
    assert len({t["id"] for t in status["tasks"]}) == 3
    for task in status["tasks"]:
        assert task["status"] == "succeeded"
        assert task["attempts"] == 1
        assert set(task["progress"]) >= {"current", "total", "message"}
    # the commands printed nothing: their logs (kept in the database) are two lines
    task_id = str(status["tasks"][0]["id"])
    log = ok(run_cli("logs", task_id, env=env, cwd=tmp_path)).stdout.splitlines()
    assert log[0].startswith("$ ") and log[0].endswith(".times") and log[1:] == ["exit code 0"]
    tail = ok(run_cli("logs", task_id, "--tail", "1", env=env, cwd=tmp_path)).stdout
    assert tail == "exit code 0\n"


def test_spotbot_example_end_to_end(tmp_path: Path, sqlite_url: str) -> None:
    # No config file anywhere: the built-in example pipelines are served.
    bins = make_field_test_tree(tmp_path / "field", devices=3, records=200)
    logs = [
        {
            "rawbinlog_bin": str(b),
            "rawbinlog_time": str(b.with_suffix(".time")),
            "protocols_xml": str(b.parent / "rawbinlog.protocols.xml"),
            "output_dir": str(b.parent),
        }
        for b in bins
    ]
    params = tmp_path / "request.json"
    params.write_text(json.dumps({"logs_to_process": logs}))
    env = cli_env(sqlite_url)
    assert not (tmp_path / "conveyor.toml").exists()

    rid = int(ok(run_cli("submit", "spotbot", str(params), env=env, cwd=tmp_path)).stdout)
    worker = ok(run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=90))
    assert "3 succeeded" in worker.stderr, worker.stderr

    status = json.loads(ok(run_cli("status", str(rid), "--json", env=env, cwd=tmp_path)).stdout)
    assert status["status"] == "succeeded"
    assert [t["status"] for t in status["tasks"]] == ["succeeded"] * 3
    for task in status["tasks"]:
        assert task["progress"]["total"] == 200
        assert task["progress"]["current"] == 200

    for b in bins:
        db_file = b.parent / "spotbot.db"
        assert db_file.is_file(), f"no spotbot.db in {b.parent}"
        con = sqlite3.connect(db_file)
        try:
            headers = con.execute(
                "SELECT source_bin, record_count FROM annotation_header"
            ).fetchall()
            assert headers == [(str(b), 200)]
            (rows,) = con.execute("SELECT count(*) FROM annotation").fetchone()
            assert rows == 200
        finally:
            con.close()

    task_id = status["tasks"][0]["id"]
    log = ok(run_cli("logs", str(task_id), env=env, cwd=tmp_path)).stdout
    assert f"spotbot: 200 annotations from {bins[0]}" in log, log
    assert "conveyor:progress 200/200 wrote spotbot.db" in log


# -------------------------------------------------------------------- scenario 10
NOOP_CONFIG = """
[conveyor]
poll_interval = 0.2

[pipelines.noop]
executor = "python"
handler = "conveyor.examples.handlers:noop"
"""


def test_submit_list_queues_workers(tmp_path: Path, db_url: str) -> None:
    env = cli_env(db_url, write_config(tmp_path, NOOP_CONFIG))

    upgraded, plain, as_json, *keyed = (
        ok(r)
        for r in run_many(
            [
                ["db", "upgrade"],
                ["submit", "noop", "--set", "n=1"],
                ["submit", "noop", "--set", "n=2", "--json"],
                # the same idempotency key three times at once: one request, created once
                ["submit", "noop", "--set", "n=3", "--key", "order-17", "--json"],
                ["submit", "noop", "--set", "n=3", "--key", "order-17", "--json"],
                ["submit", "noop", "--set", "n=3", "--key", "order-17"],
            ],
            env=env,
            cwd=tmp_path,
        )
    )
    assert "latest schema" in upgraded.stdout
    assert re.fullmatch(r"\d+\n", plain.stdout), repr(plain.stdout)  # just the id
    first = int(plain.stdout)
    doc = json.loads(as_json.stdout)
    assert doc["created"] is True
    assert doc["pipeline"] == "noop"
    assert doc["status"] == "requested"
    assert doc["queue"] == "default"
    assert doc["params"] == {"n": 2}
    second = doc["id"]
    a, b = json.loads(keyed[0].stdout), json.loads(keyed[1].stdout)
    third = a["id"]
    assert b["id"] == third
    assert int(keyed[2].stdout) == third
    assert [a["created"], b["created"]].count(True) <= 1
    assert len({first, second, third}) == 3

    listed, queues = (
        ok(r)
        for r in run_many(
            [["list", "--status", "requested", "--json"], ["queues", "--json"]],
            env=env,
            cwd=tmp_path,
        )
    )
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted([first, second, third])
    by_name = {q["name"]: q for q in json.loads(queues.stdout)}
    assert by_name["default"]["queued"] == 3
    assert by_name["default"]["paused"] is False

    ok(run_cli("worker", "--burst", env=env, cwd=tmp_path, timeout=60))

    done, workers_all, workers_alive, table = run_many(
        [
            ["list", "--status", "succeeded", "--json"],
            ["workers", "--all", "--json"],
            ["workers", "--json"],
            ["list", "--status", "succeeded"],
        ],
        env=env,
        cwd=tmp_path,
    )
    assert sorted(r["id"] for r in json.loads(ok(done).stdout)) == sorted([first, second, third])
    (w,) = json.loads(ok(workers_all).stdout)
    assert w["status"] == "stopped"
    assert json.loads(ok(workers_alive).stdout) == []  # only live workers by default
    assert re.search(rf"^\s*{third}\s+noop\s+succeeded\s+default\s+1/1", ok(table).stdout, re.M)

    # `submit --json` prints the same document as `status --json`: its tasks included
    assert doc["counts"]["total"] == 1
    assert len(doc["tasks"]) == 1, (
        f"submit --json lists {len(doc['tasks'])} tasks for a request of "
        f"{doc['counts']['total']}: {doc['tasks']}"
    )


def test_bad_input_gives_one_clear_line(tmp_path: Path, sqlite_url: str) -> None:
    # The built-in pipelines (no config file): noop, sleep, spotbot.
    env = cli_env(sqlite_url)
    down = cli_env("postgresql://postgres@127.0.0.1:1/x")  # nothing listens there

    log = {
        "rawbinlog_bin": "/data/a.bin",
        "rawbinlog_time": "/data/a.time",
        "protocols_xml": "/data/p.xml",
        "output_dir": "/data/out",
    }
    wrong_type = tmp_path / "wrong_type.json"
    wrong_type.write_text(json.dumps({"logs_to_process": [{**log, "output_dir": 7}]}))
    missing_field = tmp_path / "missing_field.json"
    missing_field.write_text(
        json.dumps({"logs_to_process": [log, {k: v for k, v in log.items() if k != "output_dir"}]})
    )
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"logs_to_process": [\n  {"rawbinlog_bin": "x",}\n]}\n')

    cases = [
        (["submit", "nope"], 1, env),
        (["submit", "spotbot", str(wrong_type)], 1, env),
        (["submit", "spotbot", str(missing_field)], 1, env),
        (["submit", "spotbot", str(tmp_path / "absent.json")], 1, env),
        (["submit", "spotbot", str(malformed)], 1, env),
        (["submit", "sleep", "--set", "seconds"], 2, env),
        (["status", "424242"], 1, env),
        (["list", "--status", "bogus"], 2, env),
        (["logs", "424242"], 1, env),
        # a database that cannot be reached: exit 3, whatever the command
        (["status", "1"], 3, down),
        (["submit", "noop"], 3, down),
        (["list"], 3, down),
    ]
    # A request nobody works on, for `wait` to time out on (submitted here: quicker).
    app = Conveyor(load_config(builtin_config_path(), {"CONVEYOR_DATABASE_URL": sqlite_url}))
    try:
        rid = app.submit("sleep", {"seconds": 5}).request.id
    finally:
        app.close()
    cases.append((["wait", str(rid), "--timeout", "0.5"], 2, env))

    results = run_many(
        [args for args, _, _ in cases], env=env, cwd=tmp_path, envs=[e for _, _, e in cases]
    )
    lines = [one_line_error(r, code) for r, (_, code, _) in zip(results, cases, strict=True)]
    (
        unknown,
        wrong,
        missing,
        absent,
        bad_json,
        bad_set,
        no_request,
        bad_status,
        no_task,
        *unreachable,
        timed_out,
    ) = lines

    assert "unknown pipeline 'nope'" in unknown
    assert "noop, sleep, spotbot" in unknown  # the known ones
    assert "$.logs_to_process[0].output_dir" in wrong
    assert "string" in wrong
    assert "$.logs_to_process[1]" in missing and "output_dir" in missing
    assert "not found" in absent and "absent.json" in absent
    assert "malformed.json" in bad_json and "not valid JSON" in bad_json
    assert "line 2" in bad_json
    assert "--set" in bad_set and "key=value" in bad_set
    assert "424242" in no_request
    assert "--status" in bad_status
    assert "424242" in no_task
    assert len(unreachable) == 3
    for line in unreachable:
        assert "database unavailable" in line
    assert f"request {rid}" in timed_out and "requested" in timed_out

    # nothing was accepted from the bad submissions
    store = open_store(sqlite_url)
    try:
        assert [r.id for r in store.list_requests(RequestFilter())] == [rid]
    finally:
        store.close()
