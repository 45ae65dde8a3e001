"""The one writer per database: rows of many files upserted in one transaction.

Upserts keep the first non-null value of each field (`COALESCE(table.col,
excluded.col)`), so a re-submitted or re-ingested file changes nothing and a later file
can only fill gaps. On PostgreSQL each table's rows go as one JSON document unpacked by
the server (`json_to_recordset`): one round trip per table per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from conveyor.ingest.sinks import Rows, TableSpec


def _ENCODE(value: Any) -> str:
    return orjson.dumps(value).decode()


class SinkUnavailable(RuntimeError):
    """The database failed in a way worth trying again (connection lost, lock time-out,
    server shutting down): the batch was rolled back whole."""


class SinkRejected(RuntimeError):
    """The database refused the rows themselves (a type or constraint violation)."""


def make_engine(url: str, lock_timeout: float = 60.0) -> Engine:
    """An engine for a sink database. `lock_timeout`: how long a write waits for a lock
    another client holds before the batch fails (and is tried again later)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": lock_timeout, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    from conveyor.store.postgres import sqlalchemy_url

    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": 10,
            "options": f"-c jit=off -c lock_timeout={int(lock_timeout * 1000)}",
        },
    )


def merge_rows(rows: Iterable[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per key, the first non-null value of each field winning (as the upsert
    does): one statement may not touch a row twice."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[c] for c in key) if key else ()
        have = merged.get(k)
        if have is None:
            merged[k] = dict(row)
        else:
            for col, value in row.items():
                if have.get(col) is None and value is not None:
                    have[col] = value
    return list(merged.values())


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _update_clause(spec: TableSpec, dialect: str) -> str:
    rest = [c for c in spec.columns if c not in spec.key]
    conflict = f"ON CONFLICT ({', '.join(_q(k) for k in spec.key)})"
    if not rest:
        return f"{conflict} DO NOTHING"
    table = _q(spec.name)
    sets = ", ".join(f"{_q(c)} = COALESCE({table}.{_q(c)}, excluded.{_q(c)})" for c in rest)
    return f"{conflict} DO UPDATE SET {sets}"


# Rows as the worker processes hand them to the writer: per table, (key, payload)
# pairs, the payload already in the form the database takes (a JSON object's text for
# PostgreSQL, a tuple for SQLite), so the writer only joins them and little crosses the
# process boundary.
Encoded = dict[str, list[tuple[tuple[Any, ...], Any]]]


def encode_rows(rows: Rows, tables: Mapping[str, TableSpec], dialect: str) -> Encoded:
    out: Encoded = {}
    for table, table_rows in rows.items():
        spec = tables[table]
        key = spec.key
        if dialect == "postgresql":
            out[table] = [(tuple(r[c] for c in key), _ENCODE(r)) for r in table_rows]
        else:
            out[table] = [(tuple(r[c] for c in key), _tuple(spec, r)) for r in table_rows]
    return out


def _tuple(spec: TableSpec, row: dict[str, Any]) -> tuple[Any, ...]:
    if not spec.json_columns:
        return tuple(row.get(c) for c in spec.columns)
    return tuple(
        (None if row.get(c) is None else _ENCODE(row[c])) if c in spec.json_columns else row.get(c)
        for c in spec.columns
    )


def _merge_encoded(pairs: list[tuple[tuple[Any, ...], Any]], dialect: str) -> list[Any]:
    """One payload per key, the first non-null value of each field winning."""
    first: dict[tuple[Any, ...], Any] = {}
    clash = False
    for key, payload in pairs:
        if key in first:
            clash = True
            have = first[key]
            if dialect == "postgresql":
                merged = merge_rows([orjson.loads(have), orjson.loads(payload)], ())
                first[key] = _ENCODE(merged[0])
            else:
                first[key] = tuple(
                    a if a is not None else b for a, b in zip(have, payload, strict=True)
                )
        else:
            first[key] = payload
    if not clash:
        return [p for _, p in pairs]
    return list(first.values())


class RowWriter:
    """Upserts rows into the tables of one database."""

    def __init__(self, engine: Engine, tables: Mapping[str, TableSpec]) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.tables = dict(tables)
        self._sql = {name: self._statement(spec) for name, spec in self.tables.items()}

    def _statement(self, spec: TableSpec) -> str:
        cols = ", ".join(_q(c) for c in spec.columns)
        if self.dialect == "postgresql":
            typed = ", ".join(
                f"{_q(c)} {t}" for c, t in zip(spec.columns, spec.pg_types, strict=True)
            )
            return (
                f"INSERT INTO {_q(spec.name)} ({cols}) SELECT {cols} "
                f"FROM json_to_recordset(%(rows)s::json) AS x({typed}) "
                + _update_clause(spec, self.dialect)
            )
        marks = ", ".join("?" for _ in spec.columns)
        return f"INSERT INTO {_q(spec.name)} ({cols}) VALUES ({marks}) " + _update_clause(
            spec, self.dialect
        )

    def encode(self, rows: Rows) -> Encoded:
        return encode_rows(rows, self.tables, self.dialect)

    def write(self, conn: Connection, encoded: Encoded) -> int:
        """Upsert every table's rows on `conn` (inside the caller's transaction)."""
        written = 0
        for table, pairs in encoded.items():
            if not pairs:
                continue
            payloads = _merge_encoded(pairs, self.dialect)
            if self.dialect == "postgresql":
                conn.exec_driver_sql(self._sql[table], {"rows": "[" + ",".join(payloads) + "]"})
            else:
                conn.exec_driver_sql(self._sql[table], payloads)
            written += len(pairs)
        return written

    def commit(self, rows: Rows) -> int:
        """Write the rows in one transaction; raises SinkUnavailable or SinkRejected."""
        return self.commit_encoded(self.encode(rows))

    def commit_encoded(self, data: Encoded) -> int:
        try:
            with self.engine.begin() as conn:
                return self.write(conn, data)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise SinkUnavailable(_describe(exc)) from exc
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise SinkUnavailable(_describe(exc)) from exc
            raise SinkRejected(_describe(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()


def _describe(exc: sa.exc.DBAPIError) -> str:
    text = str(exc.orig).strip().splitlines()
    return text[0] if text else type(exc.orig).__name__
