"""The core CLI starts fast and quietly: `invdpo --help` and `invdpo dataset validate` import none of the ML
libraries (torch, diffusers and transformers are most of a slow start), and no command prints library warnings
(transformers' "requires torchvision" notices on every pipeline import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "mlflow")

# Runs the `invdpo` entry point, then reports which heavy modules it imported (on stdout's last line).
RUN = (
    "import json, sys\n"
    "from services.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    "sys.exit(code)\n"
)


def invdpo(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_ml_library_and_prints_no_warning():
    done, heavy = invdpo("--help")
    assert done.returncode == 0, done.stderr
    assert heavy == []
    assert done.stderr == ""


def test_dataset_validate_imports_no_ml_library_and_prints_no_warning(tmp_path):
    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), (30, 30, 220)).save(tmp_path / "blue.png")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"}\n')
    done, heavy = invdpo("dataset", "validate", str(manifest))
    assert done.returncode == 0, done.stderr
    assert "pairs: 1" in done.stdout
    assert heavy == []
    assert done.stderr == ""


def test_a_command_that_loads_a_pipeline_prints_no_torchvision_notice(tmp_path):
    # diffusers imports transformers' image processors for IP-Adapters; without torchvision transformers warned
    # twice on every command that imports a pipeline.
    done, heavy = invdpo("tiny-model", str(tmp_path / "model"))
    assert done.returncode == 0, done.stderr
    assert "diffusers" in heavy and "transformers" in heavy  # the imports that used to warn did happen
    assert "torchvision" not in done.stderr and "[transformers]" not in done.stderr, done.stderr
