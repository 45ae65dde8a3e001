"""The spool ingester on SQLite and PostgreSQL: each outcome a file can have (archived,
failed with a sidecar, deleted when empty, ignored while half-written), idempotent
re-submission, and a database outage in the middle of a run."""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import make_config
from conveyor.app import Conveyor
from conveyor.ingest.samples import split_document
from conveyor.ingest.spool import Spool
from conveyor.store.postgres import sqlalchemy_url
from ingest_support import (
    V1_TRANSFORMS,
    copy_sample,
    counts,
    names,
    put,
    query,
    run_once,
    sample,
    spool_config,
)


def test_kcidb_v5_sample_ingests_completely(make_app: Any, db_url: str, tmp_path: Path) -> None:
    app = make_app()
    spool = tmp_path / "spool"
    copy_sample(spool, "cki-v5.json")
    stats = run_once(app, spool_config(spool))
    assert names(spool / "archive") == ["cki-v5.json"]
    assert names(spool) == [] and names(spool / "failed") == []
    assert counts(db_url) == {
        "checkouts": 37,
        "builds": 140,
        "tests": 3387,
        "issues": 1,
        "incidents": 1138,
    }
    assert stats.files == 1 and stats.rows == 4703
    # the counters behind /metrics, and the events on the bus
    assert app.ingest_counters()["test"] == {"files": 1, "rows": 4703}
    kinds = {e.kind for e in app.events()}
    assert "ingest.progress" in kinds
    (totals,) = app.ingest_totals()
    assert (totals.source, totals.files, totals.records, totals.failed) == ("test", 1, 4703, 0)
    assert totals.per_minute > 0
    # and what /metrics shows of them
    from conveyor.metrics import families, snapshot

    found = {
        m.name: m.samples[0].value
        for m in families(snapshot(app))
        if m.name.startswith("conveyor_ingest")
    }
    assert found["conveyor_ingest_files"] == 1 and found["conveyor_ingest_records"] == 4703
    # the fields are the KCIDB ones, misc kept as JSON
    (row,) = query(
        db_url,
        "SELECT origin, status, build_id, misc FROM kcidb_tests WHERE id = 'redhat:99893642'",
    )
    assert row[0] == "redhat" and row[1] == "ERROR" and row[2] == "redhat:306769"


def test_v1_samples_fail_with_the_exact_reason(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    copy_sample(spool, "cki-v1.json")
    copy_sample(spool, "kernelci-v1.json")
    stats = run_once(make_app(), spool_config(spool))
    assert stats.failed == {"validate": 2}
    failed = spool / "failed"
    assert names(failed) == [
        "cki-v1.error.json",
        "cki-v1.json",
        "kernelci-v1.error.json",
        "kernelci-v1.json",
    ]
    cki = json.loads((failed / "cki-v1.error.json").read_text())
    assert cki["stage"] == "validate"
    assert cki["path"] == "$.revisions[0].git_repository_url"
    assert "git://git.kernel.org" in cki["reason"] and "HTTPS" in cki["reason"]
    kernelci = json.loads((failed / "kernelci-v1.error.json").read_text())
    assert kernelci["stage"] == "validate"
    assert kernelci["path"].startswith("$.builds[") and kernelci["path"].endswith("].log_url")
    assert kernelci["reason"] == "'build.log' is not a 'uri'"
    assert counts(db_url)["tests"] == 0
    assert app_counter(make_app(), "failed.validate") == 2


def app_counter(app: Any, name: str) -> int:
    return int(app.ingest_counters().get("test", {}).get(name, 0))


def test_v1_samples_ingest_after_configured_transforms(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    trees = {
        "stable-rc": "https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux-stable-rc.git",
        "mainline": "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git",
    }
    spool = tmp_path / "spool"
    copy_sample(spool, "cki-v1.json")
    copy_sample(spool, "kernelci-v1.json")
    transforms = V1_TRANSFORMS.__class__(
        **{**V1_TRANSFORMS.__dict__, "trees": {url: name for name, url in trees.items()}}
    )
    stats = run_once(make_app(), spool_config(spool, transforms=transforms))
    assert stats.failed_total == 0
    assert names(spool / "archive") == ["cki-v1.json", "kernelci-v1.json"]
    assert counts(db_url)["tests"] == 3387 + 1408
    assert query(
        db_url,
        "SELECT count(*) FROM kcidb_checkouts WHERE substr(git_repository_url, 1, 4) = 'git:'",
    ) == [(0,)]
    logs = [
        r[0] for r in query(db_url, "SELECT log_url FROM kcidb_builds WHERE origin = 'kernelci'")
    ]
    assert len(logs) == 176
    assert all(u.startswith("https://storage.kernelci.org/") for u in logs)
    assert (
        "https://storage.kernelci.org/mainline/master/v5.3-rc6-232-g95381debd9ee/x86_64/"
        "x86_64_defconfig/gcc-8/build.log"
    ) in logs
    assert all(u.endswith("/build.log") for u in logs)
    named = query(
        db_url, "SELECT DISTINCT tree_name FROM kcidb_checkouts WHERE tree_name IS NOT NULL"
    )
    assert {"stable-rc", "mainline"} <= {r[0] for r in named}


def test_each_file_outcome(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    doc = sample("cki-v5.json")
    good, other = split_document(doc, 2)
    put(spool, "good.json", good)
    (spool / "empty.json").write_text("")
    (spool / "half.json.tmp").write_text('{"version": {"major": 5')  # a writer at work
    put(spool, "broken.json", '{"version": ')
    put(spool, "wrong.json", {"version": {"major": 5, "minor": 3}, "tests": [{"id": 1}]})
    put(spool, "notes.txt", "not a submission")
    stats = run_once(make_app(), spool_config(spool))
    assert names(spool / "archive") == ["good.json"]
    assert names(spool) == ["half.json.tmp", "notes.txt"]  # untouched
    assert names(spool / "failed") == [
        "broken.error.json",
        "broken.json",
        "wrong.error.json",
        "wrong.json",
    ]
    broken = json.loads((spool / "failed" / "broken.error.json").read_text())
    assert broken["stage"] == "parse" and "line 1" in broken["reason"]
    wrong = json.loads((spool / "failed" / "wrong.error.json").read_text())
    assert wrong["stage"] == "validate" and wrong["path"].startswith("$.tests[0]")
    assert stats.empty == 1 and stats.failed == {"parse": 1, "validate": 1}
    assert counts(db_url)["tests"] == len(good["tests"])
    # the .tmp is taken once its writer renames it
    (spool / "half.json.tmp").unlink()
    put(spool, "half.json", other)
    run_once(make_app(), spool_config(spool))
    assert counts(db_url)["tests"] == 3387


def test_a_file_still_being_written_waits(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    put(spool, "fresh.json", split_document(sample("cki-v5.json"), 50)[0])
    stats = run_once(make_app(), spool_config(spool, settle=30.0))
    assert stats.files == 0 and names(spool) == ["fresh.json"]


def test_duplicate_submissions_are_idempotent(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    parts = split_document(sample("cki-v5.json"), 10)
    for i, part in enumerate(parts):
        put(spool, f"a-{i:02d}.json", part)
        put(spool, f"b-{i:02d}.json", part)  # the same content under another name
    app = make_app()
    run_once(app, spool_config(spool))
    expected = {"checkouts": 37, "builds": 140, "tests": 3387, "issues": 1, "incidents": 1138}
    assert counts(db_url) == expected
    put(spool, "a-00.json", parts[0])  # the same name again, after the first was archived
    run_once(app, spool_config(spool))
    assert counts(db_url) == expected
    archived = names(spool / "archive")
    assert len(archived) == 21 and "a-00.1.json" in archived


def test_first_non_null_value_wins(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    version = {"major": 5, "minor": 3}
    put(
        spool,
        "1.json",
        {
            "version": version,
            "tests": [{"id": "o:1", "build_id": "o:b", "origin": "o", "status": "FAIL"}],
        },
    )
    run_once(make_app(), spool_config(spool))
    put(
        spool,
        "2.json",
        {
            "version": version,
            "tests": [
                {"id": "o:1", "build_id": "o:b", "origin": "o", "status": "PASS", "comment": "late"}
            ],
        },
    )
    run_once(make_app(), spool_config(spool))
    assert query(db_url, "SELECT status, comment FROM kcidb_tests") == [("FAIL", "late")]


def test_long_text_goes_to_the_blob_store_once(make_app: Any, db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    excerpt = "kernel BUG at mm/slub.c:4025!\n" * 40
    version = {"major": 5, "minor": 3}
    for n in (1, 2):
        put(
            spool,
            f"{n}.json",
            {
                "version": version,
                "tests": [
                    {"id": f"o:{n}", "build_id": "o:b", "origin": "o", "log_excerpt": excerpt},
                    {"id": f"o:short{n}", "build_id": "o:b", "origin": "o", "log_excerpt": "short"},
                ],
            },
        )
    app = make_app()
    run_once(app, spool_config(spool, blobs=str(tmp_path / "blobs")))
    rows = dict(query(db_url, "SELECT id, log_excerpt FROM kcidb_tests"))
    assert rows["o:short1"] == "short"
    assert rows["o:1"] == rows["o:2"] and rows["o:1"].startswith("file://")
    stored = list((tmp_path / "blobs").rglob("*.txt"))
    assert len(stored) == 1 and stored[0].read_text() == excerpt
    assert stored[0].as_uri() == rows["o:1"]


def _lock(db_url: str, tmp_path: Path) -> tuple[Any, Any]:
    """Another client holding the write lock: (holder, release)."""
    if db_url.startswith("sqlite"):
        holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        return holder, holder.rollback
    engine = sa.create_engine(sqlalchemy_url(db_url))
    conn = engine.connect()
    conn.exec_driver_sql("LOCK TABLE kcidb_checkouts IN ACCESS EXCLUSIVE MODE")

    def release() -> None:
        conn.rollback()
        conn.close()
        engine.dispose()

    return conn, release


def test_database_outage_keeps_files_pending_and_retries(
    make_app: Any, db_url: str, tmp_path: Path
) -> None:
    app = make_app(
        """
        [sinks.kcidb]
        type = "kcidb"
        lock_timeout = 0.2
        """
    )
    spool = tmp_path / "spool"
    for i, part in enumerate(split_document(sample("cki-v5.json"), 4)):
        put(spool, f"p{i}.json", part)
    holder, release = _lock(db_url, tmp_path)
    ingester = app.ingester(spool_config(spool))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(stats=ingester.run(once=True)))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while ingester.stats.retried < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingester.stats.retried >= 2  # the batch failed and was tried again
        # nothing archived early, nothing lost
        assert names(spool / "archive") == [] and names(spool / "failed") == []
        assert names(spool) == ["p0.json", "p1.json", "p2.json", "p3.json"]
        if db_url.startswith("sqlite"):
            assert holder.execute("SELECT count(*) FROM kcidb_tests").fetchone() == (0,)
        else:
            assert holder.exec_driver_sql("SELECT count(*) FROM kcidb_tests").scalar() == 0
    finally:
        release()
        thread.join(timeout=60)
        ingester.writer.close()
    assert not thread.is_alive()
    assert result["stats"].files == 4
    assert names(spool / "archive") == ["p0.json", "p1.json", "p2.json", "p3.json"]
    assert counts(db_url)["tests"] == 3387
    kinds = [e.kind for e in app.events()]
    assert "ingest.retry" in kinds


def test_table_sink_maps_records_to_columns(make_app: Any, db_url: str, tmp_path: Path) -> None:
    engine = sa.create_engine(sqlalchemy_url(db_url))
    meta = sa.MetaData()
    readings = sa.Table(
        "test_readings",
        meta,
        sa.Column("station", sa.Text, primary_key=True),
        sa.Column("ts", sa.Double, primary_key=True),
        sa.Column("value", sa.Double),
        sa.Column("extra", sa.JSON),
    )
    meta.drop_all(engine)
    meta.create_all(engine)
    try:
        schema = {
            "type": "object",
            "required": ["readings"],
            "properties": {
                "readings": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"v": {"type": "number"}}},
                }
            },
        }
        (tmp_path / "readings.schema.json").write_text(json.dumps(schema))
        app = make_app(
            """
            [sinks.readings]
            type = "table"
            schema = "readings.schema.json"
            [sinks.readings.tables.readings]
            table = "test_readings"
            columns = { station = "station", t = "ts", v = "value", meta = "extra" }
            """
        )
        spool = tmp_path / "spool"
        put(
            spool,
            "ok.json",
            {
                "readings": [
                    {"station": "CE02", "t": 1.0, "v": 3.5, "meta": {"q": 1}},
                    {"station": "CE02", "t": 2.0, "v": 4.5},
                ]
            },
        )
        put(spool, "bad-type.json", {"readings": [{"station": "CE02", "t": 3.0, "v": "high"}]})
        put(spool, "no-key.json", {"readings": [{"t": 4.0, "v": 1.0}]})
        stats = run_once(app, spool_config(spool, sink="readings"))
        assert stats.files == 1 and stats.failed == {"validate": 1, "map": 1}
        bad = json.loads((spool / "failed" / "bad-type.error.json").read_text())
        assert bad["path"] == "$.readings[0].v" and "number" in bad["reason"]
        missing = json.loads((spool / "failed" / "no-key.error.json").read_text())
        assert missing == {
            "stage": "map",
            "reason": "key field 'station' is missing",
            "path": "$.readings[0].station",
            "file": "no-key.json",
        }
        with engine.connect() as conn:
            rows = conn.execute(sa.select(readings).order_by(readings.c.ts)).all()
        assert [(r.station, r.ts, r.value) for r in rows] == [
            ("CE02", 1.0, 3.5),
            ("CE02", 2.0, 4.5),
        ]
        assert rows[0].extra == {"q": 1}
    finally:
        meta.drop_all(engine)
        engine.dispose()


def test_writer_connection_killed_mid_batch(pg_url: str, tmp_path: Path) -> None:
    """PostgreSQL: the writer's backend terminated (pg_terminate_backend) while its
    batch waits for a lock: the batch is rolled back, tried again, and lands once."""
    app = Conveyor(make_config(tmp_path, pg_url))
    spool = tmp_path / "spool"
    for i, part in enumerate(split_document(sample("cki-v5.json"), 3)):
        put(spool, f"p{i}.json", part)
    _holder, release = _lock(pg_url, tmp_path)
    ingester = app.ingester(spool_config(spool))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(stats=ingester.run(once=True)))
    thread.start()
    watcher = sa.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    try:

        def waiting() -> list[Any]:
            with watcher.connect() as conn:
                return list(
                    conn.exec_driver_sql(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'INSERT INTO \"kcidb_checkouts\"%%'"
                    )
                )

        deadline = time.monotonic() + 20
        while not (pids := waiting()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids, "the writer never waited for the lock"
        with watcher.connect() as conn:
            for (pid,) in pids:
                conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        deadline = time.monotonic() + 20
        while ingester.stats.retried < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingester.stats.retried >= 1
        assert names(spool / "archive") == []
    finally:
        release()
        thread.join(timeout=60)
        ingester.writer.close()
        app.close()
        watcher.dispose()
    assert result["stats"].files == 3
    assert names(spool / "archive") == ["p0.json", "p1.json", "p2.json"]
    assert counts(pg_url) == {
        "checkouts": 37,
        "builds": 140,
        "tests": 3387,
        "issues": 1,
        "incidents": 1138,
    }


def test_a_file_that_cannot_be_moved_stays_pending_and_moves_later(
    make_app: Any, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its rows are in; the move fails (a disk error): the file stays in the spool, and
    the next run moves it without writing its rows twice."""
    spool = tmp_path / "spool"
    parts = split_document(sample("cki-v5.json"), 4)
    for i, part in enumerate(parts):
        put(spool, f"part-{i}.json", part)
    real_archive = Spool.archive

    def failing_archive(self: Spool, name: str) -> str:
        if name == "part-2.json":
            raise OSError(errno.EIO, "Input/output error")
        return real_archive(self, name)

    monkeypatch.setattr(Spool, "archive", failing_archive)
    app = make_app()
    stats = run_once(app, spool_config(spool))
    expected = {"checkouts": 37, "builds": 140, "tests": 3387, "issues": 1, "incidents": 1138}
    assert counts(db_url) == expected
    assert names(spool) == ["part-2.json"]
    assert names(spool / "archive") == ["part-0.json", "part-1.json", "part-3.json"]
    assert stats.files == 3
    monkeypatch.setattr(Spool, "archive", real_archive)
    stats = run_once(app, spool_config(spool))
    assert names(spool) == []
    assert "part-2.json" in names(spool / "archive")
    assert counts(db_url) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_the_database_refuses_fail_their_file_alone(
    make_app: Any, db_url: str, tmp_path: Path, workers: int
) -> None:
    """One file's rows break a constraint: that file goes to failed/ at the sink stage
    with the database's reason, and every other file of its batch is written."""
    engine = sa.create_engine(sqlalchemy_url(db_url))
    meta = sa.MetaData()
    readings = sa.Table(
        "test_refused",
        meta,
        sa.Column("station", sa.Text, primary_key=True),
        sa.Column("ts", sa.Double, primary_key=True),
        sa.Column("value", sa.Double, nullable=False),
    )
    meta.drop_all(engine)
    meta.create_all(engine)
    try:
        app = make_app(
            """
            [sinks.refused]
            type = "table"
            [sinks.refused.tables.readings]
            table = "test_refused"
            columns = { station = "station", t = "ts", v = "value" }
            """
        )
        spool = tmp_path / "spool"
        for i in range(40):
            readings_of = [{"station": "CE02", "t": float(i * 10 + j), "v": 1.5} for j in range(3)]
            if i == 17:
                readings_of[1].pop("v")  # NOT NULL column left empty
            put(spool, f"r-{i:02d}.json", {"readings": readings_of})
        stats = run_once(app, spool_config(spool, sink="refused", workers=workers))
        assert stats.files == 39 and stats.failed == {"sink": 1}
        assert names(spool / "failed") == ["r-17.error.json", "r-17.json"]
        error = json.loads((spool / "failed" / "r-17.error.json").read_text())
        assert error["stage"] == "sink" and "null" in error["reason"].lower()
        assert len(names(spool / "archive")) == 39
        with engine.connect() as conn:
            rows = conn.execute(sa.select(readings.c.ts)).scalars().all()
        assert sorted(rows) == sorted(
            float(i * 10 + j) for i in range(40) if i != 17 for j in range(3)
        )
    finally:
        meta.drop_all(engine)
        engine.dispose()
