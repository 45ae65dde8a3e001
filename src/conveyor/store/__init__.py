"""Storage: one interface (`Store`), one schema, two databases."""

from __future__ import annotations

from conveyor.store.base import (
    Conflict,
    NotFound,
    Refused,
    RequestFilter,
    Store,
    StoreError,
    Submitted,
    Unavailable,
    WorkerInfo,
)


def open_store(url: str) -> Store:
    """A store for a database URL: `sqlite:///path/file.db` or
    `postgresql://user@host:port/db` (libpq style or SQLAlchemy style)."""
    if url.startswith("sqlite"):
        from conveyor.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    if url.startswith(("postgresql", "postgres://")):
        from conveyor.store.postgres import PostgresStore

        return PostgresStore(url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise StoreError(f"unsupported database URL scheme {scheme!r}: use sqlite:/// or postgresql://")


__all__ = [
    "Conflict",
    "NotFound",
    "Refused",
    "RequestFilter",
    "Store",
    "StoreError",
    "Submitted",
    "Unavailable",
    "WorkerInfo",
    "open_store",
]
