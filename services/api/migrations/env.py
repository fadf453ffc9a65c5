"""Alembic environment: uses the connection handed over by `services.api.db.migrate`, else INVDPO_DATABASE_URL."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from services.api.models import Base

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
    # Command-line use: alembic -c services/api/alembic.ini upgrade head
    from services.api.db import make_engine
    from services.api.settings import get_settings

    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    if context.is_offline_mode():
        context.configure(url=get_settings().database_url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = make_engine(get_settings().database_url)
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
        engine.dispose()
