"""ingest: kcidb tables, ingest counters, annotation tables

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "annotation_header",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("load_key", sa.Text(), nullable=False),
        sa.Column(
            "request_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("header_id", sa.BigInteger(), nullable=True),
        sa.Column("source_bin", sa.Text(), nullable=True),
        sa.Column("source_sha256", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.Double(), nullable=True),
        sa.Column("record_count", sa.Integer(), nullable=True),
        sa.Column("first_ts", sa.Double(), nullable=True),
        sa.Column("last_ts", sa.Double(), nullable=True),
        sa.Column("loaded_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation_header")),
    )
    op.create_index(
        "ix_annotation_header_load_key", "annotation_header", ["load_key"], unique=False
    )
    op.create_index(
        "ix_annotation_header_request_id", "annotation_header", ["request_id"], unique=False
    )

    op.create_table(
        "ingest_counters",
        sa.Column("spool", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("spool", "name", name=op.f("pk_ingest_counters")),
    )
    op.create_table(
        "kcidb_builds",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("checkout_id", sa.Text(), nullable=True),
        sa.Column("_timestamp", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("start_time", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True),
        sa.Column("architecture", sa.Text(), nullable=True),
        sa.Column("command", sa.Text(), nullable=True),
        sa.Column("compiler", sa.Text(), nullable=True),
        sa.Column("input_files", sa.JSON(), nullable=True),
        sa.Column("output_files", sa.JSON(), nullable=True),
        sa.Column("config_name", sa.Text(), nullable=True),
        sa.Column("config_url", sa.Text(), nullable=True),
        sa.Column("log_url", sa.Text(), nullable=True),
        sa.Column("log_excerpt", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("misc", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kcidb_builds")),
    )
    op.create_table(
        "kcidb_checkouts",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("_timestamp", sa.Text(), nullable=True),
        sa.Column("tree_name", sa.Text(), nullable=True),
        sa.Column("git_repository_url", sa.Text(), nullable=True),
        sa.Column("git_commit_hash", sa.Text(), nullable=True),
        sa.Column("git_commit_name", sa.Text(), nullable=True),
        sa.Column("git_commit_tags", sa.JSON(), nullable=True),
        sa.Column("git_commit_message", sa.Text(), nullable=True),
        sa.Column("git_repository_branch", sa.Text(), nullable=True),
        sa.Column("git_repository_branch_tip", sa.Boolean(), nullable=True),
        sa.Column("patchset_files", sa.JSON(), nullable=True),
        sa.Column("patchset_hash", sa.Text(), nullable=True),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("start_time", sa.Text(), nullable=True),
        sa.Column("origin_builds_finish_time", sa.Text(), nullable=True),
        sa.Column("origin_tests_finish_time", sa.Text(), nullable=True),
        sa.Column("log_url", sa.Text(), nullable=True),
        sa.Column("log_excerpt", sa.Text(), nullable=True),
        sa.Column("valid", sa.Boolean(), nullable=True),
        sa.Column("misc", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kcidb_checkouts")),
    )
    op.create_table(
        "kcidb_incidents",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("issue_id", sa.Text(), nullable=True),
        sa.Column("issue_version", sa.BigInteger(), nullable=True),
        sa.Column("build_id", sa.Text(), nullable=True),
        sa.Column("test_id", sa.Text(), nullable=True),
        sa.Column("_timestamp", sa.Text(), nullable=True),
        sa.Column("present", sa.Boolean(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("misc", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kcidb_incidents")),
    )
    op.create_table(
        "kcidb_issues",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("_timestamp", sa.Text(), nullable=True),
        sa.Column("categories", sa.JSON(), nullable=True),
        sa.Column("report_url", sa.Text(), nullable=True),
        sa.Column("report_subject", sa.Text(), nullable=True),
        sa.Column("culprit", sa.JSON(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("misc", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", "version", name=op.f("pk_kcidb_issues")),
    )
    op.create_table(
        "kcidb_tests",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("build_id", sa.Text(), nullable=True),
        sa.Column("_timestamp", sa.Text(), nullable=True),
        sa.Column("environment", sa.JSON(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("log_url", sa.Text(), nullable=True),
        sa.Column("log_excerpt", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("number", sa.JSON(), nullable=True),
        sa.Column("start_time", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=True),
        sa.Column("input_files", sa.JSON(), nullable=True),
        sa.Column("output_files", sa.JSON(), nullable=True),
        sa.Column("misc", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kcidb_tests")),
    )
    op.create_table(
        "annotation",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("load_key", sa.Text(), nullable=False),
        sa.Column(
            "header_ref", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "request_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("annotation_id", sa.BigInteger(), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("ts", sa.Double(), nullable=True),
        sa.Column("protocol", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=True),
        sa.Column("payload_len", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("loaded_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["header_ref"],
            ["annotation_header.id"],
            name=op.f("fk_annotation_header_ref_annotation_header"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation")),
    )
    op.create_index("ix_annotation_header_ref", "annotation", ["header_ref"], unique=False)
    op.create_index("ix_annotation_load_key", "annotation", ["load_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_annotation_load_key", table_name="annotation")
    op.drop_index("ix_annotation_header_ref", table_name="annotation")

    op.drop_table("annotation")
    op.drop_table("kcidb_tests")
    op.drop_table("kcidb_issues")
    op.drop_table("kcidb_incidents")
    op.drop_table("kcidb_checkouts")
    op.drop_table("kcidb_builds")
    op.drop_table("ingest_counters")
    op.drop_index("ix_annotation_header_request_id", table_name="annotation_header")
    op.drop_index("ix_annotation_header_load_key", table_name="annotation_header")

    op.drop_table("annotation_header")
