"""/metrics when the API runs in several processes (`conveyor serve --workers 2`): any
process answers a scrape with the API requests of all of them, and with the database's
figures."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import Processes, live_pids_in_group, wait_for

from conftest import cli_env, run_cli


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


def series(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_sum_over_server_processes(tmp_path: Path, procs: Processes, pg_url: str) -> None:
    env = cli_env(pg_url)
    made = run_cli(
        "token", "create", "--name", "scraper", "--role", "submit", env=env, cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    auth = {"Authorization": f"Bearer {made.stdout.strip()}"}
    server = procs.start("serve", "--port", "0", "--workers", "2", env=env, cwd=tmp_path)

    def url() -> str | None:
        assert server.poll() is None, procs.output(server)
        found = re.search(r"http://127\.0\.0\.1:\d+", procs.output(server))
        return found.group(0) if found else None

    base = wait_for(url, 30, "the server to say where it listens")
    wait_for(lambda: len(live_pids_in_group(server.pid)) == 3, 30, "the server processes")

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 30, "the API to answer")
    for i in range(3):
        r = httpx.post(
            f"{base}/api/v1/requests",
            json={"pipeline": "noop", "params": {"i": i}},
            headers=auth,
            timeout=10,
        )
        assert r.status_code == 201, r.text
    # a new connection each time: the kernel spreads them over both processes
    for _ in range(40):
        assert httpx.get(f"{base}/api/v1/queues", headers=auth, timeout=10).status_code == 200

    queues_ok = 'conveyor_api_requests_total{method="GET",route="/api/v1/queues",status="200"}'
    queued = 'conveyor_queue_tasks{queue="default",status="queued"}'
    for _ in range(6):
        text = httpx.get(f"{base}/metrics", headers=auth, timeout=10).text
        assert series(text, queues_ok) == 40, text
        assert series(text, queued) == 3
        assert series(text, 'conveyor_requests{pipeline="noop",status="requested"}') == 3
        assert series(text, "conveyor_database_up") == 1

    server.send_signal(signal.SIGTERM)
    assert procs.wait(server, 20) == 0, procs.output(server)
    assert "Traceback" not in procs.output(server)
