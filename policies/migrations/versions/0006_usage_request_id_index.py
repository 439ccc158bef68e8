"""usage_rows: an index on request_id, which feedback looks answers up by (x-request-id)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_rows_request_id", "usage_rows", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_rows_request_id", table_name="usage_rows")
