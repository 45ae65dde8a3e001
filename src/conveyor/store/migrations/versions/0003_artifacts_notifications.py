"""artifacts, the notifications outbox and event cursors

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("task_id", BigId, nullable=False),
        sa.Column("request_id", BigId, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_artifacts_task_id_tasks"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
    )
    op.create_index(
        "ix_artifacts_task", "artifacts", ["task_id", "attempt", "kind", "name"], unique=True
    )
    op.create_index("ix_artifacts_request_id", "artifacts", ["request_id"])
    op.create_table(
        "notifications",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("pipeline", sa.Text(), nullable=False),
        sa.Column("request_id", BigId, nullable=True),
        sa.Column("task_id", BigId, nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("sent_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_notifications"),
    )
    op.create_index("ix_notifications_event_id", "notifications", ["event_id"], unique=True)
    op.create_index("ix_notifications_request_id", "notifications", ["request_id"])
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["next_at"],
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "event_cursors",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_event_cursors"),
    )


def downgrade() -> None:
    op.drop_table("event_cursors")
    op.drop_index("ix_notifications_due", table_name="notifications")
    op.drop_index("ix_notifications_request_id", table_name="notifications")
    op.drop_index("ix_notifications_event_id", table_name="notifications")
    op.drop_table("notifications")
    op.drop_index("ix_artifacts_request_id", table_name="artifacts")
    op.drop_index("ix_artifacts_task", table_name="artifacts")
    op.drop_table("artifacts")
