"""The Dockerfiles, read as text (no Docker engine here): base images, non-root users, healthchecks, commands."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml
from deploy_contract import CHART, COMMANDS, DOCKER, ROOT


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            if current.strip():
                logical.append(current.strip())
            current = ""
    pairs = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def one(dockerfile: str, keyword: str) -> str:
    found = [arguments for name, arguments in instructions(dockerfile) if name == keyword]
    assert len(found) == 1, f"{dockerfile}: expected one {keyword}, found {found}"
    return found[0]


def build_args(dockerfile: str) -> dict[str, str]:
    args = {}
    for name, arguments in instructions(dockerfile):
        if name == "ARG" and "=" in arguments:
            key, _, value = arguments.partition("=")
            args[key] = value
    return args


@pytest.mark.parametrize(
    "dockerfile", ["api.Dockerfile", "worker.Dockerfile", "mlflow.Dockerfile", "serving.Dockerfile"]
)
def test_images_run_as_a_fixed_non_root_user_with_a_healthcheck(dockerfile: str) -> None:
    assert one(dockerfile, "USER") == "10001:10001"
    healthcheck = one(dockerfile, "HEALTHCHECK")
    assert "CMD [" in healthcheck, "exec form, so it works without a shell"
    assert (DOCKER / f"{dockerfile}.dockerignore").is_file(), "the build context is the repository root"


@pytest.mark.parametrize(
    "dockerfile, component",
    [("api.Dockerfile", "api"), ("worker.Dockerfile", "worker"), ("serving.Dockerfile", "serving")],
)
def test_default_commands_are_the_documented_entry_commands(dockerfile: str, component: str) -> None:
    assert json.loads(one(dockerfile, "CMD")) == COMMANDS[component]


def test_api_image_is_slim_python_without_torch() -> None:
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", build_args("api.Dockerfile")["PYTHON_IMAGE"])
    assert "/healthz" in one("api.Dockerfile", "HEALTHCHECK")
    text = (DOCKER / "api.Dockerfile").read_text()
    assert "service_requirements.py service" in text and "find_spec('torch') is not None" in text
    spec = importlib.util.spec_from_file_location("service_requirements", DOCKER / "service_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = {re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() for line in module.service_requirements(["service"])}
    assert names.isdisjoint(module.GPU_STACK), names & module.GPU_STACK
    assert {"fastapi", "uvicorn", "alembic", "celery", "boto3", "pydantic-settings", "pyarrow"} <= names


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "serving.Dockerfile"])
def test_gpu_images_pair_a_cuda_12_runtime_with_the_matching_torch_build(dockerfile: str) -> None:
    args = build_args(dockerfile)
    base = re.fullmatch(r"nvidia/cuda:12\.(\d+)\.\d+-cudnn-runtime-ubuntu22\.04", args["BASE_IMAGE"])
    assert base, args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu12{base.group(1)}"
    makefile_pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin, "the image and the development environment pin the same torch"


def test_worker_and_serving_healthchecks() -> None:
    assert "INVDPO_HEARTBEAT_FILE" in one("worker.Dockerfile", "HEALTHCHECK")
    assert "127.0.0.1:8080/healthz" in one("serving.Dockerfile", "HEALTHCHECK")


def test_mlflow_image_version_is_the_chart_default_tag() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert build_args("mlflow.Dockerfile")["MLFLOW_VERSION"] == values["mlflow"]["image"]["tag"]
    assert "/health" in one("mlflow.Dockerfile", "HEALTHCHECK")


@pytest.mark.parametrize(
    "module", ["services.api.main", "services.jobs.migrate", "services.worker.app", "services.serving.__main__"]
)
def test_entry_commands_name_modules_that_exist(module: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"{module} is named by an entry command but missing"
