"""Models belong to projects: registered_models (who owns each name), model_versions (each version's job, project,
gate verdict, forced promotion: who and why) and api_keys.scopes.

Data: existing keys get every scope but models:force; each registered model name a job already used is adopted by
the project of its first job (first registration wins), and its versions are recorded without a gate verdict.

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
UTC = sa.DateTime(timezone=True)  # models.UTCDateTime's storage
# Frozen copy of models.DEFAULT_SCOPES at this revision.
_DEFAULT_SCOPES = ["jobs:read", "jobs:write", "models:read", "models:promote"]


def _default_model_name(job_id: str, suffix: str | None) -> str:
    """Frozen copy of services.jobs.jobstore.default_model_name at this revision."""
    return f"invdpo-{suffix}" if suffix else f"invdpo-{job_id}"


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("scopes", JSON, nullable=True))
    keys = sa.table("api_keys", sa.column("scopes", JSON))
    op.get_bind().execute(sa.update(keys).values(scopes=_DEFAULT_SCOPES))
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("scopes", existing_type=JSON, nullable=False)

    registered = op.create_table(
        "registered_models",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("champion_alert_version", sa.Integer, nullable=True),
    )
    op.create_index("ix_registered_models_project_id", "registered_models", ["project_id"])
    versions = op.create_table(
        "model_versions",
        sa.Column("name", sa.String(256), sa.ForeignKey("registered_models.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
        sa.Column("gate_passed", sa.Boolean, nullable=True),
        sa.Column("gate_reasons", JSON, nullable=True),
        sa.Column("forced_by", sa.String(256), nullable=True),
        sa.Column("forced_reason", sa.Text, nullable=True),
        sa.Column("promoted_at", UTC, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
    )  # fmt: skip

    # Adopt the names jobs registered: the project of the first job to register a name owns it.
    jobs = sa.table(
        "jobs", sa.column("id", sa.String), sa.column("project_id", sa.Integer), sa.column("suffix", sa.String),
        sa.column("registered_model_name", sa.String), sa.column("registered_model_version", sa.String),
        sa.column("created_at", UTC),
    )  # fmt: skip
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.project_id, jobs.c.suffix, jobs.c.registered_model_name,
                  jobs.c.registered_model_version, jobs.c.created_at)
        .where(jobs.c.registered_model_version.is_not(None))
        .order_by(jobs.c.created_at, jobs.c.id)
    ).all()  # fmt: skip
    owners: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for job_id, project_id, suffix, name, version, created_at in rows:
        name = name or _default_model_name(job_id, suffix)
        if name not in owners:
            owners[name] = project_id
            conn.execute(sa.insert(registered).values(name=name, project_id=project_id, created_at=created_at))
        if not version.isdigit() or (name, int(version)) in seen:
            continue
        seen.add((name, int(version)))
        conn.execute(
            sa.insert(versions).values(
                name=name, version=int(version), job_id=job_id, project_id=project_id, created_at=created_at
            )
        )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_index("ix_registered_models_project_id", table_name="registered_models")
    op.drop_table("registered_models")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes")
