"""`make stack` / `make stack-down` (`python -m services.stack up | down | status`): the whole service on this
machine without Docker, each component its own process on loopback, configured as docker-compose.yml configures it.

    PostgreSQL  the machine's server at 127.0.0.1:5432 (user postgres) if it answers: three new databases on it
                (jobs, MLflow's store, MLflow's users); otherwise a cluster of our own (initdb) on a free port
    Redis       the machine's at 127.0.0.1:6379 if it answers, on a database number nobody uses (claimed with a
                marker key); otherwise a redis-server of our own
    S3          moto's server (in memory), bucket `invdpo`
    MLflow      `mlflow server --app-name basic-auth` as compose runs it: the store and the users in PostgreSQL,
                artifacts proxied to S3 (s3://invdpo/mlflow), its service user made by `invdpo-admin`
    API         uvicorn services.api.main:app, after `python -m services.jobs.migrate`
    worker      celery -A services.worker.app worker -Q gpu,default --concurrency 1
    serving     python -m services.serving (the champion of the models given with --serve)

Everything the stack owns lives in one directory (default .stack/): `state.json` (each process's pid, ports,
databases), `env` (the variables a shell needs to use the stack: `source .stack/env`), `logs/NAME.log`, the
worker's scratch and the caches. `down` stops exactly the processes `state.json` names (checked by their start
time, with every process of their process groups), drops the databases it made and empties the Redis database
it claimed. Ports: 8000 (API), 8080 (model server), 5000 (MLflow) and 8333 (S3) when free, else free ones.

This is an operator tool beside services/admin.py and services/demo.py (docs/architecture.md): it starts the
services as processes and imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUCKET = "invdpo"
SHARED_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SHARED_REDIS = ("127.0.0.1", 6379)
REDIS_MARKER = "invdpo-stack:owner"  # the key that claims a database number of the shared Redis
PREFERRED_PORTS = {"api": 8000, "serving": 8080, "mlflow": 5000, "s3": 8333}
READY_TIMEOUT_S = 600.0  # cold imports of torch, diffusers and MLflow's migrations on a busy 2-core machine
STOP_TIMEOUT_S = 60.0  # the worker checkpoints a running job and requeues it before it exits


# What `source .stack/env` sets, in this order (the README's table describes each).
ENV_VARIABLES = (
    "INVDPO_API_URL", "INVDPO_API_KEY", "INVDPO_SERVING_URL",
    "INVDPO_DATABASE_URL", "INVDPO_BROKER_URL", "INVDPO_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION", "S3_BUCKET",
    "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
)  # fmt: skip


class StackError(Exception):
    """A failure explained in one line."""


@dataclass
class State:
    """What `up` started and made, written after every step so that `down` can undo a half-finished `up`."""

    dir: Path
    started_at: float = field(default_factory=time.time)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> pid, create_time, stop
    databases: list[str] = field(default_factory=list)  # made on the shared PostgreSQL (dropped by down)
    redis_db: str | None = None  # the claimed database of the shared Redis (emptied by down)
    urls: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        data = {k: getattr(self, k) for k in ("id", "started_at", "processes", "databases", "redis_db", "urls")}
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, directory: Path) -> State | None:
        path = directory / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(dir=directory, **data)


# ---------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port(name: str) -> int:
    preferred = PREFERRED_PORTS.get(name)
    if preferred is not None and _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _say(message: str) -> None:
    print(message, flush=True)


def _python_bin(name: str) -> str:
    """A console script of this Python's environment (mlflow), found beside the interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{name} is not installed in {Path(sys.executable).parent} (run make install)")
    return str(path)


# ---------------------------------------------------------------- processes


class Stack:
    def __init__(self, state: State, env: dict[str, str]):
        self.state, self.env = state, env
        self.logs = state.dir / "logs"

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, stop: str = "group-term"
    ) -> subprocess.Popen[bytes]:
        """Start a component in a session (and process group) of its own, its output in logs/NAME.log.

        stop: how `down` asks it to stop: group-term (SIGTERM to its whole group), main-term (SIGTERM to the main
        process only, as `docker stop` does: the Celery worker then passes it on to a training process) or
        group-int (SIGINT: PostgreSQL's fast shutdown)."""
        import psutil

        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=self.state.dir, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        create_time = psutil.Process(proc.pid).create_time()
        self.state.processes[name] = {"pid": proc.pid, "create_time": create_time, "stop": stop}
        self.state.save()
        return proc

    def run(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> str:
        """A one-shot command (migrations, users, keys); its output is returned and appended to logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            argv, cwd=self.state.dir, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=600
        )
        with open(self.logs / f"{name}.log", "a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit code {done.returncode}"]
            raise StackError(f"{name} failed: {last[0]} (log: {self.logs / f'{name}.log'})")
        return done.stdout

    def wait(self, name: str, ready: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
        """Until ready() or the component exits (then its log's last lines say why)."""
        import psutil

        pid = self.state.processes[name]["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                log = self.logs / f"{name}.log"
                raise StackError(f"the {name} exited while starting; last lines of {log}:\n{_tail(log)}")
            time.sleep(0.5)
        raise StackError(f"the {name} was not ready after {timeout:.0f} s (log: {self.logs / f'{name}.log'})")


def _processes_of(entry: dict[str, Any]) -> list[Any]:
    """The live processes of one started component: its main process with all its descendants and every process
    left in its process group. A pid now held by another process (its start time differs) is not ours, nor is
    its group."""
    import psutil

    found: dict[int, psutil.Process] = {}
    pid = entry["pid"]
    try:
        main = psutil.Process(pid)
        if abs(main.create_time() - entry["create_time"]) >= 1:
            return []
        found[pid] = main
        found.update({p.pid: p for p in main.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass  # gone; what it left in its group is still ours
    for proc in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(proc.pid) == pid and proc.info["create_time"] >= entry["create_time"] - 1:
                found.setdefault(proc.pid, proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return list(found.values())


def _stop(name: str, entry: dict[str, Any], timeout: float) -> int:
    """Stop one component and everything it started; returns how many processes were still alive."""
    import psutil

    procs = _processes_of(entry)
    if not procs:
        return 0
    how = entry.get("stop", "group-term")
    sig = signal.SIGINT if how == "group-int" else signal.SIGTERM
    try:
        if how == "main-term":
            os.kill(entry["pid"], sig)
        else:
            os.killpg(entry["pid"], sig)
    except ProcessLookupError:
        for proc in procs:  # the main process is gone: signal what it left behind
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        _say(f"  {name}: {len(alive)} process(es) did not stop within {timeout:.0f} s; killing them")
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
    return len(procs)


# ---------------------------------------------------------------- the components


def _postgres(stack: Stack, admin_url: str | None) -> str:
    """A server URL without a database (postgresql+psycopg://USER@HOST:PORT); makes the stack's databases on it."""
    import psycopg

    state = stack.state
    if admin_url is None and _answers("127.0.0.1", 5432):
        admin_url = SHARED_POSTGRES
    if admin_url is None:
        admin_url = _own_postgres(stack)
    server = admin_url.rsplit("/", 1)[0]
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            for suffix in ("", "_mlflow", "_mlflow_auth"):
                name = f"invdpo_stack_{state.id}{suffix}"
                conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
                state.databases.append(name)
                state.save()
    except psycopg.Error as exc:
        raise StackError(f"PostgreSQL at {server.split('@')[-1]}: {' '.join(str(exc).split())}") from None
    state.urls["postgres_admin"] = admin_url
    state.save()
    return server


def _own_postgres(stack: Stack) -> str:
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1:]), None)
    if initdb is None:
        raise StackError("no PostgreSQL answers at 127.0.0.1:5432 and initdb is not installed: install PostgreSQL")
    if os.geteuid() == 0:
        raise StackError(
            "no PostgreSQL answers at 127.0.0.1:5432, and initdb refuses to run as root: start a server, or pass "
            "--postgres postgresql+psycopg://USER@HOST:PORT/postgres"
        )
    data = stack.state.dir / "postgres"
    stack.run("initdb", [str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
    port = _port("postgres")
    postgres = str(Path(initdb).parent / "postgres")
    stack.start(
        "postgres",
        [postgres, "-D", str(data), "-p", str(port), "-k", str(data), "-c", "listen_addresses=127.0.0.1"],
        stop="group-int",
    )
    stack.wait("postgres", lambda: _answers("127.0.0.1", port), 120)
    time.sleep(1)  # listening comes just before accepting
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def _redis(stack: Stack) -> str:
    import redis

    state = stack.state
    if _answers(*SHARED_REDIS):
        client = redis.Redis(*SHARED_REDIS, socket_timeout=5)
        try:
            count = int(client.config_get("databases").get("databases") or 16)
        except redis.RedisError:  # CONFIG may be disabled
            count = 16
        used = {int(name[2:]) for name in client.info("keyspace")}
        client.close()
        for number in range(count - 1, 0, -1):  # from the top: the low numbers are the ones people use
            if number in used:
                continue
            db = redis.Redis(*SHARED_REDIS, db=number, socket_timeout=5)
            try:
                if db.set(REDIS_MARKER, state.id, nx=True):
                    state.redis_db = str(number)
                    state.save()
                    return f"redis://127.0.0.1:{SHARED_REDIS[1]}/{number}"
            finally:
                db.close()
        _say("  the Redis at 127.0.0.1:6379 has no free database number; starting one of our own")
    if shutil.which("redis-server") is None:
        raise StackError("no Redis answers at 127.0.0.1:6379 and redis-server is not installed: install Redis")
    port = _port("redis")
    stack.start(
        "redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    )
    stack.wait("redis", lambda: _answers("127.0.0.1", port), 60)
    return f"redis://127.0.0.1:{port}/0"


def _s3(stack: Stack, s3_env: dict[str, str]) -> str:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    port = _port("s3")
    stack.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    endpoint = f"http://127.0.0.1:{port}"

    def bucket_made() -> bool:
        try:
            boto3.client("s3", endpoint_url=endpoint, **_boto_credentials(s3_env)).create_bucket(Bucket=BUCKET)
            return True
        except (BotoCoreError, ClientError):
            return False

    stack.wait("s3", bucket_made, 120)
    return endpoint


def _boto_credentials(s3_env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": s3_env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": s3_env["AWS_SECRET_ACCESS_KEY"],
        "region_name": s3_env["AWS_DEFAULT_REGION"],
    }


def mlflow_command(port: int, bucket: str = BUCKET) -> list[str]:
    """`mlflow server` as docker-compose.yml's mlflow service runs it (tests/test_stack.py compares them): the
    basic-auth app, artifacts proxied to S3. Loopback instead of 0.0.0.0; one worker process, because uvicorn's
    supervisor kills workers that miss its 5 s ping, which they do on a busy small machine."""
    return [
        "server", "--app-name", "basic-auth", "--artifacts-destination", f"s3://{bucket}/mlflow", "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", "localhost,localhost:*,127.0.0.1,127.0.0.1:*",
    ]  # fmt: skip


def _mlflow(stack: Stack, server: str, s3_endpoint: str, secrets_: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Start MLflow; returns its URL and the variables of its stores (for the env file)."""
    state = stack.state
    port = _port("mlflow")
    auth_ini = state.dir / "mlflow-auth.ini"
    stores = {
        "MLFLOW_BACKEND_STORE_URI": f"{server}/invdpo_stack_{state.id}_mlflow",
        "MLFLOW_AUTH_DATABASE_URI": f"{server}/invdpo_stack_{state.id}_mlflow_auth",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,  # MLflow's S3 artifact store reads its endpoint from here
    }
    # The auth configuration as compose writes it at start (its database URI would hold a password there).
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = {stores['MLFLOW_AUTH_DATABASE_URI']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **stores,
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_["flask"],
    }
    stack.start("mlflow", [_python_bin("mlflow"), *mlflow_command(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    state.urls["mlflow"] = url
    state.save()
    return url, stores


# ---------------------------------------------------------------- up, down, status


def up(directory: Path, serve: str, project: str, postgres_url: str | None) -> int:
    directory = directory.resolve()
    previous = State.load(directory)
    if previous is not None:
        alive = [name for name, entry in previous.processes.items() if _processes_of(entry)]
        if alive:
            raise StackError(f"a stack is running from {directory} ({', '.join(alive)}): make stack-down first")
        _say(f"{directory}/state.json is left from a stack that is no longer running; cleaning it up")
        down(directory, quiet=True)
    directory.mkdir(parents=True, exist_ok=True)
    state = State(dir=directory)
    state.save()
    started = time.monotonic()
    secrets_ = {k: secrets.token_hex(16) for k in ("admin", "service", "flask", "s3_key", "s3_secret")}
    s3_env = {
        "AWS_ACCESS_KEY_ID": secrets_["s3_key"],
        "AWS_SECRET_ACCESS_KEY": secrets_["s3_secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        # boto3 >= 1.36 adds CRC checksums to every request by default; ask for them only where S3 requires them
        # (as compose does: several S3-compatible stores refuse them).
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }
    base = {
        **os.environ,
        # This checkout's code, whatever the virtualenv was installed from.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **s3_env,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):  # the host's AWS setup must not leak in
        base.pop(name, None)
    stack = Stack(state, base)
    try:
        _say(f"invdpo stack in {directory}/ (logs: {stack.logs}/)")
        _say("[1/6] PostgreSQL and Redis")
        server = _postgres(stack, postgres_url)
        database_url = f"{server}/invdpo_stack_{state.id}"
        broker_url = _redis(stack)
        _say(f"      jobs database {database_url.split('@')[-1]}, broker {broker_url}")
        _say("[2/6] S3 (moto) and MLflow")
        s3_endpoint = _s3(stack, s3_env)
        stack.env.update(AWS_ENDPOINT_URL_S3=s3_endpoint)
        mlflow_url, mlflow_stores = _mlflow(stack, server, s3_endpoint, secrets_)
        service_user = {"MLFLOW_TRACKING_USERNAME": "invdpo", "MLFLOW_TRACKING_PASSWORD": secrets_["service"]}
        shared = {
            "INVDPO_DATABASE_URL": database_url,
            "INVDPO_BROKER_URL": broker_url,
            "INVDPO_MLFLOW_TRACKING_URI": mlflow_url,
            **service_user,
        }
        stack.env.update(shared)
        _say("[3/6] database migrations")
        stack.run("migrate", [sys.executable, "-m", "services.jobs.migrate"])
        _say("[4/6] worker, MLflow's service user, API")
        heartbeat = directory / "worker-heartbeat"
        stack.start(
            "worker",
            [sys.executable, "-m", "celery", "-A", "services.worker.app", "worker", "-Q", "gpu,default",
             "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"stack-{state.id}@%h"],
            env={
                "INVDPO_ARTIFACT_URI": f"s3://{BUCKET}/jobs",
                "INVDPO_WORK_DIR": str(directory / "work"),
                "INVDPO_CACHE_DIR": str(directory / "model-cache"),
                "INVDPO_HEARTBEAT_FILE": str(heartbeat),
                "INVDPO_ALLOW_LOCAL_FILES": "false",
            },
            stop="main-term",
        )  # fmt: skip
        # The API and the model server talk to MLflow from their start: its service user must exist first.
        stack.wait("mlflow", lambda: _http_ok(f"{mlflow_url}/health"))
        stack.run(
            "mlflow-users",
            [sys.executable, "-m", "services.admin", "mlflow-service-user"],
            env={"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["admin"]},
        )
        api_port = _port("api")
        stack.start(
            "api",
            [sys.executable, "-m", "uvicorn", "services.api.main:app", "--host", "127.0.0.1", "--port", str(api_port)],
            # As compose: migrated above; jobs name s3:// URIs, never the API host's files. An events stream stays
            # open for an hour, not 10 minutes: a toy job on a busy laptop's CPU outlasts that (README walkthrough).
            env={
                "INVDPO_MIGRATE_ON_STARTUP": "false",
                "INVDPO_ALLOW_LOCAL_FILES": "false",
                "INVDPO_EVENTS_STREAM_MAX_SECONDS": "3600",
            },
        )
        api_url = f"http://127.0.0.1:{api_port}"
        state.urls["api"] = api_url
        state.save()
        _say("[5/6] model server")
        serving_port = _port("serving")
        stack.start(
            "serving",
            [sys.executable, "-m", "services.serving"],
            env={
                "INVDPO_SERVING_MODELS": serve,
                "INVDPO_SERVING_HOST": "127.0.0.1",
                "INVDPO_SERVING_PORT": str(serving_port),
                "INVDPO_SERVING_POLL_SECONDS": "2",  # a promotion is served within seconds
                "INVDPO_SERVING_CACHE_DIR": str(directory / "serving-cache"),
            },
        )
        serving_url = f"http://127.0.0.1:{serving_port}"
        state.urls["serving"] = serving_url
        state.save()
        stack.wait("api", lambda: _http_ok(f"{api_url}/readyz"))
        stack.wait("worker", heartbeat.exists)
        stack.wait("serving", lambda: _http_ok(f"{serving_url}/healthz"))
        _say("[6/6] an API key, with invdpo-admin create-key")
        out = stack.run(
            "create-key", [sys.executable, "-m", "services.admin", "create-key", "--project", project,
                           "--name", "make stack"],
        )  # fmt: skip
        key = out.strip().splitlines()[-1]
    except BaseException:
        _say("the stack did not start; stopping what it started")
        down(directory, quiet=True)
        raise

    env = {
        "INVDPO_API_URL": api_url,
        "INVDPO_API_KEY": key,
        "INVDPO_SERVING_URL": serving_url,
        **shared,
        "MLFLOW_TRACKING_URI": mlflow_url,
        **s3_env,
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "S3_BUCKET": BUCKET,
        **mlflow_stores,
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["admin"],
    }
    assert set(env) == set(ENV_VARIABLES), set(env) ^ set(ENV_VARIABLES)
    env_file = directory / "env"
    env_file.touch(mode=0o600)  # passwords and keys
    env_file.write_text(
        "# Written by `make stack` (services/stack.py): `source` it to use this stack from a shell. The README's\n"
        "# section 'The whole service on this machine, without Docker' says what each variable is.\n"
        + "".join(f"export {name}={shlex.quote(env[name])}\n" for name in ENV_VARIABLES)
    )
    _say("")
    _say(f"API:           {api_url}   (docs {api_url}/docs)")
    _say(f"model server:  {serving_url}   (serves the champion of: {serve})")
    _say(f"MLflow:        {mlflow_url}   (user admin, password in MLFLOW_AUTH_ADMIN_PASSWORD)")
    _say(f"S3 (moto):     {s3_endpoint}   bucket {BUCKET}")
    _say(f"API key:       {key}   (project {project})")
    _say(f"variables:     source {_shown(env_file)}")
    _say(f"stop:          make stack-down   (started in {time.monotonic() - started:.0f} s)")
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def down(directory: Path, quiet: bool = False) -> int:
    directory = directory.resolve()
    state = State.load(directory)
    if state is None:
        if not quiet:
            _say(f"no stack in {directory} (no state.json); nothing to stop")
        return 0
    stopped = 0
    # The servers last: the worker may write to the database, MLflow and S3 while it checkpoints.
    order = ["serving", "api", "worker", "mlflow", "s3", "redis", "postgres"]
    for name in sorted(state.processes, key=lambda n: order.index(n) if n in order else -1):
        t0 = time.monotonic()
        count = _stop(name, state.processes[name], STOP_TIMEOUT_S)
        if count and not quiet:
            _say(f"stopped the {name} ({count} process{'es' if count > 1 else ''}, {time.monotonic() - t0:.0f} s)")
        stopped += count
    _drop_data(state)
    left = [p.pid for entry in state.processes.values() for p in _processes_of(entry)]
    if left:
        raise StackError(f"processes still running: {left}")
    state.path.unlink()
    (directory / "env").unlink(missing_ok=True)
    if not quiet:
        _say(f"the stack is down: {stopped} processes stopped, none left; logs kept in {directory / 'logs'}")
    return 0


def _drop_data(state: State) -> None:
    """Drop the stack's databases (a server of our own: its data directory) and empty the claimed Redis database
    (if it is still ours)."""
    if "postgres" in state.processes:
        shutil.rmtree(state.dir / "postgres", ignore_errors=True)
    elif state.databases:
        import psycopg

        conninfo = state.urls.get("postgres_admin", SHARED_POSTGRES).replace("postgresql+psycopg://", "postgresql://")
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                for name in state.databases:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        except psycopg.Error as exc:
            _say(f"  could not drop the stack's databases {state.databases}: {' '.join(str(exc).split())}")
    if state.redis_db is not None:
        import redis

        client = redis.Redis(*SHARED_REDIS, db=int(state.redis_db), socket_timeout=5)
        try:
            if client.get(REDIS_MARKER) == state.id.encode():
                client.flushdb()
        except redis.RedisError as exc:
            _say(f"  could not empty Redis database {state.redis_db}: {exc}")
        finally:
            client.close()


def status(directory: Path) -> int:
    state = State.load(directory.resolve())
    if state is None:
        _say("no stack running here (make stack starts one)")
        return 1
    code = 0
    for name, entry in state.processes.items():
        alive = bool(_processes_of(entry))
        code |= 0 if alive else 1
        _say(f"{name:8} pid {entry['pid']:<8} {'running' if alive else 'NOT RUNNING'}")
    for name, url in state.urls.items():
        if name != "postgres_admin":
            _say(f"{name:8} {url}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".stack", help="where the stack's state, env file and logs go")
    parser.add_argument(
        "--serve", default="tiny-invdpo", help="registered models the model server serves (NAME[@ALIAS],...)"
    )
    parser.add_argument("--project", default="vision", help="project of the API key made at start")
    parser.add_argument(
        "--postgres", default=None, help="admin URL of a PostgreSQL server to make the databases on "
        "(default: 127.0.0.1:5432 as user postgres if it answers, else a server of our own)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    try:
        if args.command == "up":
            return up(directory, args.serve, args.project, args.postgres)
        if args.command == "down":
            return down(directory)
        return status(directory)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
