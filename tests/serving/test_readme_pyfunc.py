"""Slow: the README's `mlflow models serve` example, run as written (only the ports changed to free ones) against
a real MLflow server holding a version registered as the worker registers it."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from registry_fixtures import PASSING, make_registry, wait_until
from worker.conftest import free_port, mlflow_server, pg_url  # noqa: F401  (fixtures of the real servers)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def readme_pyfunc_example() -> list[str]:
    """The bash lines of the README block that runs `mlflow models serve`, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "mlflow models serve" in b)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_mlflow_models_serve_example_works(
    pg_url: str,  # noqa: F811
    mlflow_server: str,  # noqa: F811
    tiny_pipeline_dir: Path,
    tmp_path: Path,
) -> None:
    export, serve, curl = readme_pyfunc_example()
    name = re.search(r"models:/([^@\s]+)@champion", serve).group(1)  # type: ignore[union-attr]
    for registry in make_registry(pg_url, mlflow_server, tiny_pipeline_dir, None):
        version = registry.version(name, registry.tenant("readme").project_id, PASSING)
        MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", str(version))

    port = free_port()
    ports = {"http://127.0.0.1:5000": mlflow_server, "5001": str(port)}
    export, serve, curl = (re.sub("|".join(map(re.escape, ports)), lambda m: ports[m.group(0)], line)
                           for line in (export, serve, curl))  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # This machine's cores are shared: one torch thread, and more than MLflow's 60 s for a prediction.
        "OMP_NUM_THREADS": "1",
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "600",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(["bash", "-c", f"{export} && exec {serve}"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:

        def up() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_until(up, 300, "mlflow models serve")
        answer = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        log.close()
    predictions = json.loads(answer.stdout)["predictions"]
    image = Image.open(io.BytesIO(base64.b64decode(predictions[0]["image"])))
    assert len(predictions) == 1 and image.format == "PNG" and image.size == (64, 64)
