"""model_versions: each model version's stage, and every stage transition (when, by which key, from, to)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain types here, never the app's metadata: a revision must keep meaning what it meant when written.
    op.create_table(
        "model_versions",
        sa.Column("model_id", sa.String(200), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stage_since", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_version_transitions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=True),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
    )
    op.create_index("ix_model_version_transitions_model_id", "model_version_transitions", ["model_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_version_transitions_model_id", table_name="model_version_transitions")
    op.drop_table("model_version_transitions")
    op.drop_table("model_versions")
