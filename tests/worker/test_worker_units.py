"""The worker's parts, without Celery or an MLflow server: launch command, GPU count, job claims and endings,
checkpoint upload and restore (moto S3), dataset fingerprints, error codes, the served pyfunc model, LoRA merging
and the promote route (MLflow on SQLite)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from fixtures_s3 import s3_test_client
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from invdpo_core.checkpoint import read_manifest, save_checkpoint
from invdpo_core.testing import build_tiny_pipeline
from services.jobs import jobstore
from services.jobs.jobstore import default_model_name
from services.jobs.models import Job, Project
from services.worker import app as worker_app
from services.worker.run_job import JobRunner, job_error, merge_lora
from services.worker.settings import Settings
from services.worker.tracking import SERVING_CODE, SIGNATURE, dataset_fingerprint, flat_params

WORKER = "host:1:abcd"


def make_job(sessions: sessionmaker[Session], project: str = "alpha", status: str = "queued", **config: Any) -> str:
    with sessions() as session:
        row = Project(name=project)
        session.add(row)
        session.flush()
        job_id = jobstore.new_job_id()
        full = {"base_model": "org/model", "dataset": "s3://b/d/manifest.jsonl", "max_steps": 10, **config}
        session.add(
            Job(id=job_id, project_id=row.id, status=status, model="org/model", training_file=full["dataset"],
                method_type="inversion_dpo", config=full, seed=0, attempt=0)
        )  # fmt: skip
        session.commit()
    return job_id


# ---------------------------------------------------------------- the Celery side


def test_launch_command_runs_run_job_under_accelerate_with_one_process_per_gpu() -> None:
    cmd = worker_app.launch_command("ftjob-x", WORKER, 1, "no")
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--num_processes"] and cmd[4] == "1"
    assert cmd[-5:] == ["-m", "services.worker.run_job", "ftjob-x", "--worker-id", WORKER]
    assert "--multi_gpu" not in cmd
    cmd = worker_app.launch_command("ftjob-x", WORKER, 4, "bf16")
    assert cmd[4] == "4" and "--multi_gpu" in cmd and cmd[cmd.index("--mixed_precision") + 1] == "bf16"


@pytest.mark.parametrize(("devices", "count"), [("0,1", 2), ("3", 1), ("", 0), ("-1", 0)])
def test_visible_gpus_reads_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, devices: str, count: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", devices)
    assert worker_app.visible_gpus() == count


def test_requeue_gives_the_job_back_to_the_queue_and_the_attempt_back(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, WORKER)
        assert not jobstore.requeue_job(session, job_id, "someone-else")
        assert jobstore.requeue_job(session, job_id, WORKER)
        job = jobstore.get_job(session, job_id)
        assert job is not None
        assert (job.status, job.claimed_by, job.attempt) == ("queued", None, 0)
        assert jobstore.claim_job(session, job_id, "next")
        jobstore.cancel_job(session, job_id)
        assert not jobstore.requeue_job(session, job_id, "next")  # cancel_requested: finish it, do not requeue


def test_a_message_for_a_job_that_cannot_be_claimed_does_nothing(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = make_job(sessions, status="succeeded")
    monkeypatch.setattr(worker_app, "sessions", lambda: sessions)
    monkeypatch.setattr(worker_app.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    worker_app.train_job.run(job_id)  # the task's function itself, in this process
    worker_app.train_job.run("not-a-job-id")
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and job.status == "succeeded" and job.attempt == 0


def test_a_training_process_that_dies_is_queued_again_then_fails_after_max_attempts(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_app, "sessions", lambda: sessions)
    sent: list[str] = []
    monkeypatch.setattr(worker_app, "enqueue_training", lambda job_id, _app: sent.append(job_id))
    job_id = make_job(sessions)
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, WORKER)
    worker_app._after_exit(job_id, WORKER, -9, max_attempts=2)  # the OOM killer, attempt 1 of 2: resume
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.attempt, job.claimed_by) == ("queued", 1, None)
        last = jobstore.list_events(session, job_id, after=None, limit=100)[0][-1]
        assert "killed by SIGKILL" in last.message and "attempt 1 of 2" in last.message
    assert sent == [job_id]
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, WORKER)
    worker_app._after_exit(job_id, WORKER, -11, max_attempts=2)  # attempt 2 of 2: the job fails with the reason
    with sessions() as session:
        job = jobstore.get_job(session, job_id)
        assert job is not None and (job.status, job.error_code) == ("failed", "training_process_died")
        assert "SIGSEGV" in (job.error_message or "") and "2 times" in (job.error_message or "")
    assert sent == [job_id]


def test_reconcile_task_resends_a_queued_job_whose_message_was_lost(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, redis_server: Any
) -> None:
    from datetime import timedelta

    from services.jobs.models import utcnow
    from services.jobs.queue import make_celery, pending_job_ids

    job_id = make_job(sessions)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.dispatched_at = utcnow() - timedelta(minutes=10)
        session.commit()
    settings = Settings(broker_url=redis_server.url, reconcile_after_seconds=60, _env_file=None)  # type: ignore[call-arg]
    monkeypatch.setattr(worker_app, "get_settings", lambda: settings)
    monkeypatch.setattr(worker_app, "sessions", lambda: sessions)
    monkeypatch.setattr(worker_app, "app", make_celery(redis_server.url))
    redis_server.restart()  # an empty broker: the job's message is gone
    worker_app.reconcile.run()
    assert pending_job_ids(redis_server.url) == {job_id}
    worker_app.reconcile.run()  # just re-sent: not again
    assert len(redis.Redis.from_url(redis_server.url).lrange("gpu", 0, -1)) == 1


# ---------------------------------------------------------------- the training process


def test_job_errors_have_a_code_and_one_masked_line() -> None:
    from invdpo_core.data import DatasetError
    from invdpo_core.storage import ModelReferenceError

    assert job_error(DatasetError("empty_dataset", "s3://b/d: no usable pairs")) == {
        "code": "empty_dataset", "message": "s3://b/d: no usable pairs", "param": "training_file",
    }  # fmt: skip
    assert job_error(ModelReferenceError("model_not_found", "no"))["param"] == "model"
    assert job_error(torch.OutOfMemoryError("CUDA out of memory"))["code"] == "out_of_memory"
    error = job_error(RuntimeError("cannot reach postgresql://u:hunter2@db.internal:5432/x\n" + "x" * 1000))
    assert error == {
        "code": "internal_error",
        "message": "the job stopped on an internal error (RuntimeError); the operators have the details",
        "param": None,
    }
    # The service's own systems: a reason, never their addresses or paths.
    from mlflow.exceptions import MlflowException

    from invdpo_core.storage import StorageError
    from invdpo_core.train import TrainError

    mlflow_down = MlflowException("API request to http://10.0.0.7:5000/api/2.0/mlflow/runs/create failed")
    assert job_error(mlflow_down)["message"] == "the tracking server (MLflow) failed; the job can be retried"
    upload = job_error(StorageError("s3_error", "s3://service-artifacts/ftjob-x/checkpoints: upload failed"))
    assert upload == {
        "code": "storage_s3_error",
        "message": "the service's object store failed (s3_error); the job can be retried",
        "param": None,
    }
    train = job_error(TrainError("no checkpoint in /scratch/ftjob-x/checkpoints (worker 10.1.2.3:8080)"))
    assert train["message"] == "no checkpoint in <internal> (worker <internal>)"


def _settings(tmp_path: Path, name: str, artifact_uri: str) -> Settings:
    return Settings(artifact_uri=artifact_uri, work_dir=str(tmp_path / name), _env_file=None)  # type: ignore[call-arg]


def test_checkpoints_go_to_the_store_with_a_row_and_a_new_machine_restores_the_newest(
    s3_env: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = make_job(sessions)
    uri = f"s3://{s3_env}/checkpoints"
    first = JobRunner(_settings(tmp_path, "first", uri), sessions, job_id, WORKER, main=True)
    for step in (5, 10):
        objects = {"model": {"w": torch.full((3,), float(step))}}
        path = save_checkpoint(first.out / "checkpoints", step, objects, config_hash="h")
        first.on_checkpoint(path, step)
    s3 = s3_test_client(os.environ["AWS_ENDPOINT_URL_S3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_env, Prefix=f"checkpoints/{job_id}/")["Contents"]]
    assert f"checkpoints/{job_id}/checkpoints/checkpoint-10/manifest.json" in keys
    with sessions() as session:
        rows, _ = jobstore.list_checkpoints(session, job_id, after=None, limit=10)
        assert [(r.step_number, r.uri) for r in rows] == [
            (s, f"{uri}/{job_id}/checkpoints/checkpoint-{s}") for s in (5, 10)
        ]

    second = JobRunner(_settings(tmp_path, "second", uri), sessions, job_id, WORKER, main=True)
    assert second.restore_checkpoint() == 10
    restored = second.out / "checkpoints" / "checkpoint-10"
    assert read_manifest(restored) == read_manifest(first.out / "checkpoints" / "checkpoint-10")

    # The newest stored copy is gone: the one before it is restored.
    for key in [k for k in keys if "checkpoint-10/" in k]:
        s3.delete_object(Bucket=s3_env, Key=key)
    third = JobRunner(_settings(tmp_path, "third", uri), sessions, job_id, WORKER, main=True)
    assert third.restore_checkpoint() == 5
    # A local checkpoint as new as the stored ones is kept as it is.
    assert first.restore_checkpoint() == 10


def test_a_job_checkpointed_under_the_old_layout_resumes_after_the_artifact_uri_moved(
    s3_env: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # Chart 0.1 and the old compose file set INVDPO_ARTIFACT_URI to s3://BUCKET/checkpoints (so checkpoints sat
    # under checkpoints/<job>/checkpoints/); now it is s3://BUCKET/jobs. A job started before the change resumes
    # from the URIs its checkpoint rows recorded, and its next checkpoint goes under the new prefix.
    job_id = make_job(sessions)
    old = JobRunner(_settings(tmp_path, "old", f"s3://{s3_env}/checkpoints"), sessions, job_id, WORKER, main=True)
    path = save_checkpoint(old.out / "checkpoints", 4, {"model": {"w": torch.ones(2)}}, config_hash="h")
    old.on_checkpoint(path, 4)
    new = JobRunner(_settings(tmp_path, "new", f"s3://{s3_env}/jobs"), sessions, job_id, WORKER, main=True)
    assert new.restore_checkpoint() == 4
    path = save_checkpoint(new.out / "checkpoints", 8, {"model": {"w": torch.ones(2)}}, config_hash="h")
    new.on_checkpoint(path, 8)
    with sessions() as session:
        rows, _ = jobstore.list_checkpoints(session, job_id, after=None, limit=10)
    assert [r.uri for r in rows] == [
        f"s3://{s3_env}/checkpoints/{job_id}/checkpoints/checkpoint-4",
        f"s3://{s3_env}/jobs/{job_id}/checkpoints/checkpoint-8",
    ]
    assert (
        JobRunner(
            _settings(tmp_path, "third", f"s3://{s3_env}/jobs"), sessions, job_id, WORKER, main=True
        ).restore_checkpoint()
        == 8
    )


def test_checkpoints_to_a_local_artifact_directory(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    job_id = make_job(sessions)
    runner = JobRunner(_settings(tmp_path, "w", str(tmp_path / "store")), sessions, job_id, WORKER, main=True)
    path = save_checkpoint(runner.out / "checkpoints", 3, {"model": {"w": torch.ones(2)}}, config_hash="h")
    runner.on_checkpoint(path, 3)
    assert read_manifest(tmp_path / "store" / job_id / "checkpoints" / "checkpoint-3") is not None
    other = JobRunner(_settings(tmp_path, "w2", str(tmp_path / "store")), sessions, job_id, WORKER, main=True)
    assert other.restore_checkpoint() == 3


def test_dataset_fingerprint_follows_the_files_not_their_place(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "manifest.jsonl").write_text('{"prompt": "p", "chosen": "images/a.png", "rejected": "images/b.png"}\n')
    (data / "images" / "a.png").write_bytes(b"a" * 10)
    (data / "images" / "b.png").write_bytes(b"b" * 10)
    (data / "train-0.parquet").write_bytes(b"p" * 5)
    (data / "train-1.parquet").write_bytes(b"q" * 6)
    manifest = dataset_fingerprint(str(data / "manifest.jsonl"))
    assert len(manifest) == 64
    shutil.copytree(data, tmp_path / "copy")
    assert dataset_fingerprint(str(tmp_path / "copy" / "manifest.jsonl")) == manifest
    parquet = dataset_fingerprint(str(data / "train-0.parquet"))
    glob = dataset_fingerprint(str(data / "train-*.parquet"))
    assert len({manifest, parquet, glob}) == 3
    assert dataset_fingerprint(str(data)) == manifest  # a manifest counts with everything beside it
    (data / "images" / "b.png").write_bytes(b"b" * 11)  # an image changed: the manifest's dataset changed
    assert dataset_fingerprint(str(data / "manifest.jsonl")) != manifest
    assert dataset_fingerprint(str(data / "train-0.parquet")) == parquet  # a parquet file is only itself


def test_dataset_fingerprint_on_s3(s3_env: str, tmp_path: Path) -> None:
    from invdpo_core.storage import upload_dir

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.jsonl").write_text("{}\n")
    upload_dir(tmp_path / "d", f"s3://{s3_env}/d")
    before = dataset_fingerprint(f"s3://{s3_env}/d/manifest.jsonl")
    assert before == dataset_fingerprint(f"s3://{s3_env}/d")
    (tmp_path / "d" / "x.png").write_bytes(b"x")
    upload_dir(tmp_path / "d", f"s3://{s3_env}/d")
    assert dataset_fingerprint(f"s3://{s3_env}/d/manifest.jsonl") != before


def test_params_are_the_hyperparameters_flattened() -> None:
    from invdpo_core.config import parse_config

    config = parse_config({"base_model": "m", "dataset": "d", "validation_prompts": ["a", "b"], "output_dir": "/x"})
    params = flat_params(config)
    assert params["adapter.type"] == "full" and params["adapter.rank"] == "8"
    assert json.loads(params["validation_prompts"]) == ["a", "b"]
    assert "output_dir" not in params and "resume" not in params
    assert default_model_name("ftjob-1", None) == "invdpo-ftjob-1" and default_model_name("j", "cats") == "invdpo-cats"


# ---------------------------------------------------------------- the model users get


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline("sd15").save_pretrained(path)
    return path


def test_served_model_turns_prompts_into_pngs_of_the_trained_size(tiny_dir: Path, tmp_path: Path) -> None:
    import mlflow

    mlflow.pyfunc.save_model(
        tmp_path / "model", python_model=str(SERVING_CODE), artifacts={"pipeline": str(tiny_dir)},
        model_config={"resolution": 64, "num_inference_steps": 2}, signature=SIGNATURE, pip_requirements=["mlflow"],
    )  # fmt: skip
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    out = model.predict(pd.DataFrame({"prompt": ["a red apple", "a red apple", "a blue car"], "seed": [1, 1, None]}))
    images = [base64.b64decode(s) for s in out["image"]]
    assert images[0] == images[1] != images[2]  # the seed decides
    for data in images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (64, 64)
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"text": ["no prompt column"]}))


def test_a_lora_is_fused_into_a_full_pipeline_for_serving(tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(tiny_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    torch.manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:  # zero at initialisation: make the adapter do something
            param.data.normal_(0, 0.5)
    type(pipe).save_lora_weights(
        tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    )
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 4, 32)
    with torch.no_grad():
        expected = pipe.unet(sample, t, text).sample

    merged = DiffusionPipeline.from_pretrained(merge_lora(str(tiny_dir), tmp_path / "lora", tmp_path / "merged"))
    base = DiffusionPipeline.from_pretrained(tiny_dir)
    with torch.no_grad():
        assert torch.allclose(merged.unet(sample, t, text).sample, expected, atol=1e-5)
        assert not torch.allclose(base.unet(sample, t, text).sample, expected, atol=1e-3)
    assert not any("lora" in name for name, _ in merged.unet.named_parameters())


# ---------------------------------------------------------------- POST /v1/models/{name}/promote


@pytest.fixture
def registry(tmp_path: Path, mlflow_sqlite: Callable[[Path], str]) -> str:
    return mlflow_sqlite(tmp_path)


def _api(tmp_path: Path, registry: str) -> TestClient:
    from services.api.main import create_app
    from services.api.settings import Settings as ApiSettings

    settings = ApiSettings(
        database_url=f"sqlite:///{tmp_path / 'api.db'}", broker_url="redis://127.0.0.1:1/0",
        mlflow_tracking_uri=registry, reconcile_interval_seconds=0,
        promotion_gate="none",  # these jobs have no evaluation; test_promotion_gate.py tests the gate
    )  # fmt: skip
    return TestClient(create_app(settings))


def test_promote_sets_champion_on_a_version_of_the_callers_project(tmp_path: Path, registry: str) -> None:
    from mlflow import MlflowClient

    from services.admin import create_api_key

    with _api(tmp_path, registry) as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        job_a, job_b = make_job(factory, "alpha"), make_job(factory, "beta")
        with factory() as session:
            key_a, _ = create_api_key(session, "alpha")
        client = MlflowClient(tracking_uri=registry)
        client.create_registered_model("cats")
        for job_id in (job_a, job_b, "not-a-job"):
            client.create_model_version("cats", f"file://{tmp_path}/m", tags={"job_id": job_id})
        with factory() as session:  # what the workers record: alpha's name, alpha's and beta's versions
            alpha, beta = (jobstore.get_job(session, j).project_id for j in (job_a, job_b))  # type: ignore[union-attr]
            assert jobstore.claim_model_name(session, "cats", alpha)
            for version, job_id, project in ((1, job_a, alpha), (2, job_b, beta)):
                jobstore.record_model_version(
                    session, "cats", version, job_id=job_id, project_id=project, gate_passed=True, gate_reasons=[]
                )
        auth = {"Authorization": f"Bearer {key_a}"}

        response = api.post("/v1/models/cats/promote", json={"version": 1}, headers=auth)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "name": "cats", "version": 1, "alias": "champion", "job_id": job_a, "model_uri": "models:/cats@champion",
        }  # fmt: skip
        assert str(client.get_model_version_by_alias("cats", "champion").version) == "1"
        for version in (2, 3, 9):  # another project's, registered outside invdpo, missing
            answer = api.post("/v1/models/cats/promote", json={"version": version}, headers=auth)
            assert (answer.status_code, answer.json()) == (404, {"detail": "model version not found"})
        answer = api.post("/v1/models/dogs/promote", json={"version": 1}, headers=auth)
        assert (answer.status_code, answer.json()) == (404, {"detail": "model not found"})
        assert api.post("/v1/models/cats/promote", json={"version": 1}).status_code == 401
        for bad in (0, 2**31, 10**30):
            assert api.post("/v1/models/cats/promote", json={"version": bad}, headers=auth).status_code == 422
        assert str(client.get_model_version_by_alias("cats", "champion").version) == "1"


def test_promote_answers_503_when_the_registry_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.admin import create_api_key

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with _api(tmp_path, "http://127.0.0.1:1") as api:
        factory = api.app.state.session_factory  # type: ignore[attr-defined]
        job_id = make_job(factory, "alpha")
        with factory() as session:
            key, _ = create_api_key(session, "alpha")
            project = jobstore.get_job(session, job_id).project_id  # type: ignore[union-attr]
            assert jobstore.claim_model_name(session, "cats", project)
            jobstore.record_model_version(
                session, "cats", 1, job_id=job_id, project_id=project, gate_passed=True, gate_reasons=[]
            )
        answer = api.post("/v1/models/cats/promote", json={"version": 1}, headers={"Authorization": f"Bearer {key}"})
        assert (answer.status_code, answer.json()) == (503, {"detail": "model registry unavailable"})
