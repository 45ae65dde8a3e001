"""Helpers of the ingestion tests: the real KCIDB samples, spools, row counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from conveyor.ingest.pipeline import IngestStats
from conveyor.ingest.settings import SpoolConfig
from conveyor.ingest.transforms import RelativeUrls, Transforms
from conveyor.store.postgres import sqlalchemy_url

SAMPLES = Path(__file__).resolve().parent / "data" / "kcidb"
KCIDB_TABLES = ("checkouts", "builds", "tests", "issues", "incidents")
# What the v1 samples need: HTTPS repositories, and their relative build logs resolved
# against the directory KernelCI kept each build in.
V1_TRANSFORMS = Transforms(
    url_rewrites=(("git://", "https://"),),
    relative_urls=RelativeUrls.RESOLVE,
    url_base="https://storage.kernelci.org/{revision_origin_id}/{architecture}/"
    "{misc.defconfig_full}/{misc.compiler}-{misc.compiler_version}/",
)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


def put(spool: Path, name: str, doc: Any) -> Path:
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / name
    tmp = spool / (name + ".tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    tmp.rename(path)
    return path


def copy_sample(spool: Path, name: str) -> Path:
    spool.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SAMPLES / name, spool / name))


def counts(db_url: str) -> dict[str, int]:
    engine = sa.create_engine(sqlalchemy_url(db_url))
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.exec_driver_sql(f"SELECT count(*) FROM kcidb_{t}").scalar() or 0)
                for t in KCIDB_TABLES
            }
    finally:
        engine.dispose()


def query(db_url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(sqlalchemy_url(db_url))
    try:
        with engine.connect() as conn:
            return list(conn.exec_driver_sql(sql))
    finally:
        engine.dispose()


def spool_config(spool: Path, **kw: Any) -> SpoolConfig:
    base: dict[str, Any] = {
        "name": "test",
        "dir": spool,
        "sink": "kcidb",
        "workers": 0,
        "interval": 0.05,
        "settle": 0.0,
    }
    base.update(kw)
    return SpoolConfig(**base)


def run_once(app: Any, spool: SpoolConfig) -> IngestStats:
    ingester = app.ingester(spool)
    try:
        stats: IngestStats = ingester.run(once=True)
        return stats
    finally:
        ingester.writer.close()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
