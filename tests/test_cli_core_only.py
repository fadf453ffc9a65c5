"""`pip install invdpo` without the `service` extra: the `invdpo` command still runs the core's commands, and the job
client's commands say in one line what to install. Simulated in a subprocess where every module of the extra
(from the installed package's metadata) fails to import, as it would when it is not installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

from services.client import MISSING_EXTRA

ROOT = Path(__file__).resolve().parents[1]


def service_extra_modules() -> list[str]:
    """Top-level module names of the installed `service` extra: 'psycopg[binary]>=3.1; extra == "service"' ->
    psycopg, prometheus-client -> prometheus_client."""
    extra = [spec for spec in requires("invdpo") or [] if re.search(r"extra\s*==\s*.service.", spec)]
    return [re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].replace("-", "_") for spec in extra]


# None in sys.modules makes `import name` (and `import name.sub`) raise ModuleNotFoundError.
CORE_ONLY = (
    "import sys\n"
    f"for name in {service_extra_modules()!r}:\n"
    "    sys.modules[name] = None\n"
    "from services.cli import main\n"
    "sys.exit(main())\n"
)


def invdpo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CORE_ONLY, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_service_extra_is_what_is_blocked():
    assert {"httpx", "fastapi", "sqlalchemy", "celery", "mlflow", "prometheus_client"} <= set(service_extra_modules())


def test_help_and_tiny_model_work_and_job_commands_name_the_extra(tmp_path):
    result = invdpo("--help")
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("train", "dataset", "tiny-model", "evaluate", "jobs"))

    for args in (("jobs", "list"), ("models", "promote", "m", "1")):
        result = invdpo(*args)
        assert result.returncode == 2
        assert result.stderr == f"error: {MISSING_EXTRA}\n" and result.stdout == ""

    result = invdpo("tiny-model", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model" / "model_index.json").is_file()


@pytest.mark.slow
def test_dataset_train_and_evaluate_run_without_the_extra(tmp_path):
    assert invdpo("tiny-model", str(tmp_path / "model")).returncode == 0
    result = invdpo(
        "dataset", "make-toy", str(tmp_path / "data"), "--pairs", "4", "--model-dir", str(tmp_path / "model")
    )
    assert result.returncode == 0, result.stderr
    (manifest,) = (tmp_path / "data").glob("*.jsonl")
    assert invdpo("dataset", "validate", str(manifest)).returncode == 0

    overrides = {
        "base_model": tmp_path / "model", "dataset": manifest, "output_dir": tmp_path / "run", "resolution": 64,
        "inversion_steps": 2, "max_steps": 1, "batch_size": 2,
    }  # fmt: skip
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    result = invdpo("train", *sets, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "done"

    (tmp_path / "prompts.txt").write_text("a red circle\n")
    result = invdpo(
        "evaluate", "--model", str(tmp_path / "run" / "model"), "--base", str(tmp_path / "model"),
        "--pairs", str(manifest), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "eval"),
        "--steps", "2", "--draws", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["pair_metrics"]["implicit_acc"]["mean"] <= 1
