"""The per-file stages before the database, run in worker processes (they are
CPU-bound): read → parse → transforms → validate (and upgrade) → tree names → offload
of long text → rows. Pure but for reading the file and storing long text."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from conveyor.ingest.offload import BlobSpec, Offloader, OffloadUnavailable, open_blob_store
from conveyor.ingest.sinks import MappingError, Sink, TableSpec
from conveyor.ingest.sinks.kcidb import KcidbSink
from conveyor.ingest.sinks.table import TableMapping, TableSink
from conveyor.ingest.spool import FileError, Stage, read_file
from conveyor.ingest.transforms import TransformError, Transforms, apply_after, apply_before
from conveyor.ingest.validate import (
    Invalid,
    JsonSchemaValidator,
    KcidbValidator,
    NotUpgradable,
    NoValidation,
    Validator,
)
from conveyor.ingest.writer import Encoded, encode_rows, merge_parts


class Outcome(StrEnum):
    ROWS = "rows"  # ready for the writer
    FAILED = "failed"  # goes to failed/
    RETRY = "retry"  # a transient failure (the blob store): stays pending
    EMPTY = "empty"  # an empty file: deleted


@dataclass(frozen=True)
class Plan:
    """Everything a worker process needs, sent to it once."""

    spool_dir: str
    sink_name: str
    sink_type: str  # kcidb | table
    tables: Mapping[str, TableSpec]
    mappings: tuple[TableMapping, ...] = ()
    schema: Any = None
    transforms: Transforms = field(default_factory=Transforms)
    blobs: BlobSpec | None = None  # None: long text stays in the rows
    text_threshold: int = 256
    offload_fields: tuple[str, ...] = ("log_excerpt",)
    offload_timeout: float = 10.0
    offload_cache: int = 100_000
    dialect: str = "postgresql"  # the sink database's, for rows encoded its way


@dataclass(frozen=True)
class Prepared:
    name: str
    outcome: Outcome
    rows: Encoded = field(default_factory=dict)
    count: int = 0
    size: int = 0
    error: FileError | None = None


@dataclass(frozen=True)
class Chunk:
    """Several files prepared together, as a worker process sends them back: the rows
    of those that made rows already merged per table (so what crosses to the writer,
    and what it handles, grows with the tables, not with the files), and the files
    that failed or are to be tried again one by one. Their order is the files'."""

    files: tuple[tuple[str, int], ...] = ()  # (name, rows) of the files in `rows`
    rows: Encoded = field(default_factory=dict)
    count: int = 0  # rows in all
    size: int = 0  # bytes of those files
    others: tuple[Prepared, ...] = ()  # outcome FAILED, RETRY or EMPTY

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.files]


def gather(prepared: list[Prepared]) -> Chunk:
    files: list[tuple[str, int]] = []
    parts: dict[str, list[Any]] = {}
    others: list[Prepared] = []
    count = size = 0
    for p in prepared:
        if p.outcome is not Outcome.ROWS:
            others.append(p)
            continue
        files.append((p.name, p.count))
        count += p.count
        size += p.size
        for table, table_rows in p.rows.items():
            parts.setdefault(table, []).append(table_rows)
    rows = {table: merge_parts(table_parts) for table, table_parts in parts.items()}
    return Chunk(tuple(files), rows, count, size, tuple(others))


class Stages:
    """The stages of one plan, built once per process."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.spool_dir = os.path.join(plan.spool_dir, "")  # ends with a separator
        self.validator: Validator
        self.sink: Sink
        if plan.sink_type == "kcidb":
            self.validator = KcidbValidator()
            self.sink = KcidbSink(plan.sink_name, plan.tables)
        else:
            self.validator = (
                JsonSchemaValidator(plan.schema) if plan.schema is not None else NoValidation()
            )
            self.sink = TableSink(plan.sink_name, plan.mappings, plan.tables)
        self.offloader = (
            Offloader(
                open_blob_store(plan.blobs),
                threshold=plan.text_threshold,
                fields=plan.offload_fields,
                cache_size=plan.offload_cache,
                timeout=plan.offload_timeout,
            )
            if plan.blobs
            else None
        )

    def warm(self) -> None:
        """Do the one-off work (compiling the latest schema) now, not on the first file."""
        warm = getattr(self.validator, "warm", None)
        if warm is not None:
            warm()

    def run(self, name: str) -> Prepared:
        def failed(stage: Stage, reason: str, path: str | None = None) -> Prepared:
            return Prepared(name, Outcome.FAILED, error=FileError(stage, reason, path))

        try:
            raw = read_file(self.spool_dir + name)
        except FileNotFoundError:
            return Prepared(name, Outcome.RETRY, error=FileError(Stage.READ, "file vanished"))
        except OSError as exc:
            return failed(Stage.READ, exc.strerror or str(exc))
        if not raw:
            return Prepared(name, Outcome.EMPTY)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return failed(
                Stage.PARSE, f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            )
        except UnicodeDecodeError as exc:
            return failed(Stage.PARSE, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
        try:
            doc = apply_before(doc, self.plan.transforms)
        except TransformError as exc:
            return failed(Stage.TRANSFORM, exc.reason, exc.path)
        try:
            doc = self.validator(doc)
        except NotUpgradable as exc:
            located = exc.located(apply_before(orjson.loads(raw), self.plan.transforms))
            return failed(Stage.VALIDATE, located.reason, located.path)
        except Invalid as exc:
            return failed(Stage.VALIDATE, exc.reason, exc.path)
        except RecursionError:
            return failed(Stage.VALIDATE, "nested too deeply")
        doc = apply_after(doc, self.plan.transforms)
        if self.offloader is not None:
            try:
                self.offloader(doc, shallow=self.plan.sink_type == "kcidb")
            except OffloadUnavailable as exc:
                return Prepared(name, Outcome.RETRY, error=FileError(Stage.OFFLOAD, str(exc)))
        try:
            rows = self.sink.rows(doc)
        except MappingError as exc:
            return failed(Stage.MAP, exc.reason, exc.path)
        count = sum(len(r) for r in rows.values())
        encoded = encode_rows(rows, self.plan.tables, self.plan.dialect)
        return Prepared(name, Outcome.ROWS, encoded, count, len(raw))
