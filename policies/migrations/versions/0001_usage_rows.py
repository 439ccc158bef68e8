"""usage_rows: one row per request through the gateway

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain types here, never the app's metadata: a revision must keep meaning what it meant when written.
    op.create_table(
        "usage_rows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("user", sa.String(), nullable=True),
        sa.Column("team", sa.String(), nullable=True),
        sa.Column("model_requested", sa.String(), nullable=True),
        sa.Column("model_served", sa.String(), nullable=True),
        sa.Column("route", sa.String(16), nullable=True),
        sa.Column("task", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("cache", sa.String(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(), nullable=True),
    )
    op.create_index("ix_usage_rows_created_at", "usage_rows", ["created_at"])
    op.create_index("ix_usage_rows_key_id_created_at", "usage_rows", ["key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_rows_key_id_created_at", table_name="usage_rows")
    op.drop_index("ix_usage_rows_created_at", table_name="usage_rows")
    op.drop_table("usage_rows")
