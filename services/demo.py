"""`make demo` (`python -m services.demo`): the whole service end to end on one machine, with no external server.

Everything lives under demo-out/: the job database (SQLite), an embedded broker (kombu's filesystem transport:
one file per message), MLflow (SQLite, local artifacts) and the object store (a local directory). The API runs
under uvicorn and a Celery worker in its own process, both on loopback. The demo makes the tiny model and a toy
"redder is better" preference set, submits an Inversion-DPO job over REST, follows it live, promotes the
registered version to `champion` through the API, generates one image with it through the model server
(services/serving, which follows the promotion), and prints where everything is. Child processes are stopped on
exit, Ctrl-C included. Their logs: demo-out/api.log, worker.log, serving.log.
"""

from __future__ import annotations

import _thread
import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from invdpo_core.cli import CLIError
from services.client import JOBS, Api, follow
from services.jobs.logs import mask_secrets

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "invdpo-demo"
PROMPTS = ["a red circle", "a blue square"]
TOY_PAIRS = 16
GATE = {"min_implicit_acc_lower": None, "win_rate_scorer": "toy", "min_win_rate": 0.5}
MARKER = ".invdpo-demo"  # marks a directory this demo made, so a rerun may empty it
READY_TIMEOUT_S = 120.0  # cold imports of torch, diffusers and mlflow on a busy 2-core machine


class DemoError(Exception):
    """A failure explained in one line."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment(out: Path) -> dict[str, str]:
    """The settings of the API, the worker and the model server (their settings.py)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # everything is local; a download attempt must fail at once
        "TRANSFORMERS_OFFLINE": "1",
        "INVDPO_DATABASE_URL": f"sqlite:///{out / 'invdpo.db'}",
        "INVDPO_BROKER_URL": f"filesystem://{out / 'broker'}",
        "INVDPO_MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}",
        "INVDPO_ARTIFACT_URI": str(out / "artifacts"),
        "INVDPO_WORK_DIR": str(out / "work"),
        "INVDPO_HEARTBEAT_FILE": str(out / "worker-heartbeat"),
        "INVDPO_PROGRESS_INTERVAL_SECONDS": "0.5",  # a lively progress bar; the default 2 s suits long jobs
        "INVDPO_EVENTS_POLL_SECONDS": "0.2",
        "INVDPO_SYSTEM_METRICS": "false",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "INVDPO_LOG_LEVEL": "WARNING",
        # The toy task is "redder is better", which the built-in toy reward measures directly: the gate asks that the
        # model's images beat the base's under it. (The default rule, the implicit accuracy's interval on held-out
        # pairs above 0.5, needs more held-out pairs than a demo can afford to make.)
        "INVDPO_PROMOTION_GATE": json.dumps(GATE),
        # The model server (services/serving/settings.py): the demo model's champion, looked up every second.
        "INVDPO_SERVING_MODELS": MODEL_NAME,
        "INVDPO_SERVING_POLL_SECONDS": "1",
        "INVDPO_SERVING_HOST": "127.0.0.1",
        "INVDPO_SERVING_CACHE_DIR": str(out / "serving-cache"),
        "INVDPO_SERVING_LOG_LEVEL": "WARNING",
    }


class Children:
    """The API, the worker and the model server, each in a session of its own so Ctrl-C reaches only the demo,
    which then stops them (and the training process the worker started) in order."""

    def __init__(self, out: Path, env: dict[str, str]):
        self.out, self.env = out, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.failure: str | None = None  # set by the watchdog before it interrupts the main thread
        self.lock = threading.Lock()
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.out / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, cwd=self.out, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def dead(self) -> str | None:
        """Why a child is gone (its exit code and the last line of its log), or None if all still run."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                lines = (self.out / f"{name}.log").read_text(errors="replace").split("\n")
                last = next((line.strip() for line in reversed(lines) if line.strip()), "")
                return f"the {name} exited with code {proc.returncode}" + (f": {last}" if last else "")
        return None

    def watch(self) -> None:
        """In a thread: if a child dies while the main thread waits on the API, interrupt the main thread."""

        def run() -> None:
            while True:
                with self.lock:  # never interrupts stop(), which kills the children on purpose
                    if self.stopping:
                        return
                    if (failure := self.dead()) is not None:
                        self.failure = failure
                        _thread.interrupt_main()
                        return
                time.sleep(0.5)

        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                # Short: the worker would checkpoint a running job, but the next demo run starts afresh anyway.
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_ready(url: str, children: Children, what: str = "the API") -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if (failure := children.dead()) is not None:
            raise DemoError(failure)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise DemoError(f"{what} at {url} was not ready after {READY_TIMEOUT_S:.0f} s")


def _make_inputs(out: Path) -> tuple[Path, Path, Path]:
    """The tiny model, toy training pairs, and held-out pairs (other seeds) for the job's evaluation."""
    from invdpo_core.testing import build_tiny_pipeline
    from invdpo_core.toy import make_toy_dataset

    model = out / "tiny-model"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(model)
    # Drawn by the same seeded tiny pipeline (rebuilt in memory rather than reloaded from disk: faster).
    train = make_toy_dataset(out / "toy-train", TOY_PAIRS, fmt="jsonl", seed=0, kind="sd15")
    held_out = make_toy_dataset(out / "toy-validation", TOY_PAIRS // 2, fmt="jsonl", seed=1, kind="sd15")
    return model, train, held_out


def _api_key(env: dict[str, str]) -> str:
    from services.admin import create_api_key
    from services.jobs.db import make_engine, make_session_factory

    engine = make_engine(env["INVDPO_DATABASE_URL"])
    try:
        with make_session_factory(engine)() as session:
            key, _ = create_api_key(session, "demo", "make demo")
    finally:
        engine.dispose()
    return key


def _served_sample(url: str, key: str, path: Path) -> int:
    """One image from the model server's Images API; returns the version that generated it."""
    answer = httpx.post(
        f"{url}/v1/images/generations",
        json={"model": MODEL_NAME, "prompt": PROMPTS[0], "response_format": "b64_json", "seed": 0},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    if answer.status_code != 200:
        raise DemoError(f"the model server answered {answer.status_code}: {answer.json()['error']['message']}")
    path.write_bytes(base64.b64decode(answer.json()["data"][0]["b64_json"]))
    return int(answer.headers["x-model-version"])


def _sample_image(tracking_uri: str, model_uri: str, path: Path) -> None:
    import mlflow
    import pandas as pd
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the pipeline's loading bar
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    answer = model.predict(pd.DataFrame({"prompt": [PROMPTS[0]], "seed": [0]}))
    path.write_bytes(base64.b64decode(answer["image"][0]))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _children(out: Path, env: dict[str, str]) -> Iterator[Children]:
    """Children stopped on the way out, whatever the way: a dead child reported by the watchdog becomes a
    DemoError; SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C."""
    children = Children(out, env)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield children
    except KeyboardInterrupt:
        if children.failure is not None:
            raise DemoError(children.failure) from None
        raise
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, previous)


def run_demo(out: Path, steps: int) -> None:
    started = time.monotonic()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():  # never empty a directory the demo did not make
            raise DemoError(f"{out} exists and is not a demo directory; pass another --out")
        shutil.rmtree(out)  # a fresh database, registry and broker each run: version 1, one job
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    env = _environment(out)
    port, serving_port = _free_port(), _free_port()
    url, serving_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{serving_port}"
    env["INVDPO_SERVING_PORT"] = str(serving_port)
    print(
        f"invdpo demo: everything under {out}/ (API {url}, Celery worker, model server {serving_url}, SQLite, "
        "MLflow, filesystem broker)"
    )
    with _children(out, env) as children:
        # The servers boot while this process builds the model and the data (both import torch: seconds each).
        children.start(
            "worker",
            [sys.executable, "-m", "celery", "-A", "services.worker.app", "worker", "-Q", "gpu,default",
             "--pool", "solo", "--concurrency", "1", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
        )  # fmt: skip
        children.start(
            "api",
            [sys.executable, "-m", "uvicorn", "services.api.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", "--no-access-log"],
        )  # fmt: skip
        # It has nothing to serve until the promotion; it finds the champion by itself.
        children.start("serving", [sys.executable, "-m", "services.serving"])
        print(
            f"[1/5] tiny model and toy 'redder is better' preference pairs ({TOY_PAIRS} + {TOY_PAIRS // 2} held out)"
        )
        model, dataset, held_out = _make_inputs(out)
        print("[2/5] waiting for the API and the worker")
        _wait_ready(url, children)
        children.watch()

        body = {
            "model": str(model),
            "training_file": str(dataset),
            "validation_file": str(held_out),
            "method": {
                "type": "inversion_dpo",
                "hyperparameters": {
                    "max_steps": steps,
                    "resolution": 64,
                    "batch_size": 4,
                    "learning_rate": 1e-4,
                    "beta": 1000,
                    "inversion_steps": 10,
                    "checkpoint_interval": max(1, steps // 3),
                    "validation_prompts": PROMPTS,
                    "validation_interval": max(1, steps // 2),
                    "validation_inference_steps": 4,
                },
            },
            "seed": 0,
            "registered_model_name": MODEL_NAME,
            "metadata": {"source": "make demo"},
        }
        key = _api_key(env)
        with Api(url, key) as api:
            job = api.call("POST", JOBS, json=body, headers={"Idempotency-Key": "make-demo"})
            print(f"[3/5] job {job['id']} submitted over REST: inversion_dpo, {steps} steps at 64 px")
            job = follow(api, job["id"])
            if job["status"] != "succeeded":
                error = job.get("error") or {}
                raise DemoError(f"job {job['id']} {job['status']}: {error.get('code')}: {error.get('message')}")
            version = job.get("registered_model_version")
            if not version:
                raise DemoError(f"job {job['id']} succeeded but registered no model version")
            gate = f"toy-reward win-rate against the base > {GATE['min_win_rate']}"
            print(f"[4/5] registered models:/{MODEL_NAME}/{version} (alias candidate); promoting it (gate: {gate})")
            alias = "champion"
            try:
                api.call("POST", f"/v1/models/{MODEL_NAME}/promote", json={"version": int(version)})
            except CLIError as exc:
                # 409 is the gate refusing on the evidence (the client's error line starts with the status). A tiny
                # model trained for seconds does not always improve; the demo then shows the refusal and goes on
                # with the candidate instead of failing: refusing a model that did not improve is the feature.
                if not str(exc).startswith("409 "):
                    raise
                alias = "candidate"
                print(f"      the promotion gate refused it: {exc}; keeping alias candidate")
        sample = out / "sample.png"
        if alias == "champion":
            print(f"[5/5] generating a sample through the model server ({serving_url}), which follows the champion")
            _wait_ready(serving_url, children, "the model server")
            served = _served_sample(serving_url, key, sample)
            print(f"      POST /v1/images/generations answered by version {served}")
        else:
            # The model server serves only versions the gate passed: it has nothing to serve here.
            print(f"[5/5] generating a sample with the {alias}, loaded through mlflow.pyfunc (the model server "
                  "serves only versions the promotion gate passed)")  # fmt: skip
            _sample_image(env["INVDPO_MLFLOW_TRACKING_URI"], f"models:/{MODEL_NAME}@{alias}", sample)

    print()
    print(f"registered model:  models:/{MODEL_NAME}/{version}")
    if alias == "champion":
        print(f"alias:             champion (was candidate) -> models:/{MODEL_NAME}@champion")
    else:
        print(f"alias:             candidate (not promoted: the gate refused) -> models:/{MODEL_NAME}@candidate")
    print(f"sample image:      {sample}")
    print(
        "                   (a tiny model with random weights trained for a few steps: its pictures are coloured\n"
        "                   noise. The demo shows the service end to end, not image quality.)"
    )
    print(
        f"MLflow UI:         {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:///{out}/mlflow.db"
    )
    print(f"done in {time.monotonic() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    # Quiet libraries in this process and the children: the demo prints its own steps and one progress bar.
    for name, value in {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DIFFUSERS_VERBOSITY": "error",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONWARNINGS": "ignore",
    }.items():
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(prog="python -m services.demo", description="Run invdpo end to end locally.")
    parser.add_argument("--out", default="demo-out", help="working directory (emptied first)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        run_demo(out, args.steps)
    except KeyboardInterrupt:
        print("demo interrupted; the API, the worker and the model server are stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # one line; the details are in the logs
        reason = str(exc) if isinstance(exc, DemoError | CLIError) else f"{type(exc).__name__}: {exc}"
        logs = [str(log) for log in (out / "api.log", out / "worker.log", out / "serving.log") if log.exists()]
        where = f" (logs: {', '.join(logs)})" if logs else ""
        print(f"demo failed: {mask_secrets(' '.join(reason.split()))}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
