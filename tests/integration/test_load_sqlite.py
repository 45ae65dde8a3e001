"""SQLite result files into the database: the Spotbot example's spotbot.db loaded by
`conveyor load-sqlite` and by a pipeline's `load_sqlite` when a task succeeds; all or
nothing per file, idempotent on re-load."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env, run_cli
from conveyor.config import builtin_config_path
from conveyor.examples import spotbot
from conveyor.ingest.loader import LoadError, LoadStopped, read_mapping
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


def test_a_load_stopped_before_its_commit_keeps_nothing(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    """A load asks `stop` as it goes and last in its transaction, just before the
    commit: an attempt whose time ran out then keeps no rows, and what an earlier load
    of the same task left stays as it was."""
    app = make_app()
    mapping = read_mapping(MAPPING)
    first = _spotbot_db(tmp_path / "first", 30, seed=1)
    app.load_sqlite(first, mapping, task_id=7)
    assert _counts(db_url) == (1, 30)
    bigger = _spotbot_db(tmp_path / "bigger", 80, seed=2)
    asked: list[int] = []

    def count() -> str | None:
        asked.append(1)
        return None

    app.load_sqlite(bigger, mapping, task_id=8)  # another task's, to count the asks on
    app.load_sqlite(bigger, mapping, task_id=8, stop=count)
    checks = len(asked)
    assert checks >= 3  # after each table's rows, and at the end
    assert _counts(db_url) == (2, 110)

    def at_the_last(n: int = checks) -> str | None:
        asked.append(1)
        return "timed out after 5s" if len(asked) == n else None

    asked.clear()
    with pytest.raises(LoadStopped, match="timed out after 5s"):
        app.load_sqlite(bigger, mapping, task_id=7, stop=at_the_last)
    assert len(asked) == checks  # stopped at the last word
    assert _counts(db_url) == (2, 110)  # task 7 still has its first load's 30 rows
    rows = query(db_url, "SELECT count(*) FROM annotation WHERE task_id = 7")
    assert rows == [(30,)]
    with pytest.raises(LoadStopped, match="cancelled"):
        app.load_sqlite(bigger, mapping, task_id=9, stop=lambda: "cancelled")
    assert _counts(db_url) == (2, 110)


def test_a_nul_or_a_refused_value_is_named_and_loads_nothing(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    """SQLite keeps a NUL in text and any value in any column; PostgreSQL refuses both.
    There the load names the table, column and row (a NUL), or says what the database
    refused in a line, and loads nothing; the task's error is that line, not a dump of
    the rows sent."""
    app = make_app()
    mapping = read_mapping(MAPPING)
    db = _spotbot_db(tmp_path / "nul", 40)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE annotation SET detail = 'a' || char(0) || 'b' WHERE seq = 6")
    postgres = db_url.startswith("postgresql")
    if postgres:
        with pytest.raises(LoadError) as refused:
            app.load_sqlite(db, mapping, task_id=1)
        assert str(refused.value) == (
            f"{db}: annotation.detail holds a NUL character in the table's row 7 "
            "(counted in rowid order), which PostgreSQL cannot store in text"
        )
        assert _counts(db_url) == (0, 0)
    else:
        app.load_sqlite(db, mapping, task_id=1)
        assert query(db_url, "SELECT detail FROM annotation WHERE seq = 6") == [("a\0b",)]

    bad = _spotbot_db(tmp_path / "typed", 40, seed=3)
    with sqlite3.connect(bad) as conn:  # SQLite keeps text in an INTEGER column
        conn.execute("UPDATE annotation SET payload_len = 'many' WHERE seq = 3")
    if postgres:
        with pytest.raises(LoadError) as typed:
            app.load_sqlite(bad, mapping, task_id=2)
        message = str(typed.value)
        assert message.startswith(f"{bad}: annotation refused a row of annotation (rows 1-40): ")
        assert "many" in message and "\n" not in message and "[parameters" not in message
        assert _counts(db_url) == (0, 0)


def test_the_examples_exception_text_loads_into_either_database(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    """An exception record's bytes that are not printable ASCII, a NUL among them, and
    its backslashes are written as \\xNN in its detail, so Spotbot's result files load
    into PostgreSQL too, and read back unambiguously."""
    folder = tmp_path / "log"
    log = spotbot.write_log(folder, 10)
    payload = b"!boom\x00\x01\xff \\x00 end"
    with log.open("ab") as f:
        f.write(struct.pack(">HH", 1, len(payload)) + payload)
    with (folder / "rawbinlog.time").open("a") as f:
        f.write("1670000099.000\n")
    spotbot.process(log, folder / "rawbinlog.time", folder / "rawbinlog.protocols.xml", folder)
    make_app().load_sqlite(folder / "spotbot.db", read_mapping(MAPPING), task_id=1)
    rows = query(db_url, "SELECT kind, detail FROM annotation WHERE seq = 10")
    assert rows == [("exception", "boom\\x00\\x01\\xff \\x5cx00 end")]


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


def test_without_a_work_directory_a_result_file_must_be_named_by_its_whole_path(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    """A pipeline with `work_dir = false` loads a file its params name in full; a
    relative name has no folder to be found in, and fails the task saying so (it is
    not looked for where the worker happens to run)."""
    data = tmp_path / "data"
    data.mkdir()
    _spotbot_db(data, 4)
    app = make_app(
        f"""
        [pipelines.load]
        executor = "command"
        command = ["true"]
        split = "files"
        work_dir = false
        retries = 2
        load_sqlite = {{ file = "{{file}}", mapping = "{MAPPING}" }}
        roots = ["{data}"]
        """
    )
    req = app.submit(
        "load", {"files": [{"file": str(data / "spotbot.db")}, {"file": "spotbot.db"}]}
    ).request
    Worker(app, WorkerOptions(burst=True, concurrency=2)).run()
    ok, relative = sorted(app.get(req.id).tasks, key=lambda t: t.seq)
    assert ok.status.value == "succeeded"
    assert relative.status.value == "failed"
    assert relative.error is not None
    assert "result file spotbot.db is a relative path" in relative.error
    assert "work_dir = false" in relative.error
    assert relative.attempts == 1  # the same on every attempt: not retried
    assert _counts(db_url) == (1, 4)
    assert not (app.artifacts.root / "work" / str(req.id)).exists()
