"""`conveyor prune` as a user runs it: old finished requests go with their logs, work
directories and stored outputs; queued work and what finished since stays; bad input is
refused with a clear line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from artifact_support import outputs_pipeline

from conftest import cli_env, run_cli, write_config
from conveyor.app import Conveyor
from conveyor.config import load_config

ONE = 'items=[{"name": "alpha", "code": 0}, {"name": "beta", "code": 0}]'


def test_prune_removes_rows_and_files_and_keeps_what_is_current(
    tmp_path: Path, db_url: str
) -> None:
    config = write_config(tmp_path, outputs_pipeline())
    env = cli_env(db_url, config)
    r = run_cli("submit", "ranks", "--set", ONE, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    old = int(r.stdout)
    assert run_cli("worker", "--burst", env=env, cwd=tmp_path).returncode == 0
    time.sleep(0.2)
    r = run_cli("submit", "ranks", "--set", ONE, env=env, cwd=tmp_path)
    queued = int(r.stdout)  # no worker runs it: it stays queued

    app = Conveyor(load_config(str(config), env))
    try:
        kept = [a for t in app.get(old).tasks for a in app.task_artifacts(t.id)]
        objects = [Path(a.url.removeprefix("file://")) for a in kept]
        assert len(objects) == 4 and all(p.is_file() for p in objects)
        logs = app.artifacts.root / "logs" / str(old)
        work = app.artifacts.root / "work" / str(old)
        assert logs.is_dir() and work.is_dir()

        dry = run_cli("prune", "--older-than", "0.1s", "--dry-run", "--json", env=env, cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        would = json.loads(dry.stdout)
        assert would["dry_run"] and would["requests"] == 1 and would["tasks"] == 2
        assert would["artifacts"] == 4
        assert all(p.is_file() for p in objects), "a dry run deletes nothing"

        done = run_cli("prune", "--older-than", "0.1s", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("deleted 1 requests, 2 tasks, ")
        assert not logs.exists() and not work.exists()
        assert not any(p.exists() for p in objects)
        assert run_cli("status", str(old), env=env, cwd=tmp_path).returncode == 1
        still = app.get(queued)
        assert still.status.value == "requested"
    finally:
        app.close()


def test_prune_refuses_bad_input(tmp_path: Path, sqlite_url: str) -> None:
    env = cli_env(sqlite_url, write_config(tmp_path, ""))
    none = run_cli("prune", env=env, cwd=tmp_path)
    assert none.returncode == 2
    assert "--older-than 30d (or set [conveyor] retention)" in none.stderr
    bad = run_cli("prune", "--older-than", "soon", env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("conveyor: --older-than: not an age: 'soon'")
    config = write_config(tmp_path, '[conveyor]\nretention = "someday"\n')
    wrong = run_cli("prune", env=cli_env(sqlite_url, config), cwd=tmp_path)
    assert wrong.returncode != 0 and "retention" in wrong.stderr


def test_configured_retention_is_the_default(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, '[conveyor]\nretention = "30d"\n')
    r = run_cli("prune", "--dry-run", "--json", env=cli_env(sqlite_url, config), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["older_than_s"] == 30 * 86400
