"""`invdpo-admin`: operator commands for the API's database (keys, migrations, one reconcile pass).

    invdpo-admin create-key --project P [--name N] [--scope S ...]
                                                     prints a new API key once; only its sha256 is stored.
                                                     Scopes: jobs:read jobs:write models:read models:promote
                                                     (the default: all four) and models:force
    invdpo-admin list-keys [--project P]             prefixes, projects, created/revoked (never the keys)
    invdpo-admin revoke-key PREFIX
    invdpo-admin set-prefixes --project P [s3://bucket/prefix ...]
                                                     the only places P's models and data may come from; none: any
    invdpo-admin set-limits --project P [--max-active-jobs N] [--max-gpu-hours H]
                                                     P's own limits at job creation (0: back to the API's settings
                                                     INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT, ..._MAX_GPU_HOURS_PER_PROJECT)
    invdpo-admin migrate                             alembic upgrade head
    invdpo-admin reconcile                           re-send jobs whose broker message was lost, once
    invdpo-admin mlflow-service-user                 create MLflow's user MLFLOW_TRACKING_USERNAME (password
                                                     MLFLOW_TRACKING_PASSWORD) if missing, as MLflow's admin

The database is INVDPO_DATABASE_URL and MLflow INVDPO_MLFLOW_TRACKING_URI, as for the API; MLflow's admin is
MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, the variables the MLflow server reads too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.security import generate_key
from services.api.settings import get_settings
from services.jobs.db import make_engine, make_session_factory, migrate
from services.jobs.logs import mask_secrets
from services.jobs.models import DEFAULT_SCOPES, SCOPES, ApiKey, Project, utcnow


def create_api_key(
    session: Session, project: str, name: str | None = None, scopes: Sequence[str] = DEFAULT_SCOPES
) -> tuple[str, str]:
    """Make a key for `project` (created if new) with `scopes` (models.SCOPES). Returns (key, prefix); the key
    cannot be recovered later."""
    row = session.scalars(select(Project).where(Project.name == project)).first()
    if row is None:
        row = Project(name=project)
        session.add(row)
        session.flush()
    key, prefix, key_hash = generate_key()
    session.add(ApiKey(project_id=row.id, prefix=prefix, key_hash=key_hash, name=name, scopes=sorted(set(scopes))))
    session.commit()
    return key, prefix


def revoke_api_key(session: Session, prefix: str) -> bool:
    key = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).first()
    if key is None:
        return False
    key.revoked_at = utcnow()
    session.commit()
    return True


class MlflowAdmin:
    """MLflow's basic-auth REST API (users and permissions), called as MLflow's admin."""

    def __init__(self, tracking_uri: str):
        import httpx

        user, password = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME"), os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        if not user or not password:
            raise ValueError("set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's admin)")
        self.http = httpx.Client(
            base_url=tracking_uri.rstrip("/") + "/api/2.0/mlflow", auth=(user, password), timeout=60
        )

    def create_user(self, username: str, password: str) -> bool:
        """True if created, False if the user exists."""
        answer = self.http.post("/users/create", json={"username": username, "password": password})
        if answer.status_code in (400, 409) and "RESOURCE_ALREADY_EXISTS" in answer.text:
            return False
        answer.raise_for_status()
        return True


def set_allowed_prefixes(session: Session, project: str, prefixes: list[str] | None) -> list[str] | None:
    """Limit `project` (created if new) to models and data under `prefixes` (s3:// URIs, normalised); None lifts
    the limit. Returns what was stored. Raises ValueError for a prefix that is not s3://bucket[/key]."""
    from invdpo_core.storage import normalise_prefix  # boto3: only this command needs it

    stored = None if prefixes is None else sorted({normalise_prefix(p) for p in prefixes})
    row = session.scalars(select(Project).where(Project.name == project)).first()
    if row is None:
        row = Project(name=project)
        session.add(row)
    row.allowed_prefixes = stored
    session.commit()
    return stored


def set_limits(
    session: Session, project: str, *, max_active_jobs: int | None, max_gpu_hours: float | None
) -> tuple[int | None, float | None]:
    """Set `project`'s (created if new) own limits; a None argument leaves that limit as it is, 0 clears it (the
    API's setting applies again). Returns what is stored."""
    row = session.scalars(select(Project).where(Project.name == project)).first()
    if row is None:
        row = Project(name=project)
        session.add(row)
    if max_active_jobs is not None:
        row.max_active_jobs = max_active_jobs or None
    if max_gpu_hours is not None:
        row.max_gpu_hours = max_gpu_hours or None
    session.commit()
    return row.max_active_jobs, row.max_gpu_hours


def _not_negative(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < 0 or number != number or number == float("inf"):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
        return number

    return parse


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
    p.add_argument(
        "--scope", action="append", choices=SCOPES, dest="scopes",
        help=f"what the key may do; repeat for several (default: {' '.join(DEFAULT_SCOPES)}). models:force promotes "
        "versions the promotion gate refused",
    )  # fmt: skip
    p = sub.add_parser("list-keys", help="list keys by prefix")
    p.add_argument("--project", type=_project_name)
    p = sub.add_parser("revoke-key", help="revoke a key by its prefix (invdpo-xxxxxxxx)")
    p.add_argument("prefix")
    p = sub.add_parser(
        "set-prefixes",
        help="limit a project's models, datasets and images to s3:// prefixes (none given: no limit)",
    )
    p.add_argument("--project", required=True, type=_project_name)
    p.add_argument("prefixes", nargs="*", metavar="s3://bucket/prefix")
    p = sub.add_parser("set-limits", help="set a project's own limits on active jobs and requested GPU-hours")
    p.add_argument("--project", required=True, type=_project_name)
    p.add_argument("--max-active-jobs", type=_not_negative(int), help="jobs validating, queued or running at once")
    p.add_argument(
        "--max-gpu-hours",
        type=_not_negative(float),
        help="GPU-hours its active jobs may ask for together (nodes x gpus_per_node x max_runtime_seconds each)",
    )
    sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    sub.add_parser("reconcile", help="run one reconciler pass now")
    sub.add_parser("mlflow-service-user", help="create the MLflow user the API and the worker log in as")
    return parser


def _error_line(exc: Exception) -> str:
    """One line, credentials masked (the database URL may carry a password)."""
    return f"error: {mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    if args.command == "mlflow-service-user":  # MLflow only, no database
        try:
            user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
            if not user or not password:
                raise ValueError("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the service user)")
            made = MlflowAdmin(settings.mlflow_tracking_uri).create_user(user, password)
            print(f"MLflow user {user} {'created' if made else 'exists'}")
        except Exception as exc:
            print(
                f"error: {mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}", file=sys.stderr
            )
            return 1
        return 0
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        with factory() as session:
            if args.command == "create-key":
                key, prefix = create_api_key(session, args.project, args.name, args.scopes or DEFAULT_SCOPES)
                granted = " ".join(sorted(set(args.scopes or DEFAULT_SCOPES)))
                print(f"Created key {prefix} for project {args.project} ({granted}). Store it now, it is shown once:")
                print(key)
            elif args.command == "list-keys":
                query = select(
                    ApiKey.prefix, Project.name, ApiKey.name, ApiKey.scopes, ApiKey.created_at, ApiKey.revoked_at
                ).join(Project)
                if args.project:
                    query = query.where(Project.name == args.project)
                for prefix, project, name, scopes, created, revoked in session.execute(query.order_by(ApiKey.id)):
                    state = f"revoked {revoked:%Y-%m-%d}" if revoked else "active"
                    label = f"{name or '-'}  {','.join(scopes)}"
                    print(f"{prefix}  {project}  {label}  created {created:%Y-%m-%d}  {state}")
            elif args.command == "revoke-key":
                if not revoke_api_key(session, args.prefix):
                    print(f"error: no active key {args.prefix}", file=sys.stderr)
                    return 1
                print(f"revoked {args.prefix}")
            elif args.command == "set-prefixes":
                stored = set_allowed_prefixes(session, args.project, args.prefixes or None)
                print(f"project {args.project}: " + (", ".join(stored) if stored else "any prefix"))
            elif args.command == "set-limits":
                jobs, hours = set_limits(
                    session, args.project, max_active_jobs=args.max_active_jobs, max_gpu_hours=args.max_gpu_hours
                )
                api_jobs, api_hours = settings.max_active_jobs_per_project, settings.max_gpu_hours_per_project
                print(
                    f"project {args.project}: max active jobs {jobs or f'{api_jobs} (API)'}, "
                    f"max GPU-hours {f'{hours:g}' if hours else f'{api_hours:g} (API)'}"
                )
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
        print(_error_line(exc), file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
