"""Helpers of the end-to-end tier: Conveyor processes started as a user would start them,
bounded waits, and making sure nothing a test started outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

E2E_DIR = Path(__file__).resolve().parent
_T = TypeVar("_T")


def toml_list(items: Sequence[str]) -> str:
    """A TOML array of strings (JSON's string escapes are a subset of TOML's)."""
    return json.dumps(list(items))


def wait_for(predicate: Callable[[], _T], timeout: float, what: str, interval: float = 0.05) -> _T:
    """Poll until `predicate()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _proc_entries() -> Iterable[tuple[int, str, int, bytes]]:
    """(pid, state, process group, command line) of every process visible in /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            # comm may hold spaces and parentheses: the fields after the last ')' are fixed
            fields = stat[stat.rindex(b")") + 2 :].split()
            state, pgrp = fields[0].decode(), int(fields[2])
        except (OSError, ValueError, IndexError):
            continue  # gone (or going) meanwhile
        yield pid, state, pgrp, cmdline


def live_pids_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    needle = marker.encode()
    me = os.getpid()
    return [
        pid
        for pid, state, _, cmdline in _proc_entries()
        if pid != me and state not in ("Z", "X") and needle in cmdline
    ]


def live_pids_in_group(pgid: int) -> list[int]:
    """Live (not zombie) members of a process group."""
    return [
        pid for pid, state, pgrp, _ in _proc_entries() if pgrp == pgid and state not in ("Z", "X")
    ]


def kill_marked(marker: str) -> list[int]:
    killed = []
    for pid in live_pids_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


class Processes:
    """The `conveyor` processes a test starts. `close()` (a fixture's teardown) kills any
    still running, and anything else whose command line carries the test's marker (the
    commands of tasks run in sessions of their own, so they may outlive a killed worker)."""

    def __init__(self, folder: Path, marker: str) -> None:
        self.folder = folder
        self.marker = marker
        self._procs: list[tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = []

    def start(self, *args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        """Start `conveyor ARGS…`; its output (stdout and stderr) goes to a file."""
        out = self.folder / f"proc-{len(self._procs)}-{args[0]}.out"
        handle = out.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append((proc, out, handle))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        for p, out, _ in self._procs:
            if p is proc:
                return out.read_text(errors="replace")
        raise KeyError(proc.pid)

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {proc.args} still running after {timeout:g}s; its output:\n"
                + self.output(proc)
            ) from None

    def close(self) -> None:
        for proc, _, handle in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            handle.close()
        kill_marked(self.marker)


def run_many(
    commands: Sequence[Sequence[str]],
    env: dict[str, str],
    cwd: Path,
    timeout: float = 60,
    envs: Sequence[dict[str, str] | None] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent `conveyor` commands at once (each with `env`, or its own
    from `envs`); their results in the same order."""
    envs = list(envs) if envs is not None else [None] * len(commands)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            env=own or env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, own in zip(commands, envs, strict=True)
    ]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def events_of(store: Any, request_id: int) -> list[Any]:
    """Every event of a request, however many."""
    found: list[Any] = []
    while True:
        page = store.events(after_id=found[-1].id if found else 0, request_id=request_id)
        if not page:
            return found
        found += page
