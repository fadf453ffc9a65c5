"""Alembic migrations: they build exactly the tables of models.py, on PostgreSQL and SQLite, and go back down."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from services.jobs.db import alembic_config, make_engine, migrate
from services.jobs.models import Base

TABLES = {"projects", "api_keys", "jobs", "job_events", "checkpoints"}


def test_upgrade_matches_the_models_and_downgrade_removes_everything(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent: every API start runs it
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert TABLES <= set(inspect(conn).get_table_names())
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        with engine.connect() as conn:
            assert not TABLES & set(inspect(conn).get_table_names())
        migrate(engine)
    finally:
        engine.dispose()
