"""`conveyor serve --workers N`: several server processes on one port, stopped together
by SIGTERM, and gone when their parent is killed; and `conveyor bench-api` run briefly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import Processes, live_pids_in_group, wait_for

from conftest import cli_env, run_cli
from conveyor.client import Client
from conveyor.requests import RequestStatus


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


def start_serve(
    procs: Processes, env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen[bytes], str]:
    proc = procs.start("serve", "--port", "0", "--workers", "2", env=env, cwd=cwd)

    def url() -> str | None:
        assert proc.poll() is None, procs.output(proc)
        found = re.search(r"http://127\.0\.0\.1:\d+", procs.output(proc))
        return found.group(0) if found else None

    where = wait_for(url, 30, "the server to say where it listens")
    assert "2 processes" in procs.output(proc)
    # the parent and its two server processes
    wait_for(lambda: len(live_pids_in_group(proc.pid)) == 3, 30, "the server processes")
    return proc, where


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_several_server_processes_share_the_port(tmp_path: Path, procs: Processes) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'conveyor.db'}")
    token = run_cli("token", "create", "--name", "load", "--role", "submit", env=env, cwd=tmp_path)
    assert token.returncode == 0, token.stderr
    server, url = start_serve(procs, env, tmp_path)
    with Client(url, token.stdout.strip()) as client:
        wait_for(lambda: answers(url), 30, "the API to answer")

        def submit(n: int) -> int:
            return client.submit("noop", {"n": n}).id

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(40)))
        assert len(set(ids)) == 40
        assert {client.status(i).status for i in ids} == {RequestStatus.REQUESTED}
        assert len(list(client.list(page_size=7))) == 40

    server.send_signal(signal.SIGTERM)
    assert procs.wait(server, 20) == 0, procs.output(server)
    assert "Traceback" not in procs.output(server)
    wait_for(lambda: not live_pids_in_group(server.pid), 10, "every server process to stop")

    # killed outright, the parent cannot pass the signal on: its processes notice
    server, _ = start_serve(procs, env, tmp_path)
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    wait_for(lambda: not live_pids_in_group(server.pid), 15, "the orphaned processes to stop")


def test_bench_api_runs_briefly_and_reports(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    args = ["bench-api", "--seconds", "1", "--warmup", "0", "--clients", "2", "--readers", "1"]
    result = run_cli(*args, "--json", env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["database"] == "sqlite" and report["server_workers"] == 2
    assert report["submits"] > 0 and report["submits_per_s"] > 0
    assert report["status_reads"] > 0 and report["status_p99_ms"] >= report["status_p50_ms"] > 0
    assert report["errors"] == 0, report["error_samples"]
    assert list(tmp_path.iterdir()) == []  # it left nothing behind
