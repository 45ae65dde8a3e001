"""A worker killed outright does not leave its commands running: the launcher of its
command loop (plain commands), or its watchdog (commands run in a thread each, such as
those whose outputs are kept), kills their process groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, run_cli, write_config
from conveyor.executors.watchdog import Watchdog
from proc_support import alive

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kept", [None, '["*.out"]'], ids=["launcher", "watchdog"])
def test_commands_die_with_a_worker_killed_by_sigkill(
    tmp_path: Path, sqlite_url: str, kept: str | None
) -> None:
    pids = tmp_path / "pids"
    outputs = f"outputs = {kept}" if kept else ""
    config = write_config(
        tmp_path,
        f"""
        [pipelines.slow]
        executor = "command"
        command = ["sh", "-c", "sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait"]
        {outputs}
        """,
    )
    env = cli_env(sqlite_url, config)
    assert run_cli("submit", "slow", env=env, cwd=tmp_path).returncode == 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", "--concurrency", "1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started: list[int] = []
    try:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if pids.exists() and len(pids.read_text().split()) == 2:
                started = [int(p) for p in pids.read_text().split()]
                break
            time.sleep(0.05)
        assert started, "the command did not start"
        os.kill(worker.pid, signal.SIGKILL)  # the worker alone, not its group
        worker.wait(10)
        end = time.monotonic() + 10
        while time.monotonic() < end and any(alive(p) for p in started):
            time.sleep(0.05)
        assert not any(alive(p) for p in started)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _watchdogs_of_this_process() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and b"watchdog.py" in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_a_closed_watchdog_stops_what_is_listed_and_guards_what_starts_after() -> None:
    dog = Watchdog()
    first = subprocess.Popen(["sleep", "30"], start_new_session=True)
    late = None
    try:
        dog.started(first.pid)
        assert len(_watchdogs_of_this_process()) == 1
        dog.close()  # as a stopping worker does, with this command still listed
        assert first.wait(10) == -signal.SIGTERM
        # a command ending after the close starts no watchdog just to say so
        dog.ended(first.pid)
        assert _watchdogs_of_this_process() == []
        # a command a stuck runner starts after the close is guarded all the same
        late = subprocess.Popen(["sleep", "30"], start_new_session=True)
        dog.started(late.pid)
        assert len(_watchdogs_of_this_process()) == 1
        dog.close()
        assert late.wait(10) == -signal.SIGTERM
    finally:
        for proc in (first, late):
            if proc is not None:
                proc.kill()
                proc.wait()
