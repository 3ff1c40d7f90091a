"""A model that ends without being made (failed, cancelled) gives its version number back

models.version becomes nullable; existing failed models release their numbers. Such models
were all ``failed`` before this revision (cancelled ones included: the cause is not stored).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.alter_column("version", existing_type=sa.Integer(), nullable=True)
    op.execute("UPDATE models SET version = NULL WHERE status = 'failed'")


def downgrade() -> None:
    # The old schema needs a number on every row and knows no `cancelled`: numbers below
    # zero (the row's id, negated) cannot collide with real versions.
    op.execute("UPDATE models SET version = -id WHERE version IS NULL")
    op.execute("UPDATE models SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("models") as batch:
        batch.alter_column("version", existing_type=sa.Integer(), nullable=False)
