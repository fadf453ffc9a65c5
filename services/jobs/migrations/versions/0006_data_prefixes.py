"""projects.allowed_prefixes: the object-store prefixes a project's jobs may read (null: any); and
jobs.validation_attempts: how often the API began checking a job's files, so a job whose check kills its process
ends failed instead of being validated again for ever.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # frozen copy of models.JSONType


def upgrade() -> None:
    op.add_column("projects", sa.Column("allowed_prefixes", JSON, nullable=True))
    op.add_column("jobs", sa.Column("validation_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # Plain ALTER TABLE DROP COLUMN (SQLite >= 3.35 has it), not a batch copy: on SQLite, dropping the old projects
    # table of a copy would cascade to every job of the project (foreign keys are on).
    op.drop_column("jobs", "validation_attempts")
    op.drop_column("projects", "allowed_prefixes")
