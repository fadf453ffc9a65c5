"""What the deploy tests check against: paths, the entry commands every runtime must agree on, and the environment
contract (the services' Settings classes plus an allow-list of variables libraries read themselves)."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "invdpo"
DOCKER = ROOT / "deploy" / "docker"

# The entry commands, the same inside and outside Docker (the end-to-end tests run them without containers).
COMMANDS = {
    "api": ["uvicorn", "services.api.main:app", "--host", "0.0.0.0", "--port", "8000"],
    "migrate": ["python", "-m", "services.jobs.migrate"],
    "worker": [
        "celery", "-A", "services.worker.app", "worker", "-Q", "gpu,default",
        "--concurrency", "1", "--prefetch-multiplier", "1", "-n", "worker@%h",
    ],
    "serving": ["python", "-m", "services.serving"],
}  # fmt: skip

# Which Settings class reads the INVDPO_* variables of each of our containers.
SETTINGS_MODULES = {
    "api": "services.api.settings",
    "migrate": "services.api.settings",
    "test": "services.api.settings",
    "worker": "services.worker.settings",
    "serving": "services.serving.settings",
}

# Variables a library reads itself; a deployment may set them on any container. Anything else must be an INVDPO_*
# field of the container's Settings class.
LIBRARY_ENV = {
    # boto3/botocore: the S3 client of the services, of the bucket job and of MLflow's artifact proxy.
    "AWS_ACCESS_KEY_ID": "boto3: access key",
    "AWS_SECRET_ACCESS_KEY": "boto3: secret key",
    "AWS_DEFAULT_REGION": "boto3: region",
    "AWS_ENDPOINT_URL_S3": "boto3: endpoint of an S3-compatible store",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "botocore >= 1.36: send CRC checksums only when S3 requires them",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "botocore >= 1.36: validate CRC checksums only when S3 requires them",
    # MLflow.
    "MLFLOW_S3_ENDPOINT_URL": "mlflow: S3 endpoint of the artifact store",
    "MLFLOW_BACKEND_STORE_URI": "mlflow server: --backend-store-uri",
    "MLFLOW_TRACKING_URI": "mlflow client: tracking server",
    "MLFLOW_TRACKING_USERNAME": "mlflow client: user (the service user of the API and the workers)",
    "MLFLOW_TRACKING_PASSWORD": "mlflow client: password",
    "MLFLOW_AUTH_CONFIG_PATH": "mlflow server --app-name basic-auth: its configuration file",
    "MLFLOW_AUTH_ADMIN_USERNAME": "mlflow basic-auth: the admin (and invdpo-admin's MLflow commands)",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow basic-auth: the admin's password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow basic-auth: signs the UI's CSRF tokens",
    # Read by the MLflow container's start command, which writes it into the auth configuration file.
    "MLFLOW_AUTH_DATABASE_URI": "mlflow basic-auth: users database (written into MLFLOW_AUTH_CONFIG_PATH)",
    # Hugging Face Hub (huggingface_hub, diffusers, transformers).
    "HF_HOME": "huggingface_hub: cache directory",
    "HF_HUB_OFFLINE": "huggingface_hub: never download",
    "HF_TOKEN": "huggingface_hub: token for gated models",
    # NVIDIA container toolkit.
    "NVIDIA_VISIBLE_DEVICES": "nvidia-container-runtime: GPUs visible in the container",
}

# Variables the third-party images of docker-compose.yml read (not our services).
IMAGE_ENV = {
    "postgres": {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"},  # the postgres image's entrypoint
    "redis": {"REDISCLI_AUTH"},  # redis-cli (healthcheck) and the start command
}

# CRDs kubernetes-validate has no schema for; rendered manifests of these kinds are skipped, by name.
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}
KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31"]


def settings_class(module: str) -> type:
    """The `Settings` class of a service (import errors propagate: the test must fail, not skip)."""
    return importlib.import_module(module).Settings


def settings_env_names(module: str) -> set[str]:
    """Environment variable names a pydantic-settings `Settings` class reads (upper case)."""
    cls = settings_class(module)
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        for alias in (field.validation_alias, field.alias):
            if isinstance(alias, str):
                names.add(alias.upper())
    return names


def check_env_names(names: set[str], settings_module: str | None, extra_allowed: set[str] = frozenset()) -> list:
    """Problems with a container's variable names: INVDPO_* not in its Settings, others not allow-listed."""
    problems = []
    fields = settings_env_names(settings_module) if settings_module else set()
    for name in sorted(names):
        if name.startswith("INVDPO_"):
            if name.upper() not in fields:
                problems.append(f"{name} is not a field of {settings_module or 'any Settings (not our service)'}")
        elif name not in LIBRARY_ENV and name not in extra_allowed:
            problems.append(f"{name} is neither INVDPO_* nor in the library allow-list")
    return problems


def validate_settings(settings_module: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> object:
    """Build the Settings class from exactly these INVDPO_* values: types and ranges must be accepted."""
    for name in list(os.environ):
        if name.startswith("INVDPO_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("INVDPO_"):
            monkeypatch.setenv(name, value)
    return settings_class(settings_module)(_env_file=None)


INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def resolve_compose(value: str) -> str:
    """Interpolate a compose string as `docker compose` would with every required variable set to a dummy."""

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if operator and "?" in operator:
            return f"dummy-{name.lower().replace('_', '-')}"
        return argument if operator else ""

    return INTERPOLATION.sub(substitute, value).replace("$$", "$")
