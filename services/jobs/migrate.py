"""`python -m services.jobs.migrate`: `alembic upgrade head` on INVDPO_DATABASE_URL, then exit (the one-shot
migration job of docker-compose.yml and the Helm chart; concurrent runs take turns, see db.migrate)."""

from __future__ import annotations

import logging
import sys

from services.jobs.db import make_engine, migrate
from services.jobs.logs import configure_logging, mask_secrets
from services.jobs.settings import JobSettings

log = logging.getLogger("services.jobs.migrate")


def main() -> int:
    settings = JobSettings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
    except Exception as exc:
        # One line, credentials masked (the database URL may carry a password).
        log.error("migration failed: %s", mask_secrets(" ".join(str(exc).split()) or type(exc).__name__))
        return 1
    finally:
        engine.dispose()
    log.info("database schema is at the latest revision")
    return 0


if __name__ == "__main__":
    sys.exit(main())
