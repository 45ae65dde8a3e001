"""The generic `table` sink: records found at configured places in a document, mapped
field by field onto the columns of existing tables, upserted by the table's key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.ingest.sinks import MappingError, Rows, TableSpec


@dataclass(frozen=True)
class TableMapping:
    """Records at `path` (`$` for the document itself, or a top-level key such as
    `records`; a list or one object) become rows of `table`; `columns` maps a record
    field to a column (none given: fields named like the table's columns)."""

    path: str
    table: str
    columns: Mapping[str, str]


class TableSink:
    def __init__(
        self, name: str, mappings: tuple[TableMapping, ...], tables: Mapping[str, TableSpec]
    ) -> None:
        self.name = name
        self.mappings = mappings
        self.tables: Mapping[str, TableSpec] = dict(tables)

    def rows(self, doc: Any) -> Rows:
        out: Rows = {}
        for m in self.mappings:
            spec = self.tables[m.table]
            if m.path == "$":
                found, where = doc, "$"
            else:
                if not isinstance(doc, dict):
                    raise MappingError("$", f"expected an object holding {m.path!r}")
                found, where = doc.get(m.path), f"$.{m.path}"
            if found is None:
                continue
            records = found if isinstance(found, list) else [found]
            columns = dict(m.columns) or {c: c for c in spec.columns}
            rows = out.setdefault(m.table, [])
            for i, rec in enumerate(records):
                at = f"{where}[{i}]" if isinstance(found, list) else where
                if not isinstance(rec, dict):
                    raise MappingError(at, f"expected an object, got {type(rec).__name__}")
                row = {col: rec.get(field) for field, col in columns.items()}
                for k in spec.key:
                    if row.get(k) is None:
                        field = next((f for f, c in columns.items() if c == k), k)
                        raise MappingError(f"{at}.{field}", f"key field {field!r} is missing")
                rows.append(row)
        return out
