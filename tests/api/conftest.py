"""API test fixtures: a real Redis (own server on a free loopback port), real PostgreSQL and SQLite databases
(every test that takes `db_url` runs on both), a tiny real diffusers model and a two-image JSONL dataset."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine, text

from services.admin import create_api_key
from services.api.main import create_app
from services.api.settings import Settings
from services.jobs.db import make_engine, migrate

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TABLES = ("checkpoints", "job_events", "jobs", "api_keys", "projects")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of our own (the shared one on 6379 belongs to everyone), no persistence."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@contextmanager
def pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of our own; dropped afterwards."""
    name = f"invdpo_api_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database, one per backend for the session; tables are emptied before each test (`clean_db`)."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'invdpo.db'}"
        else:
            url = stack.enter_context(pg_database())
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all, per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture
def clean_db(db_url: str) -> str:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
    engine.dispose()
    return db_url


@pytest.fixture
def settings(clean_db: str, redis_url: str) -> Settings:
    # The reconciler loop is off unless a test turns it on; tests call reconciler functions directly.
    return Settings(database_url=clean_db, broker_url=redis_url, reconcile_interval_seconds=0, log_level="INFO")


@pytest.fixture
def make_client(settings: Settings, broker: redis.Redis) -> Iterator[Callable[..., TestClient]]:
    """make_client(**setting_overrides) -> a TestClient on a fresh app (lifespan run: migrations, reconciler)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def app(client: TestClient) -> FastAPI:
    return client.app  # type: ignore[return-value]


@pytest.fixture
def make_key(app: FastAPI) -> Callable[[str], dict[str, str]]:
    """make_key(project) -> Authorization headers with a new key of that project."""

    def make(project: str) -> dict[str, str]:
        with app.state.session_factory() as session:
            key, _ = create_api_key(session, project)
        return {"Authorization": f"Bearer {key}"}

    return make


@pytest.fixture
def auth(make_key: Callable[[str], dict[str, str]]) -> dict[str, str]:
    return make_key("alpha")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real (tiny) diffusers pipeline directory: model_index.json and every component."""
    from invdpo_core.testing import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_pipeline("sd15").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JSONL manifest with one preference pair of two 64 px PNGs."""
    root = tmp_path_factory.mktemp("toy-data")
    Image.new("RGB", (64, 64), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 220)).save(root / "blue.png")
    (root / "manifest.jsonl").write_text('{"prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"}\n')
    return str(root / "manifest.jsonl")


@pytest.fixture
def job_body(tiny_model: str, toy_dataset: str) -> Callable[..., dict[str, Any]]:
    """job_body(**overrides) -> a valid create-job request body (tiny model, toy dataset)."""

    def make(**overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": tiny_model,
            "training_file": toy_dataset,
            "method": {"type": "inversion_dpo", "hyperparameters": {"beta": 2000, "max_steps": 10}},
        }
        body.update(overrides)
        return body

    return make


@pytest.fixture
def gpu_messages(broker: redis.Redis) -> Callable[[], list[str]]:
    """gpu_messages() -> job ids of the train_job messages really waiting in the Redis `gpu` list, oldest first."""
    from services.jobs.queue import job_id_of_message

    def read() -> list[str]:
        raws = reversed(broker.lrange("gpu", 0, -1))  # kombu LPUSHes: the newest message is at the head
        return [job_id for raw in raws if (job_id := job_id_of_message(raw)) is not None]

    return read
