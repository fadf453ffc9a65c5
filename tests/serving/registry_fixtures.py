"""Helpers of the model server tests: a job database with projects and keys, an MLflow registry, and versions
registered exactly as the worker registers them (services/worker/tracking.py register_model_once, with the job_id
tag the promotion gate and the server read)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.gate import GateRule, evaluate_gate
from services.admin import create_api_key
from services.jobs import jobstore
from services.jobs.db import make_engine, make_session_factory, migrate
from services.jobs.models import Job, Project

# What the default promotion gate (implicit accuracy's lower bound above 0.5) passes and refuses.
PASSING = {"eval/implicit_acc": 0.7, "eval/implicit_acc_lower": 0.6}
FAILING = {"eval/implicit_acc": 0.55, "eval/implicit_acc_lower": 0.45}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Tenant:
    project_id: int
    key: str


@dataclass
class Registry:
    """A job database and an MLflow registry; `version()` adds a job of a project and registers its model."""

    database_url: str
    sessions: sessionmaker[Session]
    tracking_uri: str
    pipeline_dir: Path
    artifacts: Path | None  # None: the MLflow server's own artifact store

    def tenant(self, project: str) -> Tenant:
        with self.sessions() as session:
            key, _ = create_api_key(session, project)
            project_id = session.scalars(select(Project.id).where(Project.name == project)).one()
        return Tenant(project_id, key)

    def version(self, name: str, project_id: int, metrics: dict[str, float] | None) -> int:
        """A succeeded job of `project_id` with these evaluation metrics, and its model registered under `name`
        (alias candidate), as the worker does."""
        from services.worker.tracking import register_model_once

        job_id = jobstore.new_job_id()
        with self.sessions() as session:
            session.add(
                Job(id=job_id, project_id=project_id, status="succeeded", model="org/model", training_file="s3://b/d",
                    method_type="inversion_dpo", config={}, seed=0, attempt=0)
            )  # fmt: skip
            session.commit()
            if metrics is not None:
                jobstore.set_evaluation(session, job_id, {"metrics": metrics, "not_run": {}, "grid": None})
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment = f"serving-tests-{name}"
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=self.artifacts.as_uri() if self.artifacts else None)
        mlflow.set_experiment(experiment)
        with self.sessions() as session:
            assert jobstore.claim_model_name(session, name, project_id), f"{name} belongs to another project"
        with mlflow.start_run():
            version, _ = register_model_once(
                job_id=job_id, name=name, pipeline_dir=self.pipeline_dir, resolution=64, inference_steps=2
            )
        # The verdict under the default rule, recorded where the promote route reads it.
        passed, reasons = evaluate_gate(metrics or {}, GateRule())
        with self.sessions() as session:
            jobstore.record_model_version(
                session, name, int(version), job_id=job_id, project_id=project_id, gate_passed=passed,
                gate_reasons=reasons,
            )  # fmt: skip
        return int(version)


def make_registry(
    database_url: str, tracking_uri: str, pipeline_dir: Path, artifacts: Path | None
) -> Iterator[Registry]:
    engine = make_engine(database_url)
    migrate(engine)
    previous = mlflow.get_tracking_uri()
    yield Registry(database_url, make_session_factory(engine), tracking_uri, pipeline_dir, artifacts)
    mlflow.set_tracking_uri(previous)
    engine.dispose()
