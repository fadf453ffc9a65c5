"""Engines, sessions and migrations. The API, the worker and `invdpo-admin` all open the database through here."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
MIGRATIONS = Path(__file__).with_name("migrations")
# Any fixed number: the key of the PostgreSQL advisory lock that serialises migrations of concurrent replicas.
_MIGRATION_LOCK = 7_460_201


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so API threads and a worker can share the file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No pre-ping: it costs a round trip on every checkout, the largest single cost of a GET under load. A dead
    # connection (database restarted) fails its one request, and SQLAlchemy then discards the whole pool.
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("pool_recycle", 1800)  # before proxies or the server drop idle connections
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: objects stay readable after the commit that ends each jobstore function.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


_MIGRATING = threading.Lock()


def migrate(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade <revision>` on `engine`; concurrent callers on PostgreSQL take turns."""
    cfg = alembic_config()
    # alembic's `context` and `op` are module globals it sets and deletes around each run: two threads migrating at
    # once in one process delete each other's (KeyError 'config'). Ours take turns; MLflow's own alembic runs (its
    # SQLite stores) do not take our lock, so a database already at head is not run through alembic's environment.
    with _MIGRATING, engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        if revision == "head" and _at_head(conn, cfg):
            return
        # env.py uses this connection rather than a URL (no password goes through ini interpolation or logs).
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _at_head(conn: Connection, cfg: Config) -> bool:
    """Is the database at the newest revision? (Read without alembic's environment: no module globals.)"""
    current = set(MigrationContext.configure(conn).get_current_heads())
    return current == set(ScriptDirectory.from_config(cfg).get_heads())
