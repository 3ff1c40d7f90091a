"""Modules record their CPU latency per image beside the full model's (timed at export)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: modules registered before this revision were never timed.
    with op.batch_alter_table("modules") as batch:
        batch.add_column(sa.Column("latency_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("full_latency_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("modules") as batch:
        batch.drop_column("full_latency_ms")
        batch.drop_column("latency_ms")
