"""Limits: jobs.max_runtime_seconds (how long a job may run, all attempts) and jobs.runtime_seconds (how long it
has), and the project's own limits projects.max_active_jobs and projects.max_gpu_hours (null: the API's settings).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("max_runtime_seconds", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("runtime_seconds", sa.Float(), nullable=False, server_default="0"))
    op.add_column("projects", sa.Column("max_active_jobs", sa.Integer(), nullable=True))
    op.add_column("projects", sa.Column("max_gpu_hours", sa.Float(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE DROP COLUMN, not a batch copy (see 0006: a copy of projects would cascade to its jobs).
    op.drop_column("projects", "max_gpu_hours")
    op.drop_column("projects", "max_active_jobs")
    op.drop_column("jobs", "runtime_seconds")
    op.drop_column("jobs", "max_runtime_seconds")
