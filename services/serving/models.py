"""The served versions: one slot per registered model, following its alias in the MLflow registry.

A follower thread looks each alias up every `poll_seconds`. A new version is checked (access.version_allowed),
downloaded, loaded beside the one serving and tried once; only then does the slot point at it. Batches read
`slot.current` when they start, so the switch is one reference assignment: a batch already running finishes on
the old pipeline, the next one runs on the new, and no request fails. A refused or broken version leaves the
previous one serving and is reported (log line, metric, /healthz).
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from sqlalchemy.orm import Session, sessionmaker

from services.serving import access
from services.serving.metrics import Metrics
from services.serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version: the pipeline and what requests are checked against."""

    name: str
    version: int
    pipe: Any
    resolution: int  # the trained size: the one `size` accepted
    steps: int  # default denoising steps
    project_id: int | None  # whose job registered it; only this project's keys may use it

    def generate(self, prompts: list[str], seeds: list[int], steps: int, size: int) -> list[str]:
        """Base64 PNGs, one per prompt, in one pipeline call. Each image has its own CPU generator, so a seed
        gives the same image whatever else shares the batch (up to the batch's float rounding) and on any device."""
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with torch.inference_mode():
            images = self.pipe(prompts, generator=generators, num_inference_steps=steps, height=size, width=size)
        encoded = []
        for image in images.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded


@dataclass
class ModelSlot:
    """What one registered model serves, and why a newer version is not served (if so)."""

    name: str
    alias: str
    current: ServedModel | None = None
    held_back: tuple[int, str] | None = None  # (version the alias points at, why it is not served)


def registry_client(settings: Settings) -> Any:
    """An MLflow client whose registry is the settings' server. Without registry_uri MLflow takes the registry from
    its globals (MLFLOW_REGISTRY_URI, else MLFLOW_TRACKING_URI, else a local store): under make stack, with neither
    set, no promoted version was found."""
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load_version(name: str, version: int, session: Session, settings: Settings) -> ServedModel:
    """Download a registered version (the pyfunc the worker logs: MLmodel + artifacts/pipeline) and load its
    pipeline on the device with the core's loader, then generate once so a broken model fails here, not in a
    request. LoRA jobs are registered fused into their base (services/worker/run_job.py merge_lora), so every
    version is a whole pipeline."""
    import mlflow

    from invdpo_core.pipeline import load_pipeline

    cache = Path(settings.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    local = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=cache))
    try:
        # The version's artifact location from our registry, then those artifacts: download_artifacts("models:/...")
        # would resolve the name through MLflow's global registry URI instead.
        source = registry_client(settings).get_model_version_download_uri(name, str(version))
        root = Path(
            mlflow.artifacts.download_artifacts(source, dst_path=str(local), tracking_uri=settings.mlflow_tracking_uri)
        )
        pyfunc = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
        config = pyfunc.get("config") or {}
        device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(str(root / pyfunc["artifacts"]["pipeline"]["path"]), what="model")
        pipe.unet.eval()
        pipe.to(torch.device(device))
    finally:
        shutil.rmtree(local, ignore_errors=True)  # the weights are in memory now
    served = ServedModel(
        name=name,
        version=version,
        pipe=pipe,
        resolution=int(config.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor),
        steps=int(config.get("num_inference_steps") or 25),
        project_id=access.version_project(session, name, version),
    )
    served.generate(["warm-up"], [0], 1, served.resolution)
    return served


class Follower:
    """Keeps every slot on the version its alias points at, within the rules (see the module docstring)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], metrics: Metrics):
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics
        self.slots = {name: ModelSlot(name, alias) for name, alias in settings.model_refs().items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        access.adopt_library_loggers()  # MLflow's own handlers would not mask credentials
        while not self._stop.is_set():
            for slot in self.slots.values():
                try:
                    self.follow(slot)
                except Exception as exc:  # the registry or database is down: keep serving, try next time
                    log.warning(
                        "cannot look up the served version",
                        extra={"model": slot.name, "alias": slot.alias, "error": f"{type(exc).__name__}: {exc}"},
                    )
            self._stop.wait(self.settings.poll_seconds)

    def follow(self, slot: ModelSlot) -> None:
        """One look at the alias; loads and switches to a new allowed version."""
        from mlflow.exceptions import MlflowException

        client = registry_client(self.settings)
        try:
            found = client.get_model_version_by_alias(slot.name, slot.alias)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            self.hold_back(slot, 0, f"models:/{slot.name}@{slot.alias} does not exist")
            return
        version = int(found.version)
        if slot.current is not None and slot.current.version == version:
            self.hold_back(slot, None, "")
            return
        with self.sessions() as session:
            allowed, reason = access.version_allowed(session, slot.name, version, self.settings.gate_rule())
            if not allowed:
                self.hold_back(slot, version, reason)
                return
            log.info("loading model version", extra={"model": slot.name, "version": version, "verdict": reason})
            try:
                served = load_version(slot.name, version, session, self.settings)
            except Exception as exc:
                self.hold_back(slot, version, f"cannot load: {type(exc).__name__}: {exc}")
                return
        previous = slot.current
        slot.current = served  # the switch: batches from now on run on `served`
        self.hold_back(slot, None, "")
        self.metrics.version_served.labels(slot.name).set(version)
        log.info(
            "serving model version",
            extra={"model": slot.name, "version": version, "previous": previous.version if previous else None},
        )

    def hold_back(self, slot: ModelSlot, version: int | None, reason: str) -> None:
        """Record (and log once) why the alias's version is not served; None clears it."""
        held = (version, reason) if version is not None else None
        if held != slot.held_back and held is not None:
            log.warning(
                "alias points at a version that is not served",
                extra={
                    "model": slot.name,
                    "alias": slot.alias,
                    "version": version,
                    "reason": reason,
                    "serving": slot.current.version if slot.current else None,
                },
            )
        slot.held_back = held
        self.metrics.version_held_back.labels(slot.name).set(version or 0)
