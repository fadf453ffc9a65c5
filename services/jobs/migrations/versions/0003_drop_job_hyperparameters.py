"""Drop jobs.hyperparameters: the request's hyperparameters as sent, which nothing read. A job's configuration has
one stored form, jobs.config (the full validated TrainingConfig); existing rows keep it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # frozen copy of models.JSONType
# Frozen copy of invdpo_core.config.RESERVED_FIELDS at this revision: the config fields that are not hyperparameters.
_RESERVED = ("base_model", "dataset", "validation_dataset", "method", "seed", "output_dir")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("hyperparameters")


def downgrade() -> None:
    # What a request set is gone; the resolved hyperparameters (defaults included) stand in for it.
    op.add_column("jobs", sa.Column("hyperparameters", JSON, nullable=True))
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("config", JSON), sa.column("hyperparameters", JSON))
    conn = op.get_bind()
    for job_id, config in conn.execute(sa.select(jobs.c.id, jobs.c.config)).all():
        hyperparameters = {k: v for k, v in (config or {}).items() if k not in _RESERVED}
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(hyperparameters=hyperparameters))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("hyperparameters", existing_type=JSON, nullable=False)
