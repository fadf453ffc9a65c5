"""projects.allowed_prefixes: the object-store prefixes a project's jobs may read (null: any); and
jobs.validation_attempts: how often the API began checking a job's files, so a job whose check kills its process
ends failed instead of being validated again for ever.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # frozen copy of models.JSONType


def upgrade() -> None:
    op.add_column("projects", sa.Column("allowed_prefixes", JSON, nullable=True))
    op.add_column("jobs", sa.Column("validation_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("validation_attempts")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("allowed_prefixes")
