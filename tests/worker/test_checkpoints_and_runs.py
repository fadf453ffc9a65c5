"""What a job leaves behind, without Celery: stored checkpoints pruned to checkpoints_to_keep (moto S3, the final
model untouched), MLflow runs of dead attempts ended when their job ends, and one metric point per step after a
resume (MLflow on SQLite)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from fixtures_s3 import s3_test_client
from mlflow import MlflowClient
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.checkpoint import save_checkpoint
from invdpo_core.config import parse_config
from invdpo_core.storage import upload_dir
from services.jobs import jobstore, reconciler
from services.jobs.models import Job, Project, utcnow
from services.jobs.queue import make_celery
from services.worker import app as worker_app
from services.worker.run_job import JobRunner
from services.worker.settings import Settings

WORKER = "host:1:abcd"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory, mlflow_sqlite: Callable[[Path], str]) -> Iterator[str]:
    """An MLflow tracking store on SQLite, shared by the module."""
    yield mlflow_sqlite(tmp_path_factory.mktemp("mlflow"))
    if mlflow.active_run() is not None:
        mlflow.end_run()


def make_job(sessions: sessionmaker[Session], dataset: str, status: str = "queued", **fields: Any) -> str:
    config = {"base_model": "org/model", "dataset": dataset, "max_steps": 10, "checkpoints_to_keep": 2}
    with sessions() as session:
        project = Project(name="alpha")
        session.add(project)
        session.flush()
        job_id = jobstore.new_job_id()
        session.add(
            Job(id=job_id, project_id=project.id, status=status, model="org/model", training_file=dataset,
                method_type="inversion_dpo", config=config, seed=0, **{"attempt": 0, **fields})
        )  # fmt: skip
        session.commit()
    return job_id


def settings(tmp_path: Path, artifact_uri: str, tracking_uri: str = "sqlite:///unused.db") -> Settings:
    return Settings(  # type: ignore[call-arg]
        artifact_uri=artifact_uri, work_dir=str(tmp_path / "work"), mlflow_tracking_uri=tracking_uri,
        system_metrics=False, _env_file=None,
    )  # fmt: skip


def test_checkpoints_past_checkpoints_to_keep_leave_the_store_and_the_list_but_never_the_model(
    s3_env: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = make_job(sessions, "s3://b/d/manifest.jsonl")
    uri = f"s3://{s3_env}/jobs"
    runner = JobRunner(settings(tmp_path, uri), sessions, job_id, WORKER, main=True)
    runner.checkpoints_to_keep = 2  # what run() reads from the job's config
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    upload_dir(tmp_path / "model", f"{uri}/{job_id}/model")
    # checkpoint-1 must survive checkpoint-10's pruning by name: a prefix, not a string prefix.
    for step in (1, 5, 10, 15):
        path = save_checkpoint(runner.out / "checkpoints", step, {"model": {"w": torch.ones(2)}}, config_hash="h")
        runner.on_checkpoint(path, step)
    s3 = s3_test_client(os.environ["AWS_ENDPOINT_URL_S3"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env, Prefix=f"jobs/{job_id}/")["Contents"]}
    stored = {k.split("/")[3] for k in keys if k.startswith(f"jobs/{job_id}/checkpoints/")}
    assert stored == {"checkpoint-10", "checkpoint-15"}
    assert f"jobs/{job_id}/model/model_index.json" in keys
    with sessions() as session:  # what GET .../checkpoints lists
        rows, _ = jobstore.list_checkpoints(session, job_id, after=None, limit=10)
        assert [r.step_number for r in rows] == [10, 15]
    # A new machine restores the newest, as ever.
    other = JobRunner(settings(tmp_path / "other", uri), sessions, job_id, WORKER, main=True)
    assert other.restore_checkpoint() == 15


def test_metric_history_has_one_point_per_step_after_a_resume(
    sessions: sessionmaker[Session], tracking: str, tmp_path: Path
) -> None:
    dataset = tmp_path / "data" / "manifest.jsonl"
    dataset.parent.mkdir()
    dataset.write_text("{}\n")
    job_id = make_job(sessions, str(dataset), status="running")

    def attempt(steps: range) -> str:
        runner = JobRunner(settings(tmp_path, str(tmp_path / "store"), tracking), sessions, job_id, WORKER, True)
        with sessions() as session:
            job = jobstore.get_job(session, job_id)
            assert job is not None
            session.expunge(job)
        runner.start_tracking(job, parse_config({**job.config, "output_dir": str(runner.out)}))
        for step in steps:
            runner.on_step(step, 10, {"loss": 1.0 / step})
        mlflow.end_run("RUNNING")  # the attempt dies: nothing ends its run
        assert runner.run_id is not None
        return runner.run_id

    first = attempt(range(1, 6))  # steps 1-5 logged, the last checkpoint was at step 2
    second = attempt(range(3, 9))  # resumed from step 2: steps 3-5 are trained again, then 6-8
    assert first == second  # the same run, continued
    history = MlflowClient(tracking).get_metric_history(first, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))


def _running_run(tracking: str) -> str:
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("dead") or client.get_experiment(client.create_experiment("dead"))
    return client.create_run(experiment.experiment_id).info.run_id


def test_the_run_of_a_training_process_that_died_for_good_is_ended(
    sessions: sessionmaker[Session], tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_app, "sessions", lambda: sessions)
    run_id = _running_run(tracking)
    job_id = make_job(sessions, "s3://b/d/manifest.jsonl", mlflow_run_id=run_id)
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, WORKER)
    worker_app._after_exit(job_id, WORKER, -9, max_attempts=1, tracking_uri=tracking)  # the last attempt
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "training_process_died")
    assert MlflowClient(tracking).get_run(run_id).info.status == "FAILED"


def test_the_reconciler_ends_the_runs_of_jobs_whose_workers_are_gone(
    sessions: sessionmaker[Session], tracking: str, redis_server: Any
) -> None:
    lost, cancelled = _running_run(tracking), _running_run(tracking)
    stale = utcnow() - timedelta(hours=1)
    lost_job = make_job(sessions, "s3://b/d/m.jsonl", status="running", attempt=3, mlflow_run_id=lost)
    with sessions() as session:  # a second project's job: make_job makes project "alpha" each time
        session.get(Job, lost_job).heartbeat_at = stale  # type: ignore[union-attr]
        session.commit()
        project = Project(name="beta")
        session.add(project)
        session.flush()
        cancel_id = jobstore.new_job_id()
        session.add(
            Job(id=cancel_id, project_id=project.id, status="cancel_requested", model="m", training_file="t",
                method_type="inversion_dpo", config={}, seed=0, attempt=1, mlflow_run_id=cancelled,
                heartbeat_at=stale)
        )  # fmt: skip
        session.commit()
    config = Settings(  # type: ignore[call-arg]
        broker_url=redis_server.url, mlflow_tracking_uri=tracking, max_attempts=3, _env_file=None
    )
    report = reconciler.run_once(sessions, config, make_celery(redis_server.url))
    assert (report.failed, report.cancelled) == ([lost_job], [cancel_id])
    assert MlflowClient(tracking).get_run(lost).info.status == "FAILED"
    assert MlflowClient(tracking).get_run(cancelled).info.status == "KILLED"
