"""`conveyor bench-ingest`: the ingester against what it replaces, in one run.

The real KCIDB samples are split into many small files and ingested with the `kcidb`
sink three ways, each into emptied tables of one scratch database:

- baseline: what the original ingester did, one file at a time in one process: parse,
  transforms, kcidb-io validation and upgrade, insert in a transaction of its own, move;
- ingester: Conveyor's pipeline (worker processes, one batching writer);
- bare insert: the same rows, already prepared, inserted in batches with no parsing or
  validation at all — the ceiling for the database.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kcidb_io
import sqlalchemy as sa

from conveyor.bench import scratch_database
from conveyor.ingest.offload import BlobSpec
from conveyor.ingest.pipeline import Ingester, make_plan
from conveyor.ingest.samples import split_samples, write_spool
from conveyor.ingest.settings import BUILTIN_KCIDB, SpoolConfig
from conveyor.ingest.sinks import Rows
from conveyor.ingest.sinks.kcidb import LISTS, KcidbSink
from conveyor.ingest.spool import Spool
from conveyor.ingest.transforms import RelativeUrls, Transforms, apply_before
from conveyor.ingest.writer import RowWriter, make_engine
from conveyor.store import open_store

SAMPLES = ("cki-v5.json", "cki-v1.json", "kernelci-v1.json")
# What the v1 samples need to ingest: HTTPS for git:// repositories, and their relative
# build logs placed where KernelCI stored them.
SAMPLE_TRANSFORMS = Transforms(
    url_rewrites=(("git://", "https://"),),
    relative_urls=RelativeUrls.RESOLVE,
    url_base="https://storage.kernelci.org/{revision_origin_id}/{architecture}/"
    "{misc.defconfig_full}/{misc.compiler}-{misc.compiler_version}/",
)


@dataclass(frozen=True)
class IngestBenchOptions:
    samples: Path
    files: int = 2000
    workers: int = 2
    database: str | None = None
    baseline_files: int | None = None  # None: all of them
    batch_rows: int = 5000
    repeat: int = 3


def _count_rows(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return sum(
            int(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() or 0)
            for t in LISTS.values()
        )


def _empty(engine: sa.Engine) -> None:
    """Every run starts on truly empty tables: DELETE would leave dead rows and index
    entries behind, slowing whichever run comes later."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(LISTS.values())}")
            return
        for t in LISTS.values():
            conn.exec_driver_sql(f"DELETE FROM {t}")


def run_ingest_bench(opts: IngestBenchOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Each of the three runs `repeat` times (interleaved, so a burst of load elsewhere on
    the machine hits all three alike); the fastest run of each is reported."""
    docs = [json.loads((opts.samples / name).read_text()) for name in SAMPLES]
    parts = split_samples(docs, opts.files)
    with (
        scratch_database(opts.database) as url,
        tempfile.TemporaryDirectory(prefix="conveyor-bench-ingest-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        store = open_store(url)
        store.upgrade()
        store.close()
        engine = make_engine(url)
        spool = SpoolConfig(
            name="bench",
            dir=tmp / "spool",
            sink="kcidb",
            workers=opts.workers,
            interval=0.05,
            settle=0.0,
            transforms=SAMPLE_TRANSFORMS,
            batch_rows=opts.batch_rows,
            batch_seconds=0.5,
        )
        plan = make_plan(spool, BUILTIN_KCIDB, engine, BlobSpec(url=str(tmp / "blobs")))
        writer = RowWriter(engine, plan.tables)
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ingester": [], "bare_insert": []}
        try:
            batches = _bare_batches(parts, opts.batch_rows)
            for n in range(1, opts.repeat + 1):
                say(f"run {n}/{opts.repeat}: baseline (per file parse, validate, insert, move)")
                base_parts = parts[: opts.baseline_files] if opts.baseline_files else parts
                write_spool(spool.dir, base_parts)
                files = Spool(spool.dir, 0)
                files.ensure()
                start = time.perf_counter()
                baseline(spool.dir, files, writer)
                took = time.perf_counter() - start
                runs["baseline"].append(_rates(len(base_parts), _count_rows(engine), took))
                _reset(engine, spool.dir)

                say(f"run {n}/{opts.repeat}: ingester ({opts.workers} worker processes)")
                write_spool(spool.dir, parts)
                ingester = Ingester(spool, plan, writer)
                start = time.perf_counter()
                stats = ingester.run(once=True)
                took = time.perf_counter() - start
                run = _rates(stats.files, _count_rows(engine), took)
                run["failed"] = stats.failed_total
                runs["ingester"].append(run)
                _reset(engine, spool.dir)

                say(f"run {n}/{opts.repeat}: bare batched insert of the same rows")
                start = time.perf_counter()
                for batch in batches:
                    writer.commit(batch)
                took = time.perf_counter() - start
                runs["bare_insert"].append(_rates(len(parts), _count_rows(engine), took))
                _reset(engine, spool.dir)
        finally:
            writer.close()
    results: dict[str, Any] = {"files": len(parts), "database": engine.dialect.name}
    for name, done in runs.items():
        results[name] = min(done, key=lambda r: float(r["seconds"]))
        results[name]["all_seconds"] = [r["seconds"] for r in done]
    b, i, bare = results["baseline"], results["ingester"], results["bare_insert"]
    results["rows"] = i["rows"]
    results["ingester_vs_baseline_files"] = round(i["files_per_s"] / b["files_per_s"], 2)
    results["ingester_vs_bare_rows"] = round(i["rows_per_s"] / bare["rows_per_s"], 3)
    return results


def _bare_batches(parts: list[dict[str, Any]], batch_rows: int) -> list[Rows]:
    """The rows of every part (transformed and upgraded, not validated), in batches."""
    latest = kcidb_io.schema.LATEST
    sink = KcidbSink()
    batches: list[Rows] = [{}]
    n = 0
    for part in parts:
        doc = apply_before(json.loads(json.dumps(part)), SAMPLE_TRANSFORMS)
        for table, rows_of in sink.rows(latest.upgrade(doc, copy=False)).items():
            batches[-1].setdefault(table, []).extend(rows_of)
            n += len(rows_of)
        if n >= batch_rows:
            batches.append({})
            n = 0
    return batches


def _reset(engine: sa.Engine, folder: Path) -> None:
    _empty(engine)
    shutil.rmtree(folder, ignore_errors=True)


def baseline(folder: Path, files: Spool, writer: RowWriter) -> None:
    """The original ingester's work, file by file: parse, transforms, kcidb-io
    validation and upgrade, an insert in a transaction of its own, the move."""
    latest = kcidb_io.schema.LATEST
    sink = KcidbSink()
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_bytes())
        apply_before(doc, SAMPLE_TRANSFORMS)
        latest.validate(doc)
        doc = latest.upgrade(doc, copy=False)
        writer.commit(sink.rows(doc))
        files.archive(path.name)


def _rates(files: int, rows: int, seconds: float) -> dict[str, Any]:
    return {
        "files": files,
        "rows": rows,
        "seconds": round(seconds, 3),
        "files_per_s": round(files / seconds, 1),
        "rows_per_s": round(rows / seconds, 1),
    }
