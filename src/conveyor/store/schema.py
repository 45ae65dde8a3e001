"""The one schema, for SQLite and PostgreSQL. Alembic migrations must equal it.

Times are seconds since the epoch (double precision): the same arithmetic and grouping
(per hour, per day) works in both databases, and comparisons are cheap.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time: sa.Double[float] = sa.Double()

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("params_hash", sa.Text, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("submitter", sa.Text, nullable=True),
    sa.Column("cacheable", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("reused_request_id", BigId, sa.ForeignKey("requests.id"), nullable=True),
    sa.Column("tasks_total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tasks_succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tasks_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tasks_cancelled", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("started_at", Time, nullable=True),
    sa.Column("finished_at", Time, nullable=True),
    sa.Index("ix_requests_idempotency_key", "idempotency_key", unique=True),
    sa.Index("ix_requests_cache", "pipeline", "params_hash", "finished_at"),
    sa.Index("ix_requests_status", "status"),
    sa.Index("ix_requests_created_at", "created_at"),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("request_id", BigId, sa.ForeignKey("requests.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("queue", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("params", sa.JSON, nullable=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("timeout", sa.Double, nullable=True),
    sa.Column("available_at", Time, nullable=False),
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_expires_at", Time, nullable=True),
    sa.Column("progress_current", sa.Double, nullable=False, server_default="0"),
    sa.Column("progress_total", sa.Double, nullable=True),
    sa.Column("progress_message", sa.Text, nullable=True),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("started_at", Time, nullable=True),
    sa.Column("finished_at", Time, nullable=True),
    sa.Index("ix_tasks_request_id", "request_id"),
    # The claim reads only this partial index: its size follows the queued backlog,
    # and the order is the claim order (priority, then FIFO).
    sa.Index(
        "ix_tasks_claim",
        "queue",
        sa.text("priority DESC"),
        "id",
        postgresql_where=sa.text("status = 'queued'"),
        sqlite_where=sa.text("status = 'queued'"),
    ),
    sa.Index(
        "ix_tasks_running",
        "lease_expires_at",
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    ),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("ts", Time, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("request_id", BigId, nullable=True),
    sa.Column("task_id", BigId, nullable=True),
    sa.Column("pipeline", sa.Text, nullable=True),
    sa.Column("queue", sa.Text, nullable=True),
    sa.Column("data", sa.JSON, nullable=True),
    sa.Index("ix_events_request_id", "request_id"),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("queues", sa.JSON, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("running", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", Time, nullable=False),
    sa.Column("last_heartbeat", Time, nullable=False),
    sa.Column("stopped_at", Time, nullable=True),
)

queue_settings = sa.Table(
    "queue_settings",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("updated_at", Time, nullable=False),
)

# API tokens: only a hash of each token is kept. An active token's name is unique; a
# revoked one keeps its row (and name) for the record.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("token_hash", sa.Text, nullable=False),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("last_used_at", Time, nullable=True),
    sa.Column("revoked_at", Time, nullable=True),
    sa.Index("ix_api_tokens_token_hash", "token_hash", unique=True),
    sa.Index(
        "ix_api_tokens_name",
        "name",
        unique=True,
        postgresql_where=sa.text("revoked_at IS NULL"),
        sqlite_where=sa.text("revoked_at IS NULL"),
    ),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

# What each task attempt kept in the artifact store: its outputs and, where logs are
# uploaded, its log. One row per (task, attempt, kind, name).
artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("task_id", BigId, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("request_id", BigId, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Index("ix_artifacts_task", "task_id", "attempt", "kind", "name", unique=True),
    sa.Index("ix_artifacts_request_id", "request_id"),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

# The logs of quiet attempts, kept here instead of in a file: an attempt of a command
# that printed nothing has a log of two lines (its command line, how it ended), which
# its outcome brings along. Every other attempt's log is a file (`LocalArtifacts`).
# One row is written with every such outcome, so the table is as small as it can be:
# on SQLite its rows live in its primary key (no rowid, no second B-tree), and no other
# index is kept (retention finds the rows by their tasks).
attempt_logs = sa.Table(
    "attempt_logs",
    metadata,
    sa.Column("task_id", BigId, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sqlite_with_rowid=False,
)

# The notifications outbox: filled from the events table (one row per completion event
# that a pipeline wants announced), emptied by delivering with retries.
notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("event_id", BigId, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("request_id", BigId, nullable=True),
    sa.Column("task_id", BigId, nullable=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("next_at", Time, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("sent_at", Time, nullable=True),
    sa.Index("ix_notifications_event_id", "event_id", unique=True),
    sa.Index("ix_notifications_request_id", "request_id"),
    sa.Index(
        "ix_notifications_due",
        "next_at",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    ),
    sqlite_autoincrement=True,  # ids never come back (0005)
)

# Named positions in the events table of the components that follow it (the notifier).
event_cursors = sa.Table(
    "event_cursors",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("event_id", BigId, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

# --------------------------------------------------------------------------- ingestion
# KCIDB (schema 5.3) objects, one table per object list, one column per field; nested
# values (resource lists, environment, culprit, misc …) are JSON. Rows upsert by id, a
# field's first non-null value winning, so a re-submission never loses or doubles data.
_J = sa.JSON


def _kcidb(name: str, key: tuple[str, ...], *cols: tuple[str, Any]) -> sa.Table:
    columns = [
        sa.Column(col, typ, primary_key=col in key, nullable=col not in key) for col, typ in cols
    ]
    return sa.Table(name, metadata, *columns)


kcidb_checkouts = _kcidb(
    "kcidb_checkouts",
    ("id",),
    ("id", sa.Text),
    ("origin", sa.Text),
    ("_timestamp", sa.Text),
    ("tree_name", sa.Text),
    ("git_repository_url", sa.Text),
    ("git_commit_hash", sa.Text),
    ("git_commit_name", sa.Text),
    ("git_commit_tags", _J),
    ("git_commit_message", sa.Text),
    ("git_repository_branch", sa.Text),
    ("git_repository_branch_tip", sa.Boolean),
    ("patchset_files", _J),
    ("patchset_hash", sa.Text),
    ("message_id", sa.Text),
    ("comment", sa.Text),
    ("start_time", sa.Text),
    ("origin_builds_finish_time", sa.Text),
    ("origin_tests_finish_time", sa.Text),
    ("log_url", sa.Text),
    ("log_excerpt", sa.Text),
    ("valid", sa.Boolean),
    ("misc", _J),
)

kcidb_builds = _kcidb(
    "kcidb_builds",
    ("id",),
    ("id", sa.Text),
    ("origin", sa.Text),
    ("checkout_id", sa.Text),
    ("_timestamp", sa.Text),
    ("comment", sa.Text),
    ("start_time", sa.Text),
    ("duration", sa.Double),
    ("architecture", sa.Text),
    ("command", sa.Text),
    ("compiler", sa.Text),
    ("input_files", _J),
    ("output_files", _J),
    ("config_name", sa.Text),
    ("config_url", sa.Text),
    ("log_url", sa.Text),
    ("log_excerpt", sa.Text),
    ("status", sa.Text),
    ("misc", _J),
)

kcidb_tests = _kcidb(
    "kcidb_tests",
    ("id",),
    ("id", sa.Text),
    ("origin", sa.Text),
    ("build_id", sa.Text),
    ("_timestamp", sa.Text),
    ("environment", _J),
    ("path", sa.Text),
    ("comment", sa.Text),
    ("log_url", sa.Text),
    ("log_excerpt", sa.Text),
    ("status", sa.Text),
    ("number", _J),
    ("start_time", sa.Text),
    ("duration", sa.Double),
    ("input_files", _J),
    ("output_files", _J),
    ("misc", _J),
)

kcidb_issues = _kcidb(
    "kcidb_issues",
    ("id", "version"),
    ("id", sa.Text),
    ("version", sa.BigInteger),
    ("origin", sa.Text),
    ("_timestamp", sa.Text),
    ("categories", _J),
    ("report_url", sa.Text),
    ("report_subject", sa.Text),
    ("culprit", _J),
    ("comment", sa.Text),
    ("misc", _J),
)

kcidb_incidents = _kcidb(
    "kcidb_incidents",
    ("id",),
    ("id", sa.Text),
    ("origin", sa.Text),
    ("issue_id", sa.Text),
    ("issue_version", sa.BigInteger),
    ("build_id", sa.Text),
    ("test_id", sa.Text),
    ("_timestamp", sa.Text),
    ("present", sa.Boolean),
    ("comment", sa.Text),
    ("misc", _J),
)

# Per-spool counters (files, rows, empty, failed.<stage>), added to by the ingester
# after its commits and readable by any process (the metrics, the dashboard).
ingest_counters = sa.Table(
    "ingest_counters",
    metadata,
    sa.Column("spool", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),  # files, rows, failed.<stage>, empty
    sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", Time, nullable=False),
)

# SQLite result files loaded into the database (the Spotbot example's spotbot.db).
# `load_key` names what was loaded (a task, or a file), so a re-load replaces it whole.
annotation_header = sa.Table(
    "annotation_header",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("load_key", sa.Text, nullable=False),
    sa.Column("request_id", BigId, nullable=True),
    sa.Column("task_id", BigId, nullable=True),
    sa.Column("header_id", sa.BigInteger, nullable=True),
    sa.Column("source_bin", sa.Text, nullable=True),
    sa.Column("source_sha256", sa.Text, nullable=True),
    sa.Column("processed_at", Time, nullable=True),
    sa.Column("record_count", sa.Integer, nullable=True),
    sa.Column("first_ts", Time, nullable=True),
    sa.Column("last_ts", Time, nullable=True),
    sa.Column("loaded_at", Time, nullable=False),
    sa.Index("ix_annotation_header_load_key", "load_key"),
    sa.Index("ix_annotation_header_request_id", "request_id"),
)

annotation = sa.Table(
    "annotation",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("load_key", sa.Text, nullable=False),
    sa.Column("header_ref", BigId, sa.ForeignKey("annotation_header.id"), nullable=False),
    sa.Column("request_id", BigId, nullable=True),
    sa.Column("task_id", BigId, nullable=True),
    sa.Column("annotation_id", sa.BigInteger, nullable=True),
    sa.Column("seq", sa.Integer, nullable=True),
    sa.Column("ts", Time, nullable=True),
    sa.Column("protocol", sa.Text, nullable=True),
    sa.Column("kind", sa.Text, nullable=True),
    sa.Column("payload_len", sa.Integer, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("loaded_at", Time, nullable=False),
    sa.Index("ix_annotation_load_key", "load_key"),
    sa.Index("ix_annotation_header_ref", "header_ref"),
)
