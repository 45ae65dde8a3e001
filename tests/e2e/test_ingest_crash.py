"""Crash drill: `conveyor ingest` killed with SIGKILL in the middle of its work, then
run again: every file ends in exactly one of archive/ and failed/, and the database
holds exactly the rows of the good files."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Processes, live_pids_in_group, wait_for

from conveyor.ingest.samples import split_document

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import cli_env, run_cli, write_config
from ingest_support import counts, names, put, sample


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path, marker=f"{tmp_path}/")
    yield p
    p.close()


def test_sigkill_mid_batch_then_restart(db_url: str, tmp_path: Path, procs: Processes) -> None:
    spool = tmp_path / "spool"
    parts = split_document(sample("cki-v5.json"), 400)
    bad = {f"bad-{i}.json" for i in range(5)}
    for i, part in enumerate(parts[:300]):
        put(spool, f"sub-{i:04d}.json", part)
    for name in sorted(bad)[:3]:
        put(spool, name, '{"version": {"major": 5, "minor": 3}, "tests": [')
    config = write_config(
        tmp_path,
        f"""
        [spools.drill]
        dir = "{spool}"
        workers = 2
        interval = 0.05
        settle = 0
        batch_rows = 40
        batch_seconds = 0.02
        """,
    )
    env = cli_env(db_url, config)
    proc = procs.start("ingest", "--spool", "drill", env=env, cwd=tmp_path)
    # kill it once it has committed some batches but not all of them
    wait_for(lambda: len(names(spool / "archive")) >= 30, 60, "the first archived files")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    done_at_kill = len(names(spool / "archive"))
    try:
        # its worker processes follow it
        wait_for(lambda: not live_pids_in_group(proc.pid), 20, "the worker processes to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, should that fail
    # files keep arriving while it is down
    for i, part in enumerate(parts[300:], start=300):
        put(spool, f"sub-{i:04d}.json", part)
    for name in sorted(bad)[3:]:
        put(spool, name, "not json at all")

    again = run_cli("ingest", "--spool", "drill", "--once", env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 1, again.stderr  # some files failed
    assert "failed 2" in again.stdout or "failed" in again.stdout

    archived = names(spool / "archive")
    failed = [n for n in names(spool / "failed") if not n.endswith(".error.json")]
    sidecars = {n for n in names(spool / "failed") if n.endswith(".error.json")}
    everything = {f"sub-{i:04d}.json" for i in range(len(parts))} | bad
    assert done_at_kill < len(parts)
    assert names(spool) == []  # nothing left pending
    assert sorted(archived + failed) == sorted(everything)  # each exactly once
    assert set(failed) == bad
    assert sidecars == {n.replace(".json", ".error.json") for n in bad}
    assert counts(db_url) == {
        "checkouts": 37,
        "builds": 140,
        "tests": 3387,
        "issues": 1,
        "incidents": 1138,
    }


def test_up_runs_the_declared_spools(sqlite_url: str, tmp_path: Path, procs: Processes) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = write_config(
        tmp_path,
        f"""
        [spools.kernelci]
        dir = "{spool}"
        workers = 1
        interval = 0.1
        settle = 0
        """,
    )
    proc = procs.start("up", "--port", "0", env=cli_env(sqlite_url, config), cwd=tmp_path)
    wait_for(lambda: "spools: kernelci" in procs.output(proc), 30, "conveyor up to start")
    for i, part in enumerate(split_document(sample("cki-v5.json"), 5)):
        put(spool, f"p{i}.json", part)
    wait_for(lambda: len(names(spool / "archive")) == 5, 60, "the spool to be ingested")
    proc.send_signal(signal.SIGTERM)
    assert procs.wait(proc, 30) == 0, procs.output(proc)
    assert counts(sqlite_url)["tests"] == 3387
