"""Owners: models, compositions and datasets record the API key that created them;
Idempotency-Key is unique per API key, not across keys; jobs count losses without progress
(stalled_losses) under a hard ceiling on starts (max_starts)

Backfill: a model or composition made by a job takes that job's key; a composition
without a job (or whose job has no key) takes its model's owner. Datasets uploaded
before this revision have no known owner (NULL): only an admin key can delete them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ("models", "compositions", "datasets")


def upgrade() -> None:
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("api_key_id", sa.Integer(), nullable=True))
            batch.create_foreign_key(
                op.f(f"fk_{table}_api_key_id_api_keys"),
                "api_keys",
                ["api_key_id"],
                ["id"],
                ondelete="SET NULL",
            )
    op.execute(
        "UPDATE models SET api_key_id = "
        "(SELECT jobs.api_key_id FROM jobs WHERE jobs.id = models.job_id)"
    )
    op.execute(
        "UPDATE compositions SET api_key_id = "
        "(SELECT jobs.api_key_id FROM jobs WHERE jobs.id = compositions.job_id)"
    )
    op.execute(
        "UPDATE compositions SET api_key_id = "
        "(SELECT models.api_key_id FROM models WHERE models.id = compositions.model_id) "
        "WHERE api_key_id IS NULL"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("stalled_losses", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("max_starts", sa.Integer(), nullable=False, server_default="20"))
        batch.drop_constraint(op.f("uq_jobs_idempotency_key"), type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_key_idempotency", ["api_key_id", "idempotency_key"]
        )


def downgrade() -> None:
    # Keys used by two API keys would break the old global uniqueness: keep the newest.
    op.execute(
        "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM jobs AS j2 WHERE j2.idempotency_key = jobs.idempotency_key "
        "AND (j2.created_at > jobs.created_at OR (j2.created_at = jobs.created_at AND j2.id > jobs.id)))"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("uq_jobs_key_idempotency", type_="unique")
        batch.drop_column("max_starts")
        batch.drop_column("stalled_losses")
        batch.create_unique_constraint(op.f("uq_jobs_idempotency_key"), ["idempotency_key"])
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"fk_{table}_api_key_id_api_keys"), type_="foreignkey")
            batch.drop_column("api_key_id")
