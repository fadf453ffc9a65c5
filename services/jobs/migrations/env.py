"""Alembic environment: uses the connection handed over by `services.jobs.db.migrate`, else INVDPO_DATABASE_URL."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from services.jobs.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    # Command-line use: alembic -c services/jobs/alembic.ini upgrade head
    from services.jobs.db import make_engine
    from services.jobs.settings import JobSettings

    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    if context.is_offline_mode():
        context.configure(url=JobSettings().database_url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = make_engine(JobSettings().database_url)
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
        engine.dispose()
