"""`invdpo-admin`: operator commands for the API's database (keys, migrations, one reconcile pass).

    invdpo-admin create-key --project P [--name N]   prints a new API key once; only its sha256 is stored
    invdpo-admin list-keys [--project P]             prefixes, projects, created/revoked (never the keys)
    invdpo-admin revoke-key PREFIX
    invdpo-admin migrate                             alembic upgrade head
    invdpo-admin reconcile                           re-send jobs whose broker message was lost, once

The database is INVDPO_DATABASE_URL, as for the API.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.security import generate_key
from services.api.settings import get_settings
from services.jobs.db import make_engine, make_session_factory, migrate
from services.jobs.logs import mask_secrets
from services.jobs.models import ApiKey, Project, utcnow


def create_api_key(session: Session, project: str, name: str | None = None) -> tuple[str, str]:
    """Make a key for `project` (created if new). Returns (key, prefix); the key cannot be recovered later."""
    row = session.scalars(select(Project).where(Project.name == project)).first()
    if row is None:
        row = Project(name=project)
        session.add(row)
        session.flush()
    key, prefix, key_hash = generate_key()
    session.add(ApiKey(project_id=row.id, prefix=prefix, key_hash=key_hash, name=name))
    session.commit()
    return key, prefix


def revoke_api_key(session: Session, prefix: str) -> bool:
    key = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).first()
    if key is None:
        return False
    key.revoked_at = utcnow()
    session.commit()
    return True


def _project_name(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 128 or not value.isprintable():
        raise argparse.ArgumentTypeError("a project name is 1-128 printable characters")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invdpo-admin", description="Operate the invdpo API's database.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create-key", help="create an API key for a project (the project is created if new)")
    p.add_argument("--project", required=True, type=_project_name)
    p.add_argument("--name", help="a label for the key, e.g. who uses it")
    p = sub.add_parser("list-keys", help="list keys by prefix")
    p.add_argument("--project", type=_project_name)
    p = sub.add_parser("revoke-key", help="revoke a key by its prefix (invdpo-xxxxxxxx)")
    p.add_argument("prefix")
    sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    sub.add_parser("reconcile", help="run one reconciler pass now")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        with factory() as session:
            if args.command == "create-key":
                key, prefix = create_api_key(session, args.project, args.name)
                print(f"Created key {prefix} for project {args.project}. Store it now; it is not shown again:")
                print(key)
            elif args.command == "list-keys":
                query = select(ApiKey.prefix, Project.name, ApiKey.name, ApiKey.created_at, ApiKey.revoked_at).join(
                    Project
                )
                if args.project:
                    query = query.where(Project.name == args.project)
                for prefix, project, name, created, revoked in session.execute(query.order_by(ApiKey.id)):
                    state = f"revoked {revoked:%Y-%m-%d}" if revoked else "active"
                    print(f"{prefix}  {project}  {name or '-'}  created {created:%Y-%m-%d}  {state}")
            elif args.command == "revoke-key":
                if not revoke_api_key(session, args.prefix):
                    print(f"error: no active key {args.prefix}", file=sys.stderr)
                    return 1
                print(f"revoked {args.prefix}")
            elif args.command == "reconcile":
                from services.jobs import reconciler
                from services.jobs.queue import make_celery

                report = reconciler.run_once(factory, settings, make_celery(settings.broker_url))
                print(
                    f"requeued {len(report.requeued)}, resumed {len(report.resumed)}, failed {len(report.failed)}, "
                    f"cancelled {len(report.cancelled)}, revalidated {len(report.revalidate)}"
                )
            # migrate: already done above
    except Exception as exc:
        # One line, credentials masked (the database URL may carry a password).
        print(f"error: {mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
