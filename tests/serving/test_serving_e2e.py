"""Slow, against the real stack: PostgreSQL, an MLflow server, the control plane's promote route, and the model
server as its own process (`python -m services.serving`). Promotions (through the API, and by moving the alias
with the MLflow client as the UI does) switch the served version within two poll intervals while a client sends
requests continuously, none of which fails; a champion moved to a gate-refused version changes nothing served."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from registry_fixtures import FAILING, PASSING, Registry, make_registry, wait_until
from worker.conftest import free_port, mlflow_server, pg_url  # noqa: F401  (fixtures of the real servers)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
POLL = 4.0  # seconds between alias look-ups


@pytest.fixture
def stack(pg_url: str, mlflow_server: str, tiny_pipeline_dir: Path) -> Iterator[Registry]:  # noqa: F811
    yield from make_registry(pg_url, mlflow_server, tiny_pipeline_dir, None)


@pytest.fixture
def api(stack: Registry) -> Iterator[TestClient]:
    """The control plane in-process, with its default promotion gate."""
    from services.api.main import create_app
    from services.api.settings import Settings

    settings = Settings(
        database_url=stack.database_url, mlflow_tracking_uri=stack.tracking_uri, broker_url="redis://127.0.0.1:1/0",
        reconcile_interval_seconds=0, migrate_on_startup=False,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield client


def start_server(stack: Registry, tmp_path: Path, models: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INVDPO_DATABASE_URL": stack.database_url,
        "INVDPO_MLFLOW_TRACKING_URI": stack.tracking_uri,
        "INVDPO_SERVING_MODELS": models,
        "INVDPO_SERVING_POLL_SECONDS": str(POLL),
        "INVDPO_SERVING_PORT": str(port),
        "INVDPO_SERVING_HOST": "127.0.0.1",
        "INVDPO_SERVING_DEVICE": "cpu",
        "INVDPO_SERVING_CACHE_DIR": str(tmp_path / "cache"),
    }
    log = open(tmp_path / "serving.log", "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serving"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, f"http://127.0.0.1:{port}"


class Client(threading.Thread):
    """Sends generation requests back to back until stopped; records (status, version served) of each."""

    def __init__(self, url: str, key: str):
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.answers: list[tuple[int, int | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stopping.is_set():
                answer = http.post(
                    "/v1/images/generations", json={"model": "cats", "prompt": "a cat", "steps": 1},
                    headers={"Authorization": f"Bearer {self.key}"},
                )  # fmt: skip
                version = answer.headers.get("x-model-version")
                self.answers.append((answer.status_code, int(version) if version else None))

    def latest(self) -> int | None:
        return self.answers[-1][1] if self.answers else None


def test_promotions_switch_the_served_version_without_a_failed_request(
    stack: Registry, api: TestClient, tmp_path: Path
) -> None:
    mlflow = MlflowClient(stack.tracking_uri)
    alpha = stack.tenant("alpha")
    auth = {"Authorization": f"Bearer {alpha.key}"}
    v1 = stack.version("cats", alpha.project_id, PASSING)
    assert api.post("/v1/models/cats/promote", json={"version": v1}, headers=auth).status_code == 200

    proc, url = start_server(stack, tmp_path, "cats")
    try:
        wait_until(lambda: _status(url, "/readyz") == 200, 300, f"the server ({(tmp_path / 'serving.log')})")
        client = Client(url, alpha.key)
        client.start()
        wait_until(lambda: client.latest() == v1, 30, "v1 served")

        # Through the control plane's promote route (gate passed).
        v2 = stack.version("cats", alpha.project_id, PASSING)
        promoted = time.monotonic()
        assert api.post("/v1/models/cats/promote", json={"version": v2}, headers=auth).status_code == 200
        wait_until(lambda: client.latest() == v2, 2 * POLL, "v2 served within two poll intervals")
        switch_api = time.monotonic() - promoted

        # By moving the alias with the MLflow client, as the MLflow UI does.
        v3 = stack.version("cats", alpha.project_id, PASSING)
        promoted = time.monotonic()
        mlflow.set_registered_model_alias("cats", "champion", str(v3))
        wait_until(lambda: client.latest() == v3, 2 * POLL, "v3 served within two poll intervals")
        switch_ui = time.monotonic() - promoted

        # The UI moves champion to a version the gate refuses: v3 keeps serving, and the server says why.
        refused = stack.version("cats", alpha.project_id, FAILING)
        assert api.post("/v1/models/cats/promote", json={"version": refused}, headers=auth).status_code == 409
        mlflow.set_registered_model_alias("cats", "champion", str(refused))
        time.sleep(2 * POLL + 1)
        health = httpx.get(f"{url}/healthz").json()["models"]["cats"]
        assert health["version"] == v3 and health["not_served"] == {
            "version": refused, "reason": "promotion gate failed: eval/implicit_acc_lower 0.45 <= 0.5"
        }  # fmt: skip
        assert client.latest() == v3
        metrics = httpx.get(f"{url}/metrics").text
        assert f'invdpo_serving_alias_version_held_back{{model="cats"}} {float(refused)}' in metrics
        assert f'invdpo_serving_model_version{{model="cats"}} {float(v3)}' in metrics

        client.stopping.set()
        client.join(60)
    finally:
        proc.terminate()
        proc.wait(30)
    failed = [answer for answer in client.answers if answer[0] != 200]
    versions = [version for _, version in client.answers]
    print(
        f"\nserving e2e: {len(client.answers)} requests, {len(failed)} failed; switch after promotion "
        f"{switch_api:.1f} s (API), {switch_ui:.1f} s (alias set with the MLflow client); poll {POLL:.0f} s"
    )
    assert failed == [] and len(client.answers) > 20
    assert versions == sorted(versions) and {v1, v2, v3} <= set(versions) and refused not in versions
    assert "alias points at a version that is not served" in (tmp_path / "serving.log").read_text()


def _status(url: str, path: str) -> int:
    try:
        return httpx.get(url + path, timeout=2).status_code
    except httpx.HTTPError:
        return 0
