"""SQLite: ids are never given out again (AUTOINCREMENT)

Without AUTOINCREMENT SQLite gives a new row the largest id so far plus one: once
retention had deleted the newest requests, events and notifications (a service idle for
longer than its retention), their ids came back. A request id that a client still held
named another request; the notifier, which reads events after the last id it handled,
skipped every new one; a receiver dropping repeated delivery ids dropped new
notifications. PostgreSQL's sequences never go back: nothing changes there.

Each table is rebuilt by SQLite's own procedure (a new table, the rows copied, the old
one dropped, the new one renamed, its indexes made again from their stored text, which
keeps what reflection would lose: DESC and partial indexes). The store runs migrations
with foreign keys off, as that procedure needs. Each table's counter starts above any id
it may have given before: the largest id still there, or one a cursor has seen.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import re

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("requests", "tasks", "events", "api_tokens", "artifacts", "notifications")

# ids other tables keep of rows that may be deleted: the counter starts above them
_SEEN = {
    "events": (
        "SELECT max(event_id) FROM event_cursors",
        "SELECT max(event_id) FROM notifications",
    ),
    "requests": (
        "SELECT max(request_id) FROM tasks",
        "SELECT max(request_id) FROM events",
        "SELECT max(request_id) FROM artifacts",
    ),
    "tasks": ("SELECT max(task_id) FROM events", "SELECT max(task_id) FROM artifacts"),
}


def _autoincrement(sql: str, table: str) -> str:
    """The table's stored CREATE TABLE with its `id` primary key AUTOINCREMENT."""
    key = re.compile(r",\s*CONSTRAINT (\w+) PRIMARY KEY \(id\)")
    found = key.search(sql)
    column = "\n\tid INTEGER NOT NULL, "
    if found is None or column not in sql:
        raise RuntimeError(f"unexpected definition of table {table}: {sql}")
    sql = key.sub("", sql, count=1)
    sql = sql.replace(
        column,
        f"\n\tid INTEGER NOT NULL CONSTRAINT {found.group(1)} PRIMARY KEY AUTOINCREMENT, ",
        1,
    )
    return sql.replace(f"CREATE TABLE {table} (", f"CREATE TABLE _new_{table} (", 1)


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    for table in TABLES:
        (sql,) = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).one()
        if "AUTOINCREMENT" in sql:
            continue
        indexes = [
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND sql IS NOT NULL",
                (table,),
            )
        ]
        conn.exec_driver_sql(_autoincrement(sql, table))
        conn.exec_driver_sql(f"INSERT INTO _new_{table} SELECT * FROM {table}")
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"ALTER TABLE _new_{table} RENAME TO {table}")
        for index in indexes:
            conn.exec_driver_sql(index)
        seen = [conn.exec_driver_sql(f"SELECT max(id) FROM {table}").scalar()]
        seen += [conn.exec_driver_sql(q).scalar() for q in _SEEN.get(table, ())]
        top = max((int(s) for s in seen if s is not None), default=0)
        conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        if top:
            conn.exec_driver_sql(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, top)
            )
    # the references of and to the rebuilt tables (others, the ingest tables say, are
    # written with foreign keys off and are not this migration's business)
    for table in ("requests", "tasks", "artifacts"):
        problems = conn.exec_driver_sql(f"PRAGMA foreign_key_check({table})").all()
        if problems:
            raise RuntimeError(f"rows of {table} refer to rows that are gone: {problems[:5]}")


def downgrade() -> None:
    # AUTOINCREMENT only keeps ids from coming back; the earlier schema works with it.
    pass
