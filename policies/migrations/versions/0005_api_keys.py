"""api_keys: keys stored as SHA-256 digests, with role, team, allowed models, own limits, expiry and revocation

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain types here, never the app's metadata: a revision must keep meaning what it meant when written.
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("team", sa.String(200), nullable=True),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("budget", sa.Text(), nullable=True),
        sa.Column("rate_limit", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ux_api_keys_digest", "api_keys", ["digest"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_api_keys_digest", table_name="api_keys")
    op.drop_table("api_keys")
