"""Loading SQLite result files (the `spotbot.db` a Spotbot run writes) into database
tables, by a mapping:

    # spotbot.mapping.toml
    [[tables]]
    source = "annotation_header"     # table in the SQLite file
    target = "annotation_header"     # table in the database
    key = "header_id"                # the source's id, for child rows to refer to
    # columns = { source_bin = "source_bin" }   # default: the columns both have

    [[tables]]
    source = "annotation"
    target = "annotation"
    parent = { table = "annotation_header", column = "header_id", target_column = "header_ref" }

A child row's `column` (the parent's source id) becomes `target_column`: the id the
parent row got in the database. Every target table has a `load_key` column, and
`request_id`, `task_id` and `loaded_at` when it wants them. One file is loaded in one
transaction: all of it or nothing. A load first removes what an earlier load of the
same key (`task:<id>`, or the file's path) put there, so loading again is idempotent.
"""

from __future__ import annotations

import os
import sqlite3
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, ValidationError

from conveyor.ingest.writer import describe

_CHUNK = 5000
_EXTRA = ("load_key", "request_id", "task_id", "loaded_at")  # filled in by the loader


class LoadError(ValueError):
    """The file or the mapping is wrong (names the table or column)."""


class ResultFileRefused(LoadError):
    """The result file a task names is not one it may load (a relative name with no work
    directory, or outside the pipeline's roots): trying again would not change that."""


class LoadStopped(Exception):
    """A load rolled back because it was no longer wanted (the message says why)."""


class _ParentModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    table: str
    column: str
    target_column: str


class _TableModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str
    target: str
    key: str | None = None
    columns: dict[str, str] = {}
    parent: _ParentModel | None = None


class _MappingModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tables: list[_TableModel]


@dataclass(frozen=True)
class ParentLink:
    table: str  # the parent's source table
    column: str  # the child's source column holding the parent's source key
    target_column: str  # the child's target column for the parent's database id


@dataclass(frozen=True)
class TableMap:
    source: str
    target: str
    key: str | None
    columns: Mapping[str, str]  # source column -> target column (empty: shared names)
    parent: ParentLink | None


@dataclass(frozen=True)
class SqliteMapping:
    tables: tuple[TableMap, ...]


@dataclass(frozen=True)
class LoadResult:
    file: str
    load_key: str
    rows: Mapping[str, int]  # target table -> rows loaded

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def read_mapping(path: Path) -> SqliteMapping:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LoadError(f"cannot read mapping {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise LoadError(f"mapping {path} cannot be read: {exc}") from None
    try:
        model = _MappingModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise LoadError(f"mapping {path}: {loc}: {err['msg']}") from None
    seen: set[str] = set()
    tables = []
    for m in model.tables:
        if m.parent is not None and m.parent.table not in seen:
            raise LoadError(
                f"mapping {path}: {m.source}: its parent {m.parent.table!r} must be listed "
                "before it"
            )
        seen.add(m.source)
        parent = ParentLink(**m.parent.model_dump()) if m.parent else None
        tables.append(TableMap(m.source, m.target, m.key, dict(m.columns), parent))
    for t in tables:
        if t.parent and next(p for p in tables if p.source == t.parent.table).key is None:
            raise LoadError(f"mapping {path}: {t.parent.table} is a parent, so it needs a key")
    return SqliteMapping(tuple(tables))


def _source_columns(db: sqlite3.Connection, table: str) -> list[str]:
    cols = [r[1] for r in db.execute("SELECT * FROM pragma_table_info(?)", (table,))]
    if not cols:
        raise LoadError(f"the result file has no table {table!r}")
    return cols


def _rows(db: sqlite3.Connection, table: str, cols: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    quoted = ", ".join('"' + c.replace('"', '""') + '"' for c in cols)
    cur = db.execute(f'SELECT {quoted} FROM "{table}" ORDER BY rowid')
    while chunk := cur.fetchmany(_CHUNK):
        yield chunk


def load_sqlite(
    engine: sa.Engine,
    file: Path,
    mapping: SqliteMapping,
    load_key: str,
    now: float,
    request_id: int | None = None,
    task_id: int | None = None,
    stop: Callable[[], str | None] | None = None,
) -> LoadResult:
    """Load one result file in one transaction; raises LoadError (bad file or mapping)
    or SQLAlchemy's errors (the database). `stop`, asked between chunks and last just
    before the commit, says why the load is no longer wanted (its attempt's time ran
    out, say): then it is rolled back, and LoadStopped raised."""
    if not file.is_file():
        raise LoadError(f"no result file {file}")
    try:
        db = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LoadError(f"{file}: cannot open: {exc}") from None
    try:
        meta = sa.MetaData()
        targets = {}
        for t in mapping.tables:
            try:
                targets[t.target] = sa.Table(t.target, meta, autoload_with=engine)
            except sa.exc.NoSuchTableError:
                raise LoadError(f"the database has no table {t.target!r}") from None
            if "load_key" not in targets[t.target].c:
                raise LoadError(f"table {t.target!r} needs a load_key column")
        plans = []
        for t in mapping.tables:
            try:
                src_cols = _source_columns(db, t.source)
            except sqlite3.DatabaseError as exc:
                raise LoadError(f"{file}: not a readable SQLite file: {exc}") from None
            target = targets[t.target]
            reserved = {c.name for c in target.primary_key.columns} | set(_EXTRA)
            pairs = (
                list(t.columns.items())
                if t.columns
                else [(c, c) for c in src_cols if c in target.c and c not in reserved]
            )
            for s, d in pairs:
                if s not in src_cols:
                    raise LoadError(f"{file}: table {t.source!r} has no column {s!r}")
                if d not in target.c:
                    raise LoadError(f"table {t.target!r} has no column {d!r}")
            plans.append((t, pairs))
        loaded: dict[str, int] = {}
        # PostgreSQL's text holds no NUL character: a row with one is named here, rather
        # than the driver's refusal of a whole chunk of rows.
        no_nul = engine.dialect.name == "postgresql"
        with engine.begin() as conn:
            for t in reversed(mapping.tables):
                target = targets[t.target]
                conn.execute(target.delete().where(target.c.load_key == load_key))
            ids: dict[str, dict[Any, Any]] = {}
            for t, pairs in plans:
                target = targets[t.target]
                extra = {"load_key": load_key}
                for name, value in (
                    ("request_id", request_id),
                    ("task_id", task_id),
                    ("loaded_at", now),
                ):
                    if name in target.c:
                        extra[name] = value  # type: ignore[assignment]
                read = sorted(
                    {s for s, _ in pairs}
                    | ({t.key} if t.key else set())
                    | ({t.parent.column} if t.parent else set())
                )
                pos = {c: i for i, c in enumerate(read)}
                parent_ids = ids.get(t.parent.table) if t.parent else None
                if t.key:
                    ids[t.source] = {}
                pk = list(target.primary_key.columns)
                count = 0
                for chunk in _rows(db, t.source, read):
                    rows: list[dict[str, Any]] = []
                    for r in chunk:
                        row = {d: r[pos[s]] for s, d in pairs}
                        if no_nul:
                            _refuse_nul(file, t.source, pairs, row, count + len(rows) + 1)
                        row.update(extra)
                        if t.parent is not None:
                            assert parent_ids is not None
                            ref = r[pos[t.parent.column]]
                            if ref not in parent_ids:
                                raise LoadError(
                                    f"{file}: {t.source}.{t.parent.column} = {ref!r} has no "
                                    f"row in {t.parent.table}"
                                )
                            row[t.parent.target_column] = parent_ids[ref]
                        rows.append(row)
                    try:
                        if t.key and len(pk) == 1:
                            got = (
                                conn.execute(
                                    target.insert().returning(pk[0], sort_by_parameter_order=True),
                                    rows,
                                )
                                .scalars()
                                .all()
                            )
                            for r, new_id in zip(chunk, got, strict=True):
                                ids[t.source][r[pos[t.key]]] = new_id
                        else:
                            conn.execute(target.insert(), rows)
                    except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
                        # a value its column refuses (text for a number, a NULL where
                        # none may be): one line naming the tables, not the rows sent
                        raise LoadError(
                            f"{file}: {t.target} refused a row of {t.source} "
                            f"(rows {count + 1}-{count + len(rows)}): {describe(exc)}"
                        ) from None
                    count += len(rows)
                    _check(stop)
                loaded[t.target] = loaded.get(t.target, 0) + count
            _check(stop)  # the last word, in the transaction: nothing stopped is kept
        return LoadResult(str(file), load_key, loaded)
    finally:
        db.close()


def _refuse_nul(
    file: Path, table: str, pairs: list[tuple[str, str]], row: dict[str, Any], number: int
) -> None:
    for source, target in pairs:
        value = row[target]
        if isinstance(value, str) and "\0" in value:
            raise LoadError(
                f"{file}: {table}.{source} holds a NUL character in the table's row "
                f"{number} (counted in rowid order), which PostgreSQL cannot store in text"
            )


def _check(stop: Callable[[], str | None] | None) -> None:
    why = None if stop is None else stop()
    if why is not None:
        raise LoadStopped(why)


def file_key(file: Path) -> str:
    return f"file:{file.resolve()}"


def task_key(task_id: int) -> str:
    return f"task:{task_id}"


@dataclass(frozen=True)
class SqliteLoad:
    """A pipeline's `load_sqlite`: the result file a successful task leaves (a template
    over the task's params and `conveyor.*`; relative to the task's work directory) and
    the mapping that loads it."""

    file: str
    mapping: SqliteMapping
    database: str | None = None  # None: Conveyor's database
    # The pipeline's allowed roots: where declared, the file must be inside one of them
    # or the task's work directory (after resolving links), wherever the params say.
    roots: tuple[str, ...] = ()


def result_file(load: SqliteLoad, values: Mapping[str, Any], work_dir: Path | None) -> Path:
    """The result file a task names, relative to its work directory (None: its pipeline
    has none, so the name must be absolute), checked against the pipeline's roots."""
    from conveyor.pipelines import render_argv

    path = Path(render_argv((load.file,), values)[0])
    if not path.is_absolute():
        if work_dir is None:
            raise ResultFileRefused(
                f"result file {path} is a relative path, and the pipeline has no work "
                f"directory to find it in (work_dir = false)"
            )
        path = work_dir / path
    if load.roots:
        real = os.path.realpath(path)
        mine = () if work_dir is None else (str(work_dir),)
        allowed = [os.path.realpath(r) for r in (*mine, *load.roots)]
        if not any(real == a or real.startswith(a.rstrip("/") + "/") for a in allowed):
            where = (
                "the pipeline's roots"
                if work_dir is None
                else "the task's work directory and the pipeline's roots"
            )
            raise ResultFileRefused(
                f"result file {path} is outside {where} ({', '.join(load.roots)})"
            )
    return path
