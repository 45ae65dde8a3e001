"""attempt_logs: the logs of quiet attempts, kept in the database

An attempt of a command that printed nothing has a log of two lines, its command line
and how it ended. Its outcome brings them along and they are stored here, instead of in
a log file of its own: a file is an inode made on every such attempt's critical path.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "attempt_logs",
        sa.Column("task_id", BigId, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_attempt_logs_task_id_tasks"),
        sa.PrimaryKeyConstraint("task_id", "attempt", name="pk_attempt_logs"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("attempt_logs")
