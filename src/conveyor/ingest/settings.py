"""Ingestion settings: `[spools.NAME]` and `[sinks.NAME]` in conveyor.toml, read into
immutable values.

    [sinks.kcidb]
    type = "kcidb"                 # or "table"
    # database = "postgresql://…"  # default: Conveyor's own database

    [spools.kernelci]
    dir = "spool/kernelci"
    sink = "kcidb"
    workers = 2                    # parsing/validation processes (0: in-process)
    interval = 5                   # seconds between scans
    text_threshold = 256           # longer text fields go to the blob store
    transforms = { trees = "trees.yaml", url_rewrites = { "git://" = "https://" } }
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.ingest.transforms import RelativeUrls, Transforms, load_trees


class _TransformModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trees: str | None = None
    url_rewrites: dict[str, str] = {}
    relative_urls: RelativeUrls = RelativeUrls.KEEP
    url_base: str | None = None
    origins: dict[str, str] = {}


class SpoolModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: str
    sink: str = "kcidb"
    workers: int = Field(default=2, ge=0, le=64)
    interval: float = Field(default=5.0, gt=0)
    settle: float = Field(default=1.0, ge=0)
    transforms: _TransformModel = _TransformModel()
    text_threshold: int = Field(default=256, ge=1)
    offload_fields: list[str] = ["log_excerpt"]
    offload_timeout: float = Field(default=10.0, gt=0)
    offload_cache: int = Field(default=100_000, ge=1)
    prepare_timeout: float = Field(default=60.0, gt=0)
    blobs: str | None = None  # an artifact store URL or directory; default: [artifacts]
    batch_rows: int = Field(default=5000, ge=1)
    batch_bytes: int = Field(default=8 << 20, ge=1024)
    batch_seconds: float = Field(default=1.0, ge=0)


class _TableModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str
    key: list[str] | None = None
    columns: dict[str, str] = {}


class SinkModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["kcidb", "table"]
    database: str | None = None
    lock_timeout: float = Field(default=60.0, gt=0)
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    tables: dict[str, _TableModel] = {}


@dataclass(frozen=True)
class TableTarget:
    path: str  # where the records are in a document: `$` or a top-level key
    table: str
    key: tuple[str, ...] | None  # None: the table's primary key
    columns: Mapping[str, str]  # record field -> column (empty: same names)


@dataclass(frozen=True)
class SinkConfig:
    name: str
    type: Literal["kcidb", "table"]
    database: str | None = None
    lock_timeout: float = 60.0  # seconds a write waits for another client's lock
    schema: Any = None
    tables: tuple[TableTarget, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    name: str
    dir: Path
    sink: str
    workers: int = 2
    interval: float = 5.0
    settle: float = 1.0
    transforms: Transforms = field(default_factory=Transforms)
    text_threshold: int = 256
    offload_fields: tuple[str, ...] = ("log_excerpt",)
    offload_timeout: float = 10.0
    offload_cache: int = 100_000
    # seconds a worker process may take over one file (the whole chunk: this times its
    # files) before it is killed and the files are taken again
    prepare_timeout: float = 60.0
    blobs: str | None = None  # a store URL or directory; None: the artifact store
    batch_rows: int = 5000
    batch_bytes: int = 8 << 20
    batch_seconds: float = 1.0


def transforms_of(m: _TransformModel, base: Path) -> Transforms:
    return Transforms(
        url_rewrites=tuple(m.url_rewrites.items()),
        relative_urls=m.relative_urls,
        url_base=m.url_base,
        origins=dict(m.origins),
        trees=load_trees((base / m.trees).resolve()) if m.trees else {},
    )


def spool_config(name: str, m: SpoolModel, base: Path) -> SpoolConfig:
    try:
        transforms = transforms_of(m.transforms, base)
    except ValueError as exc:
        raise ValueError(f"spools.{name}.transforms.trees: {exc}") from None
    return SpoolConfig(
        name=name,
        dir=(base / m.dir).resolve(),
        sink=m.sink,
        workers=m.workers,
        interval=m.interval,
        settle=m.settle,
        transforms=transforms,
        text_threshold=m.text_threshold,
        offload_fields=tuple(m.offload_fields),
        offload_timeout=m.offload_timeout,
        offload_cache=m.offload_cache,
        prepare_timeout=m.prepare_timeout,
        blobs=(m.blobs if m.blobs is None or "://" in m.blobs else str((base / m.blobs).resolve())),
        batch_rows=m.batch_rows,
        batch_bytes=m.batch_bytes,
        batch_seconds=m.batch_seconds,
    )


def sink_config(name: str, m: SinkModel, base: Path) -> SinkConfig:
    schema = m.schema_
    if isinstance(schema, str):
        path = (base / schema).resolve()
        try:
            schema = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"sinks.{name}.schema: cannot read {path}: {exc}") from None
    if m.type == "table" and not m.tables:
        raise ValueError(f"sinks.{name}: a table sink needs tables = {{ path = {{ table = … }} }}")
    return SinkConfig(
        name=name,
        type=m.type,
        database=m.database,
        lock_timeout=m.lock_timeout,
        schema=schema,
        tables=tuple(
            TableTarget(
                path=path,
                table=t.table,
                key=tuple(t.key) if t.key else None,
                columns=dict(t.columns),
            )
            for path, t in m.tables.items()
        ),
    )


BUILTIN_KCIDB = SinkConfig(name="kcidb", type="kcidb")
