"""docker-compose.yml and docker-compose.cpu.yml, parsed with PyYAML (Docker cannot run here)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from deploy_contract import (
    COMMANDS,
    IMAGE_ENV,
    INTERPOLATION,
    ROOT,
    SETTINGS_MODULES,
    check_env_names,
    resolve_compose,
    validate_settings,
)

COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"

# One-shot jobs: they run to completion and exit 0, so they have no healthcheck; their dependents wait for
# service_completed_successfully instead of service_healthy.
ONE_SHOT_JOBS = {"createbuckets", "migrate", "mlflow-users"}
# Secrets compose must refuse to start without.
REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SERVICE_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
}  # fmt: skip
# Optional secrets: a Hugging Face token is only needed for gated base models.
OPTIONAL_SECRETS = {"HF_TOKEN"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY")
# Names that match it but hold no secret: MLflow's auth settings (the database URI's password is interpolated, which
# the URL check below asserts).
NOT_SECRET = {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_DATABASE_URI"}
# Our services' compose names -> the component whose Settings reads their INVDPO_* variables.
OUR_SERVICES = {"api": "api", "migrate": "migrate", "worker": "worker", "mlflow-users": "api", "serving": "serving"}


class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus compose's merge tags (!reset, !override)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": True})
ComposeLoader.add_constructor(
    "!override", lambda loader, node: {"!override": loader.construct_mapping(node, deep=True)}
)


@pytest.fixture(scope="module")
def compose(counts: dict) -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    counts["compose_services"] = len(data["services"])
    return data


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping (NAME: value) so names can be checked"
    return {name: str(value) for name, value in env.items()}


def strings(node: object):
    """Every string in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def test_the_expected_services_are_there(services: dict) -> None:
    assert set(services) == {
        "postgres", "redis", "s3", "createbuckets", "mlflow", "mlflow-users", "migrate", "api", "worker", "serving"
    }  # fmt: skip


def test_every_long_running_service_has_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        if name in ONE_SHOT_JOBS:
            # Excepted: a job that exits is never "healthy"; it must not restart either.
            assert "healthcheck" not in service, name
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["test"] != ["NONE"], name
        assert service.get("restart") == "unless-stopped", name


def test_dependencies_wait_for_health_or_completion(services: dict) -> None:
    waited_for = set()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must use the long syntax with a condition"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown {target}"
            expected = "service_completed_successfully" if target in ONE_SHOT_JOBS else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {target}: {spec}"
            waited_for.add(target)
    assert ONE_SHOT_JOBS <= waited_for


def test_the_api_and_the_worker_start_after_migrations_and_their_backends(services: dict) -> None:
    for name in ("api", "worker"):
        assert {"migrate", "redis", "s3", "mlflow-users"} <= set(services[name]["depends_on"]), name
    assert "postgres" in services["migrate"]["depends_on"]
    assert "createbuckets" in services["mlflow"]["depends_on"]


def test_required_secrets_use_error_interpolation() -> None:
    text = COMPOSE.read_text()
    found = {}
    for match in INTERPOLATION.finditer(text):
        name, operator, _ = match.groups()
        found.setdefault(name, set()).add(operator)
    assert REQUIRED_SECRETS <= set(found), f"missing: {REQUIRED_SECRETS - set(found)}"
    for name, operators in found.items():
        if name in REQUIRED_SECRETS or (SECRET_NAME.search(name) and name not in OPTIONAL_SECRETS):
            assert operators == {":?"}, f"${{{name}}} must always be written ${{{name}:?message}}: {operators}"


def test_nothing_secret_is_committed(compose: dict) -> None:
    interpolated_only = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:[?-][^}]*\}$")
    for name, service in compose["services"].items():
        for variable, value in environment(service).items():
            if SECRET_NAME.search(variable) and variable not in NOT_SECRET:
                assert interpolated_only.match(value), f"{name}: {variable} must come from .env, not be literal"
    for text in strings(compose):
        for userinfo in re.findall(r"://([^/@\s]*)@", text):
            _, _, password = userinfo.partition(":")
            assert password.startswith("${") and ":?" in password, f"literal password in {text!r}"
        assert not re.search(r"--requirepass\s+[^\s\"$]", text), f"literal Redis password in {text!r}"
    # .env.example documents every secret with an empty value, and no .env is tracked by git.
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"^[A-Z]", line)
    )
    for name in REQUIRED_SECRETS | OPTIONAL_SECRETS:
        assert example.get(name) == "", f".env.example must list {name} with an empty value"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout.strip() == "", ".env is tracked by git"


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_our_services_read_only_settings_fields_and_library_variables(services: dict, name: str) -> None:
    module = SETTINGS_MODULES[OUR_SERVICES[name]]
    assert check_env_names(set(environment(services[name])), module) == []


def test_other_services_set_no_invdpo_variables_and_only_known_ones(services: dict) -> None:
    for name, service in services.items():
        if name in OUR_SERVICES:
            continue
        problems = check_env_names(set(environment(service)), None, IMAGE_ENV.get(name, set()))
        assert problems == [], f"{name}: {problems}"


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_our_services_settings_accept_the_compose_values(
    services: dict, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {key: resolve_compose(value) for key, value in environment(services[name]).items()}
    settings = validate_settings(SETTINGS_MODULES[OUR_SERVICES[name]], env, monkeypatch)
    assert settings.database_url == env.get("INVDPO_DATABASE_URL", "sqlite:///./invdpo.db")  # mlflow-users: none


def test_commands_are_the_documented_entry_commands(services: dict) -> None:
    for name in ("api", "migrate", "worker", "serving"):
        assert services[name]["command"] == COMMANDS[name], name


def test_the_api_does_not_migrate_at_startup_because_the_migrate_job_did(services: dict) -> None:
    assert environment(services["api"])["INVDPO_MIGRATE_ON_STARTUP"] == "false"


def test_worker_reserves_one_gpu_and_its_healthcheck_reads_the_heartbeat_file(services: dict) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    heartbeat = environment(worker)["INVDPO_HEARTBEAT_FILE"]
    assert heartbeat in " ".join(worker["healthcheck"]["test"])
    assert environment(worker)["INVDPO_ARTIFACT_URI"].startswith("s3://")


def test_mlflow_uses_postgres_s3_artifacts_and_proxies_them_behind_basic_auth(services: dict) -> None:
    """tests/worker/test_mlflow_auth.py runs this command: 401 without credentials, 200 for the service user."""
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["/bin/sh", "-c"]
    [script] = mlflow["command"]
    command = script.split()
    assert command[command.index("exec") + 1 : command.index("exec") + 5] == [
        "mlflow", "server", "--app-name", "basic-auth"
    ]  # fmt: skip
    assert "default_permission = NO_PERMISSIONS" in script
    env = environment(mlflow)
    uri = env["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql+psycopg://") and uri.endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--serve-artifacts" in command
    assert "mlflow:*" in command[command.index("--allowed-hosts") + 1].split(",")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    for name in ("api", "worker"):
        assert environment(services[name])["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_SERVICE_USER:-invdpo}"
        assert services[name]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}


def test_published_ports_are_on_loopback_only(services: dict) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


@pytest.mark.parametrize("name", ["worker", "serving"])
def test_cpu_override_drops_the_gpu_and_builds_cpu_images(services: dict, name: str) -> None:
    override = yaml.load(CPU_OVERRIDE.read_text(), Loader=ComposeLoader)
    assert set(override["services"]) == {"worker", "serving"}
    service = override["services"][name]
    assert service["deploy"] == {"!reset": True}
    assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert service["build"]["args"]["BASE_IMAGE"] == "ubuntu:22.04"
    assert service["image"] != services[name]["image"], "the CPU image must not overwrite the CUDA one"


# A secret in a command is readable by any process on the host (/proc/PID/cmdline, `ps`, docker inspect): a
# secret-named variable expanded by compose (${POSTGRES_PASSWORD...}), a URL with a password, or a shell expansion
# ($$REDISCLI_AUTH) handed to a program. A shell may expand one only where no program's argv receives it: as an
# argument of its builtin printf (written to a file or pipe) or inside a here-document (the program's stdin).
_SECRET_NAME = r"[A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY)[A-Z0-9_]*"
_COMPOSE_SECRET = re.compile(rf"\$\{{{_SECRET_NAME}|://[^/@\s:]*:[^/@\s]+@")
_SHELL_SECRET = re.compile(rf"\$\$\{{?{_SECRET_NAME}")
_HEREDOC = re.compile(r"<<\s*EOF\n.*?\nEOF", re.DOTALL)


def secret_in_args(arg: str) -> bool:
    if _COMPOSE_SECRET.search(arg):
        return True
    script = _HEREDOC.sub("", arg)
    commands = re.split(r"&&|\|\||[;|\n]", script)
    return any(_SHELL_SECRET.search(c) and not c.strip().startswith("printf ") for c in commands)


def test_no_secret_in_any_process_argv(services: dict) -> None:
    for name, service in services.items():
        for what in ("command", "entrypoint"):
            value = service.get(what) or []
            for arg in [value] if isinstance(value, str) else value:
                assert not secret_in_args(str(arg)), f"{name} {what}: {arg!r}"
        test = service.get("healthcheck", {}).get("test", [])
        for arg in [test] if isinstance(test, str) else test:
            assert not secret_in_args(str(arg)), f"{name} healthcheck: {arg!r}"
    # The check catches what it is for: today's MLflow and Redis commands, a URL with a password.
    assert secret_in_args("postgresql+psycopg://invdpo:${POSTGRES_PASSWORD:?x}@postgres:5432/mlflow")
    assert secret_in_args('exec redis-server --appendonly yes --requirepass "$$REDISCLI_AUTH"')
    assert secret_in_args("redis://:hunter2@redis:6379/0")
    assert not secret_in_args("printf '%s' \"$$AWS_SECRET_ACCESS_KEY\" > /tmp/s3.json && exec weed server")
    redis_script = services["redis"]["command"][-1]
    assert redis_script.startswith("exec redis-server - <<EOF") and "requirepass $$REDISCLI_AUTH" in redis_script


def test_the_model_server_reserves_a_gpu_and_its_healthcheck_calls_healthz(services: dict) -> None:
    serving = services["serving"]
    assert serving["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "http://127.0.0.1:8080/healthz" in " ".join(serving["healthcheck"]["test"])
    assert serving["ports"] == ["127.0.0.1:8080:8080"]
    assert environment(serving)["INVDPO_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # MLflow runs its basic-auth app: without a user the server's alias lookups get 401 and it never serves.
    assert environment(serving)["MLFLOW_TRACKING_USERNAME"] == environment(services["api"])["MLFLOW_TRACKING_USERNAME"]
    assert "MLFLOW_SERVICE_PASSWORD" in environment(serving)["MLFLOW_TRACKING_PASSWORD"]
    assert serving["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
