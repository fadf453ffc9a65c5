"""Worker test fixtures: real servers on loopback, each started once per session.

- Redis: our own redis-server on a free port, no persistence (restartable: `redis_server.restart()` empties it);
- PostgreSQL: a fresh database on the shared server, migrated, dropped at the end;
- S3: the moto server of tests/conftest.py (`s3_server`), with the AWS variables pointed at it for the session;
- MLflow: `mlflow server` with a SQLite backend and proxied local artifacts (`--serve-artifacts`);
- a tiny SD1.5-shaped pipeline and a toy JSONL preference dataset, uploaded to the S3 server.

`start_worker()` runs the real worker command (`celery -A services.worker.app worker ...`) as a subprocess in its
own process group, with the environment pointing at those servers; `api` is the real FastAPI app in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from fixtures_s3 import create_bucket, point_aws_env_at
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
JOBS = "/v1/fine_tuning/jobs"
# Short enough that a dead worker's job is taken over within seconds; several heartbeat intervals (1 s) long.
HEARTBEAT_TIMEOUT = 6.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def report(fault: str, **figures: Any) -> None:
    """Append what a fault test measured to $INVDPO_FAULTS_REPORT (JSON lines; benchmarks/faults.py prints them)."""
    path = os.environ.get("INVDPO_FAULTS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"fault": fault, **figures}) + "\n")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: _ping(client), 10, "redis-server")
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port: with no persistence, every queued message is gone."""
        self.stop()
        self.start()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a new, migrated SQLite job database (the worker's unit tests)."""
    from services.jobs.db import make_engine, make_session_factory, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    migrate(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database of our own; dropped afterwards."""
    from services.jobs.db import make_engine, migrate

    name = f"invdpo_worker_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def aws_env(s3_server: str) -> Iterator[str]:
    """The AWS variables point at the moto server for the whole session (the API and the workers read them)."""
    with pytest.MonkeyPatch.context() as mp:
        point_aws_env_at(mp, s3_server)
        yield s3_server


@pytest.fixture(scope="session")
def bucket(aws_env: str) -> str:
    return create_bucket(aws_env)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 900, "mlflow server", interval=0.5)  # generous: a loaded shared machine
        yield url
    finally:  # also when it never became healthy: no server left behind
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # gunicorn's graceful stop can outlast 30 s on a loaded machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


@pytest.fixture(scope="session")
def tiny_model_uri(bucket: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from invdpo_core.storage import upload_dir
    from invdpo_core.testing import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_pipeline("sd15").save_pretrained(path)
    uri = f"s3://{bucket}/models/tiny-sd15"
    upload_dir(path, uri)
    return uri


@pytest.fixture(scope="session")
def toy_dataset_uri(bucket: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from invdpo_core.storage import upload_dir
    from invdpo_core.toy import make_toy_dataset

    path = tmp_path_factory.mktemp("toy")
    make_toy_dataset(path, pairs=8, fmt="jsonl")
    upload_dir(path, f"s3://{bucket}/data/toy")
    return f"s3://{bucket}/data/toy/manifest.jsonl"


def shipped_timeouts(request: pytest.FixtureRequest) -> bool:
    """A test marked `shipped_timeouts` runs the API's reconciler and the workers' heartbeats with the settings'
    defaults, to measure what a deployment gets, instead of the shortened ones below."""
    return request.node.get_closest_marker("shipped_timeouts") is not None


@pytest.fixture
def api(
    pg_url: str, redis_server: RedisServer, mlflow_server: str, aws_env: str, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    """The real API app in-process, its reconciler looping every second (it re-sends lost and stale jobs)."""
    from services.api.main import create_app
    from services.api.settings import Settings

    shortened = {
        "reconcile_interval_seconds": 1,
        "reconcile_after_seconds": 3,
        "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT,
    }
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_server.url,
        mlflow_tracking_uri=mlflow_server,
        **({} if shipped_timeouts(request) else shortened),
        allow_local_files=False,
        migrate_on_startup=False,
        max_active_jobs_per_project=50,
        promotion_gate="none",  # test_promotion_gate.py tests the gate with its own rule
        rate_limit_requests=0,  # the tests poll fast; tests/api/test_request_hardening.py covers the limit
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def auth(api: TestClient) -> dict[str, str]:
    from services.admin import create_api_key

    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, _ = create_api_key(session, f"worker-tests-{uuid.uuid4().hex[:6]}")
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    work_dir: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group: the Celery main process, its pool process and the training
        processes they started."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Workers:
    env: dict[str, str]
    root: Path
    started: list[Worker] = field(default_factory=list)

    def start(self, **env: str) -> Worker:
        n = len(self.started)
        work_dir = self.root / f"work-{n}"  # each worker is a new machine: it restores from the store
        log = self.root / f"worker-{n}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "services.worker.app", "worker", "-Q", "gpu,default",
               "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"w{n}-{uuid.uuid4().hex[:4]}@%h",
               "--without-gossip", "--without-mingle"]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            env={**self.env, "INVDPO_WORK_DIR": str(work_dir), "INVDPO_HEARTBEAT_FILE": str(self.root / f"hb-{n}"),
                 **env},
            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        worker = Worker(proc, log, work_dir)
        self.started.append(worker)
        return worker

    def tails(self) -> str:
        return "\n".join(f"--- worker {i}\n{w.logs()[-4000:]}" for i, w in enumerate(self.started))


@pytest.fixture
def workers(
    pg_url: str,
    redis_server: RedisServer,
    mlflow_server: str,
    aws_env: str,
    bucket: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Workers]:
    shortened = {"INVDPO_HEARTBEAT_INTERVAL_SECONDS": "1", "INVDPO_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT)}
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INVDPO_DATABASE_URL": pg_url,
        "INVDPO_BROKER_URL": redis_server.url,
        "INVDPO_MLFLOW_TRACKING_URI": mlflow_server,
        "INVDPO_MLFLOW_EXPERIMENT": "worker-tests",
        "INVDPO_ARTIFACT_URI": f"s3://{bucket}/checkpoints",
        "INVDPO_CACHE_DIR": str(tmp_path / "model-cache"),
        **({} if shipped_timeouts(request) else shortened),
        "INVDPO_PROGRESS_INTERVAL_SECONDS": "0.5",
        "INVDPO_CANCEL_POLL_SECONDS": "0.5",
        "INVDPO_LOG_LEVEL": "INFO",
        # The API fixture's rule: the worker records each version's verdict under it, and the API promotes by that
        # verdict, so both must hold the same rule (test_promotion_gate.py tests the gate with its own).
        "INVDPO_PROMOTION_GATE": "none",
        "HF_HUB_OFFLINE": "1",
        # System metrics every second, so that even a short run has some.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
    }
    pool = Workers(env, tmp_path)
    yield pool
    for worker in pool.started:
        worker.kill()
        worker.proc.wait(30)
