"""composition sources: a composition may take classes from several models

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    sources = op.create_table(
        "composition_sources",
        sa.Column("composition_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("classes", JSON, nullable=False),
        sa.Column("class_names", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_sources_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_composition_sources_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("composition_id", "position", name=op.f("pk_composition_sources")),
    )
    op.create_index(
        op.f("ix_composition_sources_model_id"), "composition_sources", ["model_id"], unique=False
    )
    # Every existing composition came from one model: it becomes that model's single source.
    comps = sa.table(
        "compositions",
        sa.column("id", sa.Integer()),
        sa.column("model_id", sa.Integer()),
        sa.column("classes", JSON),
        sa.column("class_names", JSON),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(comps.c.id, comps.c.model_id, comps.c.classes, comps.c.class_names))
    backfill = [
        {"composition_id": r.id, "position": 0, "model_id": r.model_id,
         "classes": r.classes, "class_names": r.class_names}
        for r in rows
    ]
    if backfill:
        op.bulk_insert(sources, backfill)


def downgrade() -> None:
    # Compositions that span several models cannot be expressed by the 0001 schema.
    conn = op.get_bind()
    conn.execute(
        sa.text(
            "DELETE FROM compositions WHERE id IN "
            "(SELECT composition_id FROM composition_sources WHERE position > 0)"
        )
    )
    op.drop_index(op.f("ix_composition_sources_model_id"), table_name="composition_sources")
    op.drop_table("composition_sources")
