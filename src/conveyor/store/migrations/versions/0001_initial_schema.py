"""initial schema: requests, tasks, events, workers, queue settings

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _partial(where: str) -> dict[str, Any]:
    return {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("pipeline", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("submitter", sa.Text(), nullable=True),
        sa.Column("cacheable", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("reused_request_id", BigId, nullable=True),
        sa.Column("tasks_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tasks_succeeded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tasks_failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("tasks_cancelled", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["reused_request_id"], ["requests.id"], name="fk_requests_reused_request_id_requests"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
    )
    op.create_index("ix_requests_cache", "requests", ["pipeline", "params_hash", "finished_at"])
    op.create_index("ix_requests_created_at", "requests", ["created_at"])
    op.create_index("ix_requests_idempotency_key", "requests", ["idempotency_key"], unique=True)
    op.create_index("ix_requests_status", "requests", ["status"])

    op.create_table(
        "tasks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", BigId, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("timeout", sa.Double(), nullable=True),
        sa.Column("available_at", sa.Double(), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.Double(), nullable=True),
        sa.Column("progress_current", sa.Double(), server_default="0", nullable=False),
        sa.Column("progress_total", sa.Double(), nullable=True),
        sa.Column("progress_message", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name="fk_tasks_request_id_requests"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # A queue table churns: keep its statistics and dead rows from going stale.
        op.execute(
            "ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.02, "
            "autovacuum_analyze_scale_factor = 0.01)"
        )
    op.create_index("ix_tasks_request_id", "tasks", ["request_id"])
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        ["queue", sa.text("priority DESC"), "id"],
        **_partial("status = 'queued'"),
    )
    op.create_index(
        "ix_tasks_running", "tasks", ["lease_expires_at"], **_partial("status = 'running'")
    )

    op.create_table(
        "events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("request_id", BigId, nullable=True),
        sa.Column("task_id", BigId, nullable=True),
        sa.Column("pipeline", sa.Text(), nullable=True),
        sa.Column("queue", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_request_id", "events", ["request_id"])

    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("running", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("last_heartbeat", sa.Double(), nullable=False),
        sa.Column("stopped_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_table(
        "queue_settings",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_queue_settings"),
    )


def downgrade() -> None:
    op.drop_table("queue_settings")
    op.drop_table("workers")
    op.drop_table("events")
    op.drop_table("tasks")
    op.drop_table("requests")
