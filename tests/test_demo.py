"""`make demo` (services/demo.py) and the embedded broker it runs on: kombu's filesystem transport."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from services.api.settings import Settings as ApiSettings
from services.jobs.queue import enqueue_training, job_id_of_message, make_celery, ping_broker
from services.serving.settings import Settings as ServingSettings
from services.worker.settings import Settings as WorkerSettings

REPO = Path(__file__).resolve().parent.parent


def test_filesystem_broker_carries_train_job(tmp_path: Path) -> None:
    """The demo's broker: a train_job message lands as a file in the folder the URL names, readable as ever."""
    url = f"filesystem://{tmp_path / 'broker'}"
    app = make_celery(url)
    assert ping_broker(url, app)
    enqueue_training("ftjob-0123456789abcdef01234567", app)
    messages = [p for p in (tmp_path / "broker" / "queue").iterdir() if p.name.endswith(".gpu.msg")]
    assert len(messages) == 1
    assert job_id_of_message(messages[0].read_bytes()) == "ftjob-0123456789abcdef01234567"
    # A second app (the worker's process) reads the same folder.
    with make_celery(url).connection_for_read() as conn:
        message = conn.SimpleQueue("gpu").get(timeout=5)
        assert json.loads(message.body)[0] == ["ftjob-0123456789abcdef01234567"]
        message.ack()


def _children_of(out: Path) -> list[psutil.Process]:
    """Processes working in `out`: the demo starts its API and worker (and they their children) there."""
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(out):
            found.append(proc)
    return found


def _demo(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.demo", "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_stops_the_api_the_worker_and_the_model_server(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    demo = _demo(out)
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the API and the worker are started before step 1
            if line.startswith("[1/5]"):
                break
        deadline = time.monotonic() + 60
        while len(_children_of(out)) < 3:
            assert time.monotonic() < deadline and demo.poll() is None, "the children did not start"
            time.sleep(0.1)
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130
    assert err.strip().splitlines()[-1] == "demo interrupted; the API, the worker and the model server are stopped"
    assert _children_of(out) == []


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "services.demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "100"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if line and ":  " in line)
    assert lines["registered model"].strip() == "models:/invdpo-demo/1"
    # Promoted when the gate's evidence holds; otherwise the refusal is shown and the candidate is used.
    alias = lines["alias"].strip()
    assert alias.startswith("champion") or (
        alias.startswith("candidate (not promoted") and "the promotion gate refused it: 409" in result.stdout
    ), result.stdout
    if alias.startswith("champion"):
        assert "POST /v1/images/generations answered by version 1" in result.stdout, result.stdout
    sample = Path(lines["sample image"].strip())
    assert sample == out / "sample.png"
    with Image.open(sample) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert f"ui --backend-store-uri sqlite:///{out}/mlflow.db" in lines["MLflow UI"]
    assert "100%" in result.stderr and "implicit_acc=" in result.stderr  # the live progress bar
    assert _children_of(out) == []
    print(f"demo wall time: {elapsed:.0f} s")


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is PydanticUndefined:
        return "required"
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _variable(settings: type[BaseSettings], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    return alias if isinstance(alias, str) else f"{settings.model_config.get('env_prefix', '')}{name}".upper()


@pytest.mark.parametrize(
    ("title", "package", "settings"),
    [("API", "api", ApiSettings), ("Worker", "worker", WorkerSettings), ("Model server", "serving", ServingSettings)],
)
def test_readme_configuration_is_the_settings(title: str, package: str, settings: type[BaseSettings]) -> None:
    """The README's Configuration tables list every setting with its exact environment variable and default."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n{title} (`services/{package}/settings.py`):\n", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [f"| `{_variable(settings, name, f)}` | `{_default(f)}` |" for name, f in settings.model_fields.items()]
    assert [row[: len(prefix)] for row, prefix in zip(rows, expected, strict=False)] == expected
    assert len(rows) == len(expected)
