"""experiments: experiment definitions, feedback scores, and each usage row's experiment, variant and answer id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain types here, never the app's metadata: a revision must keep meaning what it meant when written.
    op.add_column("usage_rows", sa.Column("experiment", sa.String(64), nullable=True))
    op.add_column("usage_rows", sa.Column("variant", sa.String(64), nullable=True))
    op.add_column("usage_rows", sa.Column("completion_id", sa.String(128), nullable=True))
    op.create_index("ix_usage_rows_experiment_id", "usage_rows", ["experiment", "id"])
    op.create_index("ix_usage_rows_completion_id", "usage_rows", ["completion_id"])
    op.create_table(
        "experiments",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("promoted", sa.String(64), nullable=True),
        sa.Column("seeded", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("completion_id", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("experiment", sa.String(64), nullable=True),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("completion_id", "metric", name="uq_feedback_completion_metric"),
    )
    op.create_index("ix_feedback_experiment_id", "feedback", ["experiment", "id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_experiment_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_table("experiments")
    op.drop_index("ix_usage_rows_completion_id", table_name="usage_rows")
    op.drop_index("ix_usage_rows_experiment_id", table_name="usage_rows")
    with op.batch_alter_table("usage_rows") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("completion_id")
        batch.drop_column("variant")
        batch.drop_column("experiment")
