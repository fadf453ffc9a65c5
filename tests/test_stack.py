"""services/stack.py without its servers: MLflow runs as compose runs it, the env file is the README's table, and
`down` stops exactly the processes the state names (their whole process groups, a stubborn one killed) and
nothing else. The whole stack, up and down, runs in tests/test_readme_walkthrough.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from services import stack
from services.stack import ENV_VARIABLES, Stack, State

ROOT = Path(__file__).resolve().parents[1]


def test_mlflow_runs_as_compose_runs_it_but_on_loopback() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["mlflow"]
    script = compose["command"][0]
    compose_args = script[script.index("exec mlflow ") + len("exec mlflow ") :].split()
    ours = stack.mlflow_command(5000)

    def flags(args: list[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i, arg in enumerate(args):
            if arg.startswith("--"):
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
                out[arg] = value
        return out

    theirs, mine = flags(compose_args), flags(ours)
    assert ours[0] == compose_args[0] == "server"
    assert set(theirs) == set(mine), set(theirs) ^ set(mine)
    # Only where it listens and how many workers differ; the app, the artifact store and proxying are the same.
    for flag in set(theirs) - {"--host", "--port", "--workers", "--allowed-hosts", "--artifacts-destination"}:
        assert mine[flag] == theirs[flag], flag
    assert theirs["--artifacts-destination"] == "s3://${S3_BUCKET:-invdpo}/mlflow"
    assert mine["--artifacts-destination"] == f"s3://{stack.BUCKET}/mlflow"
    assert mine["--host"] == "127.0.0.1"
    # The auth configuration is written as compose writes it.
    assert "default_permission = NO_PERMISSIONS" in script and "authenticate_request_basic_auth" in script


def test_every_variable_of_the_env_file_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The whole service on this machine") : readme.index("## REST API")]
    missing = [name for name in ENV_VARIABLES if f"`{name}`" not in section]
    assert missing == []
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/python -m services.stack up $(STACK_ARGS)" in makefile
    assert "$(BIN)/python -m services.stack down" in makefile


def _sleeper(tmp_path: Path, name: str, ignore_term: bool = False) -> list[str]:
    """A process that starts a child (so a component is a group of processes), optionally deaf to SIGTERM."""
    code = (
        "import signal, subprocess, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(600)\n"
    )
    return [sys.executable, "-c", code]


def _group(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _pgid(p.pid) == pid]


def _pgid(pid: int) -> int | None:
    try:
        import os

        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_down_stops_every_process_of_each_component_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack, "STOP_TIMEOUT_S", 3.0)
    directory = tmp_path / ".stack"
    directory.mkdir()
    state = State(dir=directory)
    runner = Stack(state, env={"PATH": "/usr/bin:/bin"})
    polite = runner.start("api", _sleeper(tmp_path, "api"))
    stubborn = runner.start("serving", _sleeper(tmp_path, "serving", ignore_term=True))
    (directory / "env").write_text("export X=1\n")
    # Not ours: a process the state does not name, and a state entry whose pid is now another process.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    state.processes["worker"] = {"pid": bystander.pid, "create_time": time.time() - 3600, "stop": "main-term"}
    state.save()
    try:
        deadline = time.monotonic() + 60
        while min(len(_group(polite.pid)), len(_group(stubborn.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # each component has its child
        assert len(_group(polite.pid)) == 2 and len(_group(stubborn.pid)) == 2

        assert stack.main(["down", "--dir", str(directory)]) == 0
        for proc in (polite, stubborn):
            proc.wait(10)
        assert _group(polite.pid) == [] and _group(stubborn.pid) == []  # the children too
        assert bystander.poll() is None, "a process the stack did not start was signalled"
        assert not (directory / "state.json").exists() and not (directory / "env").exists()
        assert stack.main(["down", "--dir", str(directory)]) == 0  # nothing left to stop: says so, succeeds
    finally:
        bystander.kill()
        bystander.wait()
        for proc in (polite, stubborn):
            for p in _group(proc.pid):
                p.kill()


def test_up_refuses_while_a_stack_runs_from_the_same_directory(tmp_path: Path) -> None:
    directory = tmp_path / ".stack"
    directory.mkdir()
    state = State(dir=directory)
    runner = Stack(state, env={"PATH": "/usr/bin:/bin"})
    proc = runner.start("api", [sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with pytest.raises(stack.StackError, match="make stack-down first"):
            stack.up(directory, "m", "p", None)
        assert json.loads((directory / "state.json").read_text())["processes"]["api"]["pid"] == proc.pid
    finally:
        stack.down(directory, quiet=True)
    assert proc.wait(10) is not None
