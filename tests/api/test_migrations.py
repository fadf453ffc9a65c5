"""Alembic migrations: they build exactly the tables of models.py, on PostgreSQL and SQLite, and go back down."""

from __future__ import annotations

import json

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from services.jobs.db import alembic_config, make_engine, make_session_factory, migrate
from services.jobs.models import Base, Job, utcnow

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


def test_dropping_the_hyperparameters_column_keeps_the_jobs(empty_db_url: str) -> None:
    """0003 drops jobs.hyperparameters (nothing read it); a job stored before keeps its row and its config, and the
    downgrade gives the column back, filled from the config."""
    engine = make_engine(empty_db_url)
    config = {"base_model": "org/m", "dataset": "s3://b/d.jsonl", "seed": 7, "beta": 2000.0, "max_steps": 10}
    try:
        migrate(engine, "0002")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', :t)"), {"t": utcnow()})
            conn.execute(
                text(
                    "INSERT INTO jobs (id, project_id, status, model, training_file, method_type, hyperparameters, "
                    "config, seed, created_at, attempt) VALUES ('ftjob-1', 1, 'queued', 'org/m', 's3://b/d.jsonl', "
                    "'inversion_dpo', :h, :c, 7, :t, 0)"
                ),
                {"h": json.dumps({"beta": 2000}), "c": json.dumps(config), "t": utcnow()},
            )
        migrate(engine)
        with engine.connect() as conn:
            assert "hyperparameters" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
        with make_session_factory(engine)() as session:
            job = session.get(Job, "ftjob-1")
            assert job is not None and job.config == config and job.status == "queued"
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        with engine.connect() as conn:
            [stored] = conn.execute(text("SELECT hyperparameters FROM jobs")).scalars().all()
        stored = json.loads(stored) if isinstance(stored, str) else stored
        assert stored == {"beta": 2000.0, "max_steps": 10}
    finally:
        engine.dispose()
