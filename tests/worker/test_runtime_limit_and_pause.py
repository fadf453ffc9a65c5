"""The runtime limit and pause/resume on the worker's side, without Celery: the training process (run_job's
JobRunner, in this process, training the tiny model for real) stops at the job's max_runtime_seconds with a
checkpoint and fails the job as runtime_limit; the Celery task's watch kills a training process that outlives the
limit by its grace; a pause request checkpoints and lets the job go, and the resumed job continues from that
checkpoint in the same MLflow run."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import jobstore
from services.jobs.models import Job, Project
from services.worker import app as worker_app
from services.worker.run_job import JobRunner
from services.worker.settings import Settings

WORKER = "host:1:abcd"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(model dir, dataset manifest) on the local disk: the tiny pipeline and two pairs of plain squares."""
    from PIL import Image

    from invdpo_core.testing import build_tiny_pipeline

    model = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_pipeline("sd15").save_pretrained(model)
    data = tmp_path_factory.mktemp("toy")
    for name, colour in {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}.items():
        Image.new("RGB", (64, 64), colour).save(data / f"{name}.png")
    (data / "manifest.jsonl").write_text(
        '{"prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"}\n'
        '{"prompt": "a green square", "chosen": "green.png", "rejected": "red.png"}\n'
    )
    return str(model), str(data / "manifest.jsonl")


def make_job(sessions: sessionmaker[Session], tiny: tuple[str, str], **fields: Any) -> str:
    model, dataset = tiny
    config = {
        "base_model": model, "dataset": dataset, "resolution": 64, "inversion_steps": 4, "max_steps": 40,
        "checkpoint_interval": 100, "learning_rate": 1e-4, "beta": 2000,
    }  # fmt: skip
    with sessions() as session:
        project = Project(name="alpha")
        session.add(project)
        session.flush()
        job_id = jobstore.new_job_id()
        session.add(
            Job(id=job_id, project_id=project.id, status="queued", model=model, training_file=dataset,
                method_type="inversion_dpo", config=config, seed=0, attempt=0, **fields)
        )  # fmt: skip
        session.commit()
        assert jobstore.claim_job(session, job_id, WORKER)
    return job_id


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path: Path, mlflow_sqlite: Callable[[Path], str]) -> None:
    mlflow_sqlite(tmp_path)  # settings() below points at it


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        artifact_uri=str(tmp_path / "store"), work_dir=str(tmp_path / "work"),
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False, _env_file=None, **overrides,
    )  # fmt: skip


def test_at_its_runtime_limit_the_job_checkpoints_and_fails_as_runtime_limit(
    sessions: sessionmaker[Session], tiny: tuple[str, str], tmp_path: Path
) -> None:
    import mlflow

    job_id = make_job(sessions, tiny, max_runtime_seconds=3600)
    runner = JobRunner(settings(tmp_path), sessions, job_id, WORKER, main=True)
    report = runner.on_step

    def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
        report(step, total, metrics)
        if step == 3:
            runner.deadline = time.monotonic()  # the hour is up now (the clock itself is not what is tested)

    runner.on_step = on_step  # type: ignore[method-assign]
    assert runner.deadline == float("inf")
    assert runner.run() == 0
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None
        assert (job.status, job.error_code, job.error_param) == ("failed", "runtime_limit", "max_runtime_seconds")
        assert job.error_message == (
            "the job reached its max_runtime_seconds (3600 s = 1 h) and was stopped at step 3; its checkpoints are "
            "kept"
        )
        rows, _ = jobstore.list_checkpoints(session, job_id, after=None, limit=10)
        assert [r.step_number for r in rows] == [3]  # written at the stop (the interval is 100)
    assert (tmp_path / "store" / job_id / "checkpoints" / "checkpoint-3" / "manifest.json").is_file()
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(job.mlflow_run_id).info.status == (
        "FAILED"
    )


def test_a_job_whose_time_is_used_up_fails_before_training(
    sessions: sessionmaker[Session], tiny: tuple[str, str], tmp_path: Path
) -> None:
    """Runtime counts over all attempts: a job requeued with its hour used up by earlier ones does not train."""
    job_id = make_job(sessions, tiny, max_runtime_seconds=3600, runtime_seconds=3600.5)
    runner = JobRunner(settings(tmp_path), sessions, job_id, WORKER, main=True)
    runner.on_step = lambda *a: pytest.fail("it trained")  # type: ignore[method-assign]
    assert runner.run() == 0
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "runtime_limit")


def test_a_training_process_past_the_limit_and_its_grace_is_killed_and_the_job_fails(
    sessions: sessionmaker[Session], tiny: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Celery task's watch: a training process that does not stop at the limit (stuck loading, say) is killed
    checkpoint_grace_seconds later, the job fails as runtime_limit, and the time it ran is the job's runtime."""
    monkeypatch.setattr(worker_app, "sessions", lambda: sessions)
    job_id = make_job(sessions, tiny, max_runtime_seconds=60)
    with sessions() as session:  # 59 of its 60 s were used by an earlier attempt
        session.execute(update(Job).where(Job.id == job_id).values(runtime_seconds=59.0))
        session.commit()
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    config = settings(tmp_path, checkpoint_grace_seconds=1.5, heartbeat_interval_seconds=0.5, cancel_poll_seconds=0.1)
    started = time.monotonic()
    try:
        returncode, over_limit = worker_app._wait(stuck, job_id, WORKER, config, runtime_left=1.0)
    finally:
        stuck.kill()
    took = time.monotonic() - started
    assert over_limit and returncode == -9
    assert 2.5 <= took < 10, took
    worker_app._after_exit(job_id, WORKER, returncode, max_attempts=3, runtime_limit=60)
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "runtime_limit")
        assert 59.0 + 2.5 <= job.runtime_seconds <= 59.0 + took + 0.5


def test_a_pause_checkpoints_and_the_resume_continues_from_there_in_the_same_run(
    sessions: sessionmaker[Session], tiny: tuple[str, str], tmp_path: Path
) -> None:
    import mlflow

    job_id = make_job(sessions, tiny)
    config = settings(tmp_path, cancel_poll_seconds=0)  # the pause is seen at the next micro-batch

    def attempt(pause_at: int) -> JobRunner:
        runner = JobRunner(config, sessions, job_id, WORKER, main=True)
        report = runner.on_step

        def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
            report(step, total, metrics)
            if step == pause_at:  # POST .../pause, as the API does it
                with sessions() as session:
                    assert jobstore.pause_job(session, job_id) is not None

        runner.on_step = on_step  # type: ignore[method-assign]
        assert runner.run() == 0
        return runner

    first = attempt(pause_at=3)
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.step, job.claimed_by) == ("paused", 3, None)
        assert [r.step_number for r in jobstore.list_checkpoints(session, job_id, after=None, limit=10)[0]] == [3]
        assert jobstore.resume_job(session, job_id)
        session.commit()
        assert jobstore.claim_job(session, job_id, WORKER)  # the next worker (here the same, a new process)
    second = attempt(pause_at=5)
    assert second.run_id == first.run_id
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.step) == ("paused", 5)
        messages = [e.message for e in jobstore.list_events(session, job_id, after=None, limit=500)[0]]
    assert "Resuming from the checkpoint of step 3" in messages
    client = mlflow.MlflowClient(config.mlflow_tracking_uri)
    assert client.get_run(first.run_id).info.status == "SCHEDULED"  # to be continued
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "loss")) == [1, 2, 3, 4, 5]
