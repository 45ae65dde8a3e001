"""SQLite result files into the database: the Spotbot example's spotbot.db loaded by
`conveyor load-sqlite` and by a pipeline's `load_sqlite` when a task succeeds; all or
nothing per file, idempotent on re-load."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env, run_cli
from conveyor.config import builtin_config_path
from conveyor.examples import spotbot
from conveyor.ingest.loader import LoadError, read_mapping
from conveyor.worker import Worker, WorkerOptions
from ingest_support import query

MAPPING = builtin_config_path().parent / "spotbot.mapping.toml"


def _spotbot_db(folder: Path, records: int, seed: int = 1) -> Path:
    log = spotbot.write_log(folder, records, seed=seed)
    spotbot.process(log, folder / "rawbinlog.time", folder / "rawbinlog.protocols.xml", folder)
    return folder / "spotbot.db"


def _counts(db_url: str) -> tuple[int, int]:
    (h,) = query(db_url, "SELECT count(*) FROM annotation_header")
    (a,) = query(db_url, "SELECT count(*) FROM annotation")
    return int(h[0]), int(a[0])


def test_load_twice_is_idempotent(make_app: Any, db_url: str, tmp_path: Path) -> None:
    app = make_app()
    db = _spotbot_db(tmp_path / "one", 120)
    mapping = read_mapping(MAPPING)
    first = app.load_sqlite(db, mapping)
    assert first.rows == {"annotation_header": 1, "annotation": 120}
    app.load_sqlite(db, mapping)
    assert _counts(db_url) == (1, 120)
    # the children point at their header row, and keep the source's columns
    rows = query(
        db_url,
        "SELECT a.seq, a.protocol, h.record_count, h.source_bin FROM annotation a "
        "JOIN annotation_header h ON h.id = a.header_ref ORDER BY a.seq",
    )
    assert len(rows) == 120 and rows[0][0] == 0 and rows[0][2] == 120
    assert rows[0][3].endswith("rawbinlog.bin")
    assert {r[1] for r in rows} <= {"GPS", "CAN", "LTE"}


def test_a_bad_file_loads_nothing(make_app: Any, db_url: str, tmp_path: Path) -> None:
    app = make_app()
    db = _spotbot_db(tmp_path / "bad", 50)
    with sqlite3.connect(db) as conn:  # a child row whose header does not exist
        conn.execute(
            "INSERT INTO annotation (header_id, seq, protocol, kind, payload_len) "
            "VALUES (99, 50, 'GPS', 'data', 1)"
        )
    with pytest.raises(LoadError, match=r"annotation.header_id = 99 has no row"):
        app.load_sqlite(db, read_mapping(MAPPING))
    assert _counts(db_url) == (0, 0)
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(LoadError, match="no table 'annotation_header'"):
        app.load_sqlite(tmp_path / "empty.db", read_mapping(MAPPING))


def test_cli_load_sqlite(db_url: str, tmp_path: Path) -> None:
    one = _spotbot_db(tmp_path / "a", 30, seed=1)
    two = _spotbot_db(tmp_path / "b", 40, seed=2)
    env = cli_env(db_url)
    done = run_cli(
        "load-sqlite", str(one), str(two), "--mapping", str(MAPPING), env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "annotation_header" in done.stdout
    again = run_cli("load-sqlite", str(one), "--mapping", str(MAPPING), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _counts(db_url) == (2, 70)
    missing = run_cli(
        "load-sqlite", str(tmp_path / "nope.db"), "--mapping", str(MAPPING), env=env, cwd=tmp_path
    )
    assert missing.returncode == 1 and "no result file" in missing.stderr


def test_pipeline_loads_each_task_output(make_app: Any, db_url: str, tmp_path: Path) -> None:
    app = make_app(
        f"""
        [pipelines.spotbot]
        executor = "command"
        command = ["{{conveyor.python}}", "-m", "conveyor.examples.spotbot",
                   "--bin", "{{rawbinlog_bin}}", "--time", "{{rawbinlog_time}}",
                   "--protocols", "{{protocols_xml}}", "--output-dir", "{{output_dir}}"]
        split = "logs_to_process"
        load_sqlite = {{ file = "{{output_dir}}/spotbot.db", mapping = "{MAPPING}" }}
        """
    )
    logs = spotbot.make_field_test_tree(tmp_path / "tree", devices=2, records=60)
    params = {
        "logs_to_process": [
            {
                "rawbinlog_bin": str(b),
                "rawbinlog_time": str(b.with_suffix(".time")),
                "protocols_xml": str(b.parent / "rawbinlog.protocols.xml"),
                "output_dir": str(b.parent),
            }
            for b in logs
        ]
    }
    req = app.submit("spotbot", params).request
    Worker(app, WorkerOptions(burst=True, concurrency=2)).run()
    done = app.get(req.id)
    assert done.status.value == "succeeded"
    assert _counts(db_url) == (2, 120)
    linked = query(db_url, "SELECT DISTINCT request_id, task_id FROM annotation ORDER BY task_id")
    assert linked == [(req.id, t.id) for t in sorted(done.tasks, key=lambda t: t.id)]
    assert all(t.result["loaded"] == {"annotation_header": 1, "annotation": 60} for t in done.tasks)


def test_a_result_file_outside_the_roots_is_not_loaded(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    """With roots declared, the file a task's params name must lie inside them (or the
    task's work directory), links resolved: a submitter cannot have another SQLite file
    of the server's read into the database."""
    inside = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    for d in (inside, elsewhere):
        d.mkdir()
        _spotbot_db(d, 5)
    (inside / "sneaky").symlink_to(elsewhere)
    app = make_app(
        f"""
        [pipelines.load]
        executor = "command"
        command = ["true"]
        split = "dirs"
        load_sqlite = {{ file = "{{dir}}/spotbot.db", mapping = "{MAPPING}" }}
        roots = ["{inside}"]
        """
    )
    req = app.submit(
        "load", {"dirs": [{"dir": str(inside)}, {"dir": str(inside / "sneaky")}]}
    ).request
    Worker(app, WorkerOptions(burst=True, concurrency=2)).run()
    ok, refused = sorted(app.get(req.id).tasks, key=lambda t: t.seq)
    assert ok.status.value == "succeeded"
    assert refused.status.value == "failed"
    assert "outside the task's work directory and the pipeline's roots" in (refused.error or "")
    assert _counts(db_url) == (1, 5)
