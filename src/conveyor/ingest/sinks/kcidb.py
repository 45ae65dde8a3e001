"""The `kcidb` sink: KCIDB objects (latest schema) into the kcidb_* tables, one column
per field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.ingest.sinks import Rows, TableSpec, spec_of

# object list in a KCIDB document -> table
LISTS = {
    "checkouts": "kcidb_checkouts",
    "builds": "kcidb_builds",
    "tests": "kcidb_tests",
    "issues": "kcidb_issues",
    "incidents": "kcidb_incidents",
}


def kcidb_specs() -> dict[str, TableSpec]:
    from conveyor.store import schema

    return {name: spec_of(schema.metadata.tables[name]) for name in LISTS.values()}


class KcidbSink:
    def __init__(self, name: str = "kcidb", tables: Mapping[str, TableSpec] | None = None):
        self.name = name
        self.tables: Mapping[str, TableSpec] = dict(tables or kcidb_specs())

    def rows(self, doc: Any) -> Rows:
        out: Rows = {}
        for key, table in LISTS.items():
            objs = doc.get(key)
            if not objs:
                continue
            # The objects themselves: their fields are the columns (a field left out
            # is NULL), and validated KCIDB objects have no others.
            out[table] = objs
        return out
