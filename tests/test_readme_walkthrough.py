"""Slow: the README's walkthrough, taken from README.md's own text, run against a stack started by services.stack
(what `make stack` runs) in a directory of its own, so the docs cannot drift from the code.

The walkthrough is every fenced block right after a `<!-- walkthrough -->` line, in the order they appear (the
REST API, Serving and CLI sections): bash blocks run as one script (`set -euo pipefail`, so a failing command or
a curl -f that gets an HTTP error fails the test), python blocks with the virtualenv's python, from the same shell.
Then services/api/README.md's marked block runs the same way. Afterwards the job must have succeeded, passed the
default promotion gate and been served; and `services.stack down` must leave no process and no database behind.

The other examples of README.md, services/*/README.md and docs/*.md are checked by tests/test_doc_examples.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- walkthrough -->\n```(bash|python)\n(.*?)^```", re.S | re.M)
WALKTHROUGHS = (ROOT / "README.md", ROOT / "services" / "api" / "README.md")


def walkthrough(path: Path) -> list[tuple[str, str]]:
    """(language, code) of each marked block of `path`, in order."""
    return BLOCK.findall(path.read_text())


def as_script(blocks: list[tuple[str, str]], prelude: str = "") -> str:
    lines = ["set -euo pipefail", "trap 'echo \"walkthrough: failed: $BASH_COMMAND\" >&2' ERR", "set -x", prelude]
    for language, code in blocks:
        lines.append(code if language == "bash" else f"python - <<'PYTHON'\n{code}PYTHON\n")
    return "\n".join(lines)


def read_env(path: Path) -> dict[str, str]:
    """The variables of the stack's env file (`export NAME=value` lines, shell-quoted)."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


def get(url: str, key: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def stack(command: str, directory: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.stack", command, "--dir", str(directory)], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_the_readme_says_how_the_walkthrough_starts_and_marks_its_blocks() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = walkthrough(ROOT / "README.md")
    assert len(blocks) >= 6 and {language for language, _ in blocks} == {"bash", "python"}
    assert blocks[0][1].startswith("source .stack/env"), "the walkthrough starts in the stack's shell"
    assert "make stack " in readme and "make stack-down" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "-m services.stack up" in makefile and "-m services.stack down" in makefile  # what the test starts
    assert walkthrough(ROOT / "services" / "api" / "README.md")


def test_the_walkthrough_runs_as_written_against_make_stack(tmp_path: Path) -> None:
    directory = tmp_path / ".stack"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    up = stack("up", directory, 1200)
    times["stack up"] = time.monotonic() - t0
    state = json.loads((directory / "state.json").read_text()) if (directory / "state.json").exists() else None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "API key:" in up.stdout and "source " in up.stdout
        env_file = read_env(directory / "env")
        for name in ("INVDPO_API_URL", "INVDPO_API_KEY", "INVDPO_SERVING_URL", "AWS_ENDPOINT_URL_S3",
                     "MLFLOW_S3_ENDPOINT_URL", "AWS_REQUEST_CHECKSUM_CALCULATION", "S3_BUCKET",
                     "MLFLOW_BACKEND_STORE_URI", "MLFLOW_TRACKING_USERNAME"):  # fmt: skip
            assert env_file.get(name), name

        shell_env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # invdpo, invdpo-admin, python
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
        }
        for path in WALKTHROUGHS:
            # services/api/README.md's block says to `source .stack/env` first, and relies on the README's data.
            prelude = "" if path.name == "README.md" and path.parent == ROOT else "source .stack/env"
            t0 = time.monotonic()
            done = subprocess.run(
                ["bash", "-c", as_script(walkthrough(path), prelude)], cwd=tmp_path, env=shell_env,
                capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            times[str(path.relative_to(ROOT))] = time.monotonic() - t0
            assert done.returncode == 0, f"{path.name}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"

        api, key = env_file["INVDPO_API_URL"], env_file["INVDPO_API_KEY"]
        jobs = get(f"{api}/v1/fine_tuning/jobs?limit=50", key)["data"]
        first = next(job for job in jobs if job["registered_model_name"] == "tiny-invdpo")
        assert first["status"] == "succeeded", first
        assert first["evaluation"]["metrics"]["eval/implicit_acc_n"] == 64  # the walkthrough's validation_file
        model = get(f"{api}/v1/models/tiny-invdpo", key)
        (version,) = model["versions"]
        # The default gate refuses the toy model (the README says why); the release key's forced promotion is recorded.
        assert version["gate_passed"] or version["forced_by"].startswith("key invdpo-"), version
        assert version["gate_passed"] or version["forced_reason"] == "toy walkthrough", version  # the last promotion
        assert version["promoted_at"] is not None
        for png in ("apple.png", "apple-openai.png"):
            assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        lora = next(job for job in jobs if job["registered_model_name"] == "tiny-invdpo-lora")
        assert lora["status"] in ("cancel_requested", "cancelled"), lora
    finally:
        t0 = time.monotonic()
        down = stack("down", directory, 600)
        times["stack down"] = time.monotonic() - t0
        print("times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "none left" in down.stdout
    assert not (directory / "state.json").exists() and not (directory / "env").exists()

    # As `ps` would show it: no process of the stack (all ran in its directory) is left, nor any it started.
    assert state is not None
    started = {entry["pid"] for entry in state["processes"].values()}
    left = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = proc.info["cwd"] or ""
        if proc.info["pid"] in started or cwd.startswith(str(tmp_path)):
            left.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'] or [])}")
    assert left == [], left
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(directory) not in ps, ps
    if state["databases"]:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
            names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        assert not names & set(state["databases"])
