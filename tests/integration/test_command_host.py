"""The command host: a host that dies with commands running fails their attempts as
retryable (never leaves them waiting), and the next command starts a new host."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.executors import PROGRESS_PREFIX, TaskContext, spawner
from conveyor.executors.command import CommandExecutor
from conveyor.pipelines import Pipeline
from conveyor.tasks import Progress, Task, TaskStatus

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not spawner.available(), reason="the command host needs pidfds"),
]


def _ctx(tmp_path: Path, n: int) -> TaskContext:
    task = Task(n, 1, "p", "default", 0, n, {}, TaskStatus.RUNNING, 1, 1, None, 0.0, 0.0)
    reports: list[Progress] = []
    return TaskContext(
        task,
        lambda: (str(tmp_path / f"logs/{n}.log"), str(tmp_path / f"work/{n}")),
        reports.append,
    )


def _pipeline(code: str) -> Pipeline:
    return Pipeline(name="p", executor="command", command=(sys.executable, "-c", code))


MARK = "command-host-test"


def _kill_marked() -> None:
    """The command a SIGKILLed host leaves behind (nothing is left to kill it)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if MARK.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


def test_a_host_that_dies_fails_its_attempts_and_is_started_again(tmp_path: Path) -> None:
    host = spawner.shared_host(PROGRESS_PREFIX)
    executor = CommandExecutor()
    assert executor.hosted
    results = []

    def attempt() -> None:
        ctx = _ctx(tmp_path, 1)
        results.append(executor.run(_pipeline(f"import time; time.sleep(30)  # {MARK}"), ctx, None))
        ctx.close()

    runner = threading.Thread(target=attempt)
    runner.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "logs/1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert host._proc is not None
    os.kill(host._proc.pid, signal.SIGKILL)
    runner.join(10)
    _kill_marked()
    assert not runner.is_alive()
    [result] = results
    assert not result.ok and result.retryable
    assert "command host stopped" in (result.error or "")
    # the next command gets a new host
    ctx = _ctx(tmp_path, 2)
    again = executor.run(_pipeline("print('fine')"), ctx, None)
    ctx.close()
    assert again.ok
    assert (tmp_path / "logs/2.log").read_text().splitlines()[-2:] == ["fine", "exit code 0"]
