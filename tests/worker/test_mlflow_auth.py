"""MLflow with authentication, run outside Docker with the commands and environment of docker-compose.yml: its
`mlflow` service (the basic-auth app, the auth configuration written from the environment at start) and its
`mlflow-users` one-shot job (the service user). Only the host, the port and the stores change: loopback, a free
port, SQLite for the two databases, the moto S3 server for artifacts.

Without credentials every REST call gets 401; the service user gets 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, free_port, wait_until

sys.path.append(str(ROOT / "tests" / "deploy"))
from deploy_contract import INTERPOLATION  # noqa: E402  (the compose interpolation syntax the deploy tests use)

COMPOSE = ROOT / "docker-compose.yml"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
ADMIN_PASSWORD, SERVICE_PASSWORD = "admin-" + uuid.uuid4().hex, "service-" + uuid.uuid4().hex


def _compose_service(name: str, values: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The service's entrypoint + command and environment, interpolated as `docker compose` would with `values`."""

    def resolve(text: str) -> str:
        def substitute(match) -> str:  # type: ignore[no-untyped-def]
            variable, operator, argument = match.groups()
            if variable in values:
                return values[variable]
            assert not (operator and "?" in operator), f"the test must set {variable}"
            return argument if operator else ""

        return INTERPOLATION.sub(substitute, text).replace("$$", "$")

    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    command = [resolve(part) for part in service.get("entrypoint", []) + service["command"]]
    env = {key: resolve(str(value)) for key, value in service["environment"].items()}
    return command, env


@pytest.fixture(scope="module")
def mlflow_compose(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    values = {"MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SECRET_KEY": uuid.uuid4().hex,
              "POSTGRES_PASSWORD": "unused", "S3_ACCESS_KEY_ID": "testing",
              "S3_SECRET_ACCESS_KEY": "testing"}  # fmt: skip
    command, env = _compose_service("mlflow", values)
    assert command[:2] == ["/bin/sh", "-c"] and "--app-name basic-auth" in command[2]
    # Loopback and a free port instead of the container's 0.0.0.0:5000; the stores of this test.
    command[2] = command[2].replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    # One worker process: uvicorn's supervisor kills workers that miss its 5 s ping, which they do on a loaded
    # 2-core test machine, so the server never comes up with two.
    command[2] = command[2].replace("--workers 2", "--workers 1")
    env.update(
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{root / 'auth.db'}",
        MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
        MLFLOW_S3_ENDPOINT_URL=s3_server,
        AWS_ENDPOINT_URL_S3=s3_server,
    )
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `mlflow` of this virtualenv
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(command, env={"PATH": path, "HOME": str(root), **env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200  # /health needs no credentials
        except httpx.HTTPError:
            return False

    wait_until(healthy, 900, "mlflow server with basic-auth", interval=0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    log.close()


def _run_compose_job(name: str, url: str, values: dict[str, str], extra_env: dict[str, str]) -> str:
    command, env = _compose_service(name, values)
    assert command[0] == "invdpo-admin"
    env.update(INVDPO_MLFLOW_TRACKING_URI=url, **extra_env)
    done = subprocess.run(
        [sys.executable, "-m", "services.admin", *command[1:]], env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_mlflow_refuses_calls_without_credentials_and_serves_the_service_user(mlflow_compose: str) -> None:
    url = mlflow_compose
    for path in (SEARCH, "/api/2.0/mlflow/registered-models/search", "/api/2.0/mlflow/users/get?username=admin"):
        answer = httpx.get(url + path, timeout=120)
        print(f"GET {path} without credentials: {answer.status_code}")
        assert answer.status_code == 401, answer.text
    assert httpx.get(url + SEARCH, auth=("invdpo", "guess"), timeout=120).status_code == 401

    values = {"MLFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_SERVICE_PASSWORD": SERVICE_PASSWORD}
    assert "created" in _run_compose_job("mlflow-users", url, values, {})
    assert "exists" in _run_compose_job("mlflow-users", url, values, {})  # idempotent: every `compose up` runs it
    answer = httpx.get(url + SEARCH, auth=("invdpo", SERVICE_PASSWORD), timeout=120)
    print(f"GET {SEARCH} as the service user: {answer.status_code}")
    assert answer.status_code == 200, answer.text
