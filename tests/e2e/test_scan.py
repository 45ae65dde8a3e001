"""The Spotbot ETL as a user runs it: `conveyor up` with no config (the built-in example
pipelines, the database in the current folder), a submit token, a field-test tree, and
`conveyor scan ROOT --submit --wait` against the server: the spotbot.db files appear
and it exits 0; a corrupt log fails it (exit 1); a wait that runs out exits 2. Every
command runs in a process of its own; the server stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Processes, wait_for

from conftest import run_cli
from conveyor.examples.spotbot import make_field_test_tree
from conveyor.scan import scan_tree


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def user_env() -> dict[str, str]:
    """The environment of a user with no Conveyor settings of their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["COLUMNS"] = "200"
    return env


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: {result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def annotations(db: Path) -> tuple[int, int]:
    """(headers, annotations) in a spotbot.db."""
    with sqlite3.connect(db) as conn:
        headers = conn.execute("SELECT count(*) FROM annotation_header").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM annotation").fetchone()[0]
    conn.close()
    return headers, rows


def test_the_spotbot_etl_scans_submits_and_waits(tmp_path: Path, procs: Processes) -> None:
    env = user_env()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = procs.start("up", "--port", str(port), env=env, cwd=tmp_path)

    def healthy() -> bool:
        assert server.poll() is None, procs.output(server)
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, 30, "conveyor up to answer")
    assert (tmp_path / "conveyor.db").is_file()  # the database in the current folder
    token = ok(
        run_cli("token", "create", "--name", "etl", "--role", "submit", env=env, cwd=tmp_path)
    )
    token_text = token.stdout.strip()
    assert token_text.startswith("cvy_")

    root = tmp_path / "V"
    logs = make_field_test_tree(root, devices=3, records=80)

    # without --submit: the request, as JSON, ready for `curl -d @file`
    printed = ok(run_cli("scan", str(root), env=env, cwd=tmp_path))
    assert json.loads(printed.stdout) == scan_tree(root).params()
    assert [e["rawbinlog_bin"] for e in json.loads(printed.stdout)["logs_to_process"]] == [
        str(b) for b in logs
    ]

    # the ETL step
    args = ["scan", str(root), "--submit", "--wait", "--url", url, "--token", token_text]
    done = ok(run_cli(*args, env=env, cwd=tmp_path, timeout=60))
    rid = int(done.stdout.splitlines()[0])
    assert done.stdout.splitlines()[-1] == f"request {rid} succeeded"
    assert f"request {rid}: 3 log(s) to spotbot" in done.stderr
    for b in logs:
        assert annotations(b.parent / "spotbot.db") == (1, 80)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token_text}"}) as c:
        req = c.get(f"/api/v1/requests/{rid}").json()
    assert req["status"] == "succeeded" and req["submitter"] == "etl"
    assert req["counts"] == {"total": 3, "succeeded": 3, "failed": 0, "cancelled": 0}

    # a corrupt log fails the request; a log missing its time file is skipped, with a
    # warning; the URL and token come from the environment this time
    (logs[1]).write_bytes(b"\x00\x01\xff\xff garbage")
    (logs[2].parent / "rawbinlog.time").unlink()
    env_etl = {**env, "CONVEYOR_URL": url, "CONVEYOR_TOKEN": token_text}
    failed = run_cli("scan", str(root), "--submit", "--wait", env=env_etl, cwd=tmp_path, timeout=60)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    rid2 = int(failed.stdout.splitlines()[0])
    assert failed.stdout.splitlines()[-1] == f"request {rid2} failed"
    assert f"warning: skipped {logs[2]} (no rawbinlog.time)" in failed.stderr
    assert f"request {rid2}: 2 log(s) to spotbot" in failed.stderr
    failure = next(line for line in failed.stderr.splitlines() if line.startswith("task "))
    assert f"({logs[1]}): exit code 1: spotbot:" in failure and "past the end" in failure

    # --strict refuses a tree with an incomplete log, before submitting anything
    strict = run_cli("scan", str(root), "--strict", "--submit", env=env_etl, cwd=tmp_path)
    assert strict.returncode == 1
    assert "1 log(s) are missing files" in strict.stderr and "Traceback" not in strict.stderr

    # a wait that runs out: the queue is paused, so nothing starts
    ok(run_cli("pause", "default", env=env, cwd=tmp_path))
    late = run_cli(
        "scan", str(root), "--submit", "--wait", "--timeout", "1", env=env_etl, cwd=tmp_path
    )
    assert late.returncode == 2, late.stdout + late.stderr
    assert "still requested after 1s" in late.stderr and "Traceback" not in late.stderr

    server.send_signal(signal.SIGTERM)
    assert procs.wait(server, 20) == 0
    assert "Traceback" not in procs.output(server)
