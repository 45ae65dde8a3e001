"""The pure parts of ingestion: transforms, row merging, splitting, settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from conveyor.config import ConfigError, parse_config
from conveyor.ingest.samples import OBJECT_LISTS, split_document, split_samples
from conveyor.ingest.sinks import TableSpec
from conveyor.ingest.spool import _free, read_file
from conveyor.ingest.transforms import (
    RelativeUrls,
    TransformError,
    Transforms,
    apply_after,
    apply_before,
    load_trees,
)
from conveyor.ingest.writer import encode_rows, json_rows, merge_parts, merge_rows, tuple_rows
from ingest_support import SAMPLES


def test_url_rewrites_and_origins() -> None:
    t = Transforms(url_rewrites=(("git://", "https://"),), origins={"kernelci": "maestro"})
    doc = {
        "revisions": [{"origin": "kernelci", "git_repository_url": "git://git.kernel.org/a.git"}],
        "builds": [{"output_files": [{"name": "x", "url": "git://h/x"}], "comment": "git://no"}],
    }
    apply_before(doc, t)
    assert doc["revisions"][0] == {
        "origin": "maestro",
        "git_repository_url": "https://git.kernel.org/a.git",
    }
    assert doc["builds"][0]["output_files"][0]["url"] == "https://h/x"
    assert doc["builds"][0]["comment"] == "git://no"  # not a URL field


def test_relative_urls_kept_resolved_per_object_or_dropped() -> None:
    build = {"log_url": "build.log", "arch": "x86_64", "misc": {"cfg": "defconfig+kselftest"}}
    kept = apply_before({"builds": [dict(build)]}, Transforms())
    assert kept["builds"][0]["log_url"] == "build.log"
    resolved = apply_before(
        {"builds": [dict(build)]},
        Transforms(relative_urls=RelativeUrls.RESOLVE, url_base="https://s.org/{arch}/{misc.cfg}/"),
    )
    assert (
        resolved["builds"][0]["log_url"] == "https://s.org/x86_64/defconfig%2Bkselftest/build.log"
    )
    dropped = apply_before({"builds": [dict(build)]}, Transforms(relative_urls=RelativeUrls.DROP))
    assert "log_url" not in dropped["builds"][0]
    with pytest.raises(TransformError) as err:
        apply_before(
            {"builds": [{"log_url": "b.log"}]},
            Transforms(relative_urls=RelativeUrls.RESOLVE, url_base="https://s.org/{arch}/"),
        )
    assert err.value.path == "$.builds[0].log_url" and "'arch'" in err.value.reason


def test_tree_names_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "trees.yaml"
    path.write_text("mainline: https://git.kernel.org/torvalds/linux.git/\n")
    t = Transforms(trees=load_trees(path))
    doc = {
        "checkouts": [
            {"git_repository_url": "https://git.kernel.org/torvalds/linux.git"},
            {"git_repository_url": "https://other", "tree_name": "kept"},
        ]
    }
    apply_after(doc, t)
    assert [c.get("tree_name") for c in doc["checkouts"]] == ["mainline", "kept"]
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping of tree name to URL"):
        load_trees(path)


def test_merge_rows_keeps_the_first_non_null_value() -> None:
    rows = [
        {"id": "a", "status": "FAIL", "comment": None},
        {"id": "b", "status": "PASS", "comment": None},
        {"id": "a", "status": "PASS", "comment": "later"},
    ]
    assert merge_rows(rows, ("id",)) == [
        {"id": "a", "status": "FAIL", "comment": "later"},
        {"id": "b", "status": "PASS", "comment": None},
    ]


def test_rows_of_several_files_merge_as_merge_rows_does() -> None:
    spec = TableSpec("t", ("id",), ("id", "status", "comment"), ("text",) * 3, frozenset())
    files = [
        [{"id": "a", "status": "FAIL"}, {"id": "b", "status": "PASS"}],
        [{"id": "c", "status": "PASS", "comment": "alone"}],
        [{"id": "a", "status": "PASS", "comment": "later"}, {"id": "a", "comment": "last"}],
        [],
    ]
    every = [row for rows in files for row in rows]
    by_id = {row["id"]: row for row in merge_rows(every, ("id",))}
    assert by_id["a"] == {"id": "a", "status": "FAIL", "comment": "later"}
    parts = [encode_rows({"t": rows}, {"t": spec}, "postgresql")["t"] for rows in files]
    assert {r["id"]: r for r in orjson.loads(json_rows(parts))} == by_id
    assert orjson.loads(json_rows(parts[1:2] + parts[3:])) == files[1]
    parts = [encode_rows({"t": rows}, {"t": spec}, "sqlite")["t"] for rows in files]
    expected = {k: tuple(r.get(c) for c in spec.columns) for k, r in by_id.items()}
    assert {r[0]: r for r in tuple_rows(parts)} == expected


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_files_merged_in_chunks_then_across_chunks_merge_as_merge_rows_does(
    dialect: str,
) -> None:
    """A worker merges the files it prepared together; the writer merges the chunks of
    a batch: the keys stay in step with the rows, and the first non-null value wins."""
    spec = TableSpec("t", ("id",), ("id", "status", "comment"), ("text",) * 3, frozenset())
    files = [
        [{"id": "a", "status": "FAIL"}, {"id": "b"}],
        [{"id": "b", "status": "PASS"}, {"id": "c", "comment": "c1"}],
        [{"id": "a", "comment": "a2"}],
        [{"id": "d", "status": "SKIP"}],
        [{"id": "c", "status": "DONE", "comment": "c2"}, {"id": "a", "status": "PASS"}],
    ]
    expected = merge_rows([row for rows in files for row in rows], ("id",))
    parts = [encode_rows({"t": rows}, {"t": spec}, dialect)["t"] for rows in files]
    chunks = [merge_parts(parts[:2]), merge_parts(parts[2:4]), merge_parts(parts[4:])]
    keys, payload = merge_parts(chunks)
    if dialect == "postgresql":
        assert isinstance(payload, bytes)
        rows = orjson.loads(payload)
    else:
        assert isinstance(payload, list)
        rows = [dict(zip(spec.columns, r, strict=True)) for r in payload]
    assert keys == [r["id"] for r in rows]
    by_id = {r["id"]: {c: r.get(c) for c in spec.columns} for r in rows}
    assert by_id == {r["id"]: {c: r.get(c) for c in spec.columns} for r in expected}


def test_a_composite_key_is_a_tuple_and_no_key_merges_everything() -> None:
    spec = TableSpec("t", ("id", "version"), ("id", "version"), ("text", "int"), frozenset())
    rows = [{"id": "a", "version": 1}, {"id": "a", "version": 2}, {"id": "a", "version": 1}]
    assert encode_rows({"t": rows}, {"t": spec}, "postgresql")["t"][0] == [
        ("a", 1),
        ("a", 2),
        ("a", 1),
    ]
    assert merge_rows(rows, ("id", "version")) == rows[:2]
    assert merge_rows(rows, ()) == rows[:1]


def test_split_keeps_every_object_once() -> None:
    doc = {"version": "1", "revisions": [{"i": i} for i in range(7)], "tests": [{"i": 1}]}
    parts = split_document(doc, 3)
    assert all(p["version"] == "1" for p in parts)
    assert sum(len(p.get("revisions", [])) for p in parts) == 7
    merged = split_samples([doc, {"version": "1", "tests": [{"i": 2}] * 5}], 10)
    assert sum(len(p.get(k) or []) for p in merged for k in OBJECT_LISTS) == 13


def test_a_name_already_archived_gets_a_free_one(tmp_path: Path) -> None:
    assert _free(tmp_path, "a.json") == tmp_path / "a.json"
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "a.1.json").write_text("{}")
    assert _free(tmp_path, "a.json") == tmp_path / "a.2.json"


def test_read_file_reads_small_large_and_empty_files(tmp_path: Path) -> None:
    for size in (0, 10, (1 << 20) + 7, 3 << 20):
        path = tmp_path / f"f{size}.json"
        data = bytes(i % 251 for i in range(size))
        path.write_bytes(data)
        assert read_file(str(path)) == data
    with pytest.raises(FileNotFoundError):
        read_file(str(tmp_path / "gone.json"))


def test_spool_settings_are_checked(tmp_path: Path) -> None:
    env = {"CONVEYOR_DATABASE_URL": "sqlite:///x.db"}
    with pytest.raises(ConfigError, match=r"spools\.k\.sink: no sink 'nope'"):
        parse_config({"spools": {"k": {"dir": "s", "sink": "nope"}}}, tmp_path, env)
    with pytest.raises(ConfigError, match="a table sink needs tables"):
        parse_config({"sinks": {"t": {"type": "table"}}}, tmp_path, env)
    cfg = parse_config(
        {
            "spools": {
                "k": {
                    "dir": "s",
                    "transforms": {"url_rewrites": {"git://": "https://"}},
                    "batch_rows": 10,
                    "prepare_timeout": 5,
                }
            }
        },
        tmp_path,
        env,
    )
    spool = cfg.spools["k"]
    assert spool.dir == (tmp_path / "s").resolve() and spool.batch_rows == 10
    assert spool.transforms.url_rewrites == (("git://", "https://"),)
    assert spool.prepare_timeout == 5 and cfg.spools["k"].workers == 2
    with pytest.raises(ConfigError, match="prepare_timeout"):
        parse_config({"spools": {"k": {"dir": "s", "prepare_timeout": 0}}}, tmp_path, env)


class _HungStore:
    """A blob store that never answers (a stalled upload)."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self.release.wait(10)
        return f"mem://{key}"

    def exists(self, key: str) -> bool:
        return False


def test_a_hung_blob_store_times_out_and_the_cache_is_bounded(tmp_path: Path) -> None:
    import time

    from conveyor.artifacts import ArtifactError
    from conveyor.ingest.offload import BlobSpec, Offloader, OffloadUnavailable, open_blob_store

    hung = _HungStore()
    slow = Offloader(hung, threshold=4, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(OffloadUnavailable, match=r"within 0\.2s"):
        slow({"tests": [{"log_excerpt": "x" * 10}]}, shallow=True)
    assert time.monotonic() - start < 2
    hung.release.set()
    slow.close()

    store = open_blob_store(BlobSpec(url=str(tmp_path)))
    off = Offloader(store, threshold=4, cache_size=2)
    docs = [{"tests": [{"log_excerpt": f"text {i}"}]} for i in range(5)]
    for doc in docs:
        assert off(doc) == 1
    assert len(off.cache._d) == 2  # bounded
    assert all(d["tests"][0]["log_excerpt"].startswith("file://") for d in docs)
    with pytest.raises(ArtifactError):
        store.put_bytes("../escape.txt", b"x")


def test_prepared_files_waiting_for_the_writer_are_bounded_by_a_batch() -> None:
    import threading

    from conveyor.ingest.pipeline import _Handoff
    from conveyor.ingest.prepare import Chunk

    def chunk(n: int, rows: int = 3, size: int = 100) -> Chunk:
        return Chunk(((f"f{n}.json", rows),), count=rows, size=size)

    handoff = _Handoff(rows=10, size=10_000)
    for n in range(4):  # 12 rows: the bound is reached
        handoff.put(chunk(n))
    blocked = threading.Thread(target=handoff.put, args=(chunk(4),), daemon=True)
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the workers' side waits: the backlog stays on disk
    handoff.put(None)  # markers always get in
    assert handoff.get(1) == chunk(0)
    assert handoff.get(1) == chunk(1)
    blocked.join(2)
    assert not blocked.is_alive()
    assert [handoff.get(1) for _ in range(4)][-2:] == [None, chunk(4)]
    # a chunk bigger than the whole bound still passes when nothing else waits
    handoff.put(chunk(5, rows=50, size=10**6))
    assert handoff.get(1) == chunk(5, rows=50, size=10**6) and handoff.empty()


def test_kcidb_version_found_for_every_spelling_and_refused_when_unknown() -> None:
    from conveyor.ingest.validate import Invalid, KcidbValidator

    validate = KcidbValidator()
    for _ in range(2):  # the second time from what the first found
        assert validate({"version": {"major": 5, "minor": 3}}) == {
            "version": {"major": 5, "minor": 3}
        }
        upgraded = validate({"version": {"minor": 0, "major": 4}, "checkouts": []})
        assert upgraded["version"] == {"major": 5, "minor": 3}
    for bad in ({"major": 99, "minor": 0}, {"major": [5], "minor": 3}, "nine"):
        with pytest.raises(Invalid) as err:
            validate({"version": bad})
        assert err.value.path == "$.version" and "no KCIDB schema version" in err.value.reason


def test_scan_takes_settled_files_and_deletes_settled_empty_ones(tmp_path: Path) -> None:
    import os
    import time

    from conveyor.ingest.spool import Spool

    old = time.time() - 60
    for name, text in [("b.json", "{}"), ("a.json", "{}"), ("empty.json", ""), ("x.txt", "")]:
        (tmp_path / name).write_text(text)
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "fresh.json").write_text("{}")
    (tmp_path / "fresh-empty.json").write_text("")
    (tmp_path / "c.json.tmp").write_text("{")
    settled = Spool(tmp_path, settle=5.0)
    assert settled.scan(skip={"b.json"}) == (["a.json"], 1)
    assert not (tmp_path / "empty.json").exists()
    assert (tmp_path / "fresh-empty.json").exists()  # its writer may be at work
    # with no settle time the scan only lists: empty files are deleted once read
    atomic = Spool(tmp_path, settle=0)
    assert atomic.scan() == (["a.json", "b.json", "fresh-empty.json", "fresh.json"], 0)
    assert atomic.scan(limit=1) == (["a.json"], 0)
    assert atomic.delete_empty("fresh.json") == 0 and (tmp_path / "fresh.json").exists()
    assert atomic.delete_empty("fresh-empty.json") == 1
    assert atomic.delete_empty("gone.json") == 0


def _broken_variants(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of a KCIDB document with one defect each, deep in its arrays."""
    out = []
    for key in ("checkouts", "builds", "tests", "incidents", "revisions"):
        for field, bad in (("id", 5), ("origin", "Bad Origin"), ("no_such_field", 1)):
            if doc.get(key):
                copy = orjson.loads(orjson.dumps(doc))
                copy[key][-1][field] = bad
                out.append(copy)
    if doc.get("tests"):
        copy = orjson.loads(orjson.dumps(doc))
        copy["tests"][0]["environment"] = {"compatible": ["ok", 7]}
        out.append(copy)
        copy = orjson.loads(orjson.dumps(doc))
        copy["tests"][0]["log_url"] = "not a uri"
        out.append(copy)
    return out


def test_compiled_kcidb_schemas_judge_as_fastjsonschema_does() -> None:
    """The validators with array items named by concatenation accept and refuse exactly
    what fastjsonschema's own do, with the same messages, on every sample part and on
    broken copies of them, in every schema version the samples use."""
    import fastjsonschema
    import kcidb_io

    from conveyor.ingest.validate import _compiled

    docs = [
        orjson.loads((SAMPLES / n).read_bytes())
        for n in ("cki-v5.json", "cki-v1.json", "kernelci-v1.json")
    ]
    parts = split_samples(docs, 60)
    checked = refused = 0
    for part in parts:
        version = kcidb_io.schema.LATEST.get_exactly_compatible(part)
        assert version is not None
        ours, theirs = _compiled(version), fastjsonschema.compile(version.json)
        for doc in [part, *_broken_variants(part)]:
            verdicts = []
            for validate in (ours, theirs):
                try:
                    validate(orjson.loads(orjson.dumps(doc)))
                    verdicts.append(None)
                except fastjsonschema.JsonSchemaValueException as exc:
                    verdicts.append((exc.message, exc.name, exc.rule))
            assert verdicts[0] == verdicts[1], (version, doc)
            checked += 1
            refused += verdicts[0] is not None
    assert checked > 500 and refused > 400
