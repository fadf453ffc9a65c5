"""The job resources end to end: HTTP in, rows in the database, messages really in Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.jobs import jobstore
from services.jobs.models import Job, Project
from services.jobs.validation import validate_job_files

JOBS = "/v1/fine_tuning/jobs"


def test_create_validates_files_then_queues_and_enqueues(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], gpu_messages: Callable
) -> None:
    body = job_body(seed=7, suffix="red", registered_model_name="tiny-red", metadata={"team": "vision"})
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job"
    assert job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files"  # answered before the files are read
    assert job["seed"] == 7 and job["suffix"] == "red" and job["metadata"] == {"team": "vision"}
    # The resolved hyperparameters: the ones sent plus the config defaults, never the job's own fields.
    hp = job["method"]["hyperparameters"]
    assert hp["beta"] == 2000 and hp["max_steps"] == 10 and hp["loss_type"] == "sigmoid"
    assert not {"base_model", "dataset", "seed", "method", "output_dir"} & hp.keys()
    assert job["total_steps"] == 10 and job["step"] is None

    got = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert got["status"] == "queued"
    assert got["error"] is None
    assert gpu_messages() == [job["id"]]  # enqueued after the commit, by name, to the gpu queue


def test_an_inpo_job_is_accepted_with_the_released_defaults(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    r = client.post(JOBS, json=job_body(method={"type": "inpo", "hyperparameters": {"max_steps": 10}}), headers=auth)
    assert r.status_code == 201, r.text
    job = r.json()
    hp = job["method"]["hyperparameters"]
    assert job["method"]["type"] == "inpo"
    assert (hp["inpo_inversion_steps"], hp["inpo_eta"], hp["inpo_inverter"]) == (10, 0.1, "policy")


def test_seed_is_chosen_when_omitted(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job = client.post(JOBS, json=job_body(), headers=auth).json()
    assert isinstance(job["seed"], int) and job["seed"] >= 0


def test_missing_dataset_fails_the_job_with_a_clear_error(
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    tmp_path: Any,
    gpu_messages: Callable,
) -> None:
    missing = str(tmp_path / "nowhere" / "pairs.jsonl")
    job = client.post(JOBS, json=job_body(training_file=missing), headers=auth).json()
    got = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert got["status"] == "failed"
    assert got["error"]["code"] == "dataset_not_found"
    assert got["error"]["param"] == "training_file"
    assert missing in got["error"]["message"] and "Traceback" not in got["error"]["message"]
    assert got["finished_at"] is not None
    assert gpu_messages() == []  # no GPU spent
    events = client.get(f"{JOBS}/{job['id']}/events", headers=auth).json()["data"]
    assert events[-1]["level"] == "error" and "dataset_not_found" not in events[-1]["message"]
    assert missing in events[-1]["message"]


def test_missing_model_and_bad_validation_file_fail_with_their_param(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], tmp_path: Any
) -> None:
    job = client.post(JOBS, json=job_body(model=str(tmp_path)), headers=auth).json()
    error = client.get(f"{JOBS}/{job['id']}", headers=auth).json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"

    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    job = client.post(JOBS, json=job_body(validation_file=str(tmp_path / "bad.jsonl")), headers=auth).json()
    error = client.get(f"{JOBS}/{job['id']}", headers=auth).json()["error"]
    assert error["code"] == "missing_column" and error["param"] == "validation_file"


def test_a_models_schedule_is_accepted_or_the_job_fails_naming_the_field_before_the_queue(
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    tiny_model: str,
    tmp_path: Any,
    gpu_messages: Callable,
) -> None:
    # SD2.1-768-like (v-prediction) with linspace spacing: every method trains it, so the job is queued.
    from invdpo_core.testing import with_scheduler

    v_model = str(
        with_scheduler(Path(tiny_model), tmp_path / "v", prediction_type="v_prediction", timestep_spacing="linspace")
    )
    for method in ("inversion_dpo", "inpo", "diffusion_dpo"):
        body = job_body(model=v_model, method={"type": method, "hyperparameters": {"max_steps": 10}})
        job = client.post(JOBS, json=body, headers=auth).json()
        assert client.get(f"{JOBS}/{job['id']}", headers=auth).json()["status"] == "queued"
    queued = gpu_messages()
    # An x0-prediction model: no method trains it; the job fails before any GPU with the field and the reason.
    x0_model = str(with_scheduler(Path(tiny_model), tmp_path / "x0", prediction_type="sample"))
    job = client.post(JOBS, json=job_body(model=x0_model), headers=auth).json()
    got = client.get(f"{JOBS}/{job['id']}", headers=auth).json()
    assert got["status"] == "failed"
    assert got["error"]["code"] == "unsupported_model" and got["error"]["param"] == "model"
    assert "scheduler.prediction_type: 'sample' is not supported" in got["error"]["message"]
    assert gpu_messages() == queued and len(queued) == 3


@pytest.mark.parametrize(
    ("hyperparameters", "path", "words"),
    [
        ({"beta": 0}, "method.hyperparameters.beta", "greater than 0"),
        ({"loss_type": "square"}, "method.hyperparameters.loss_type", "sigmoid"),
        ({"adapter": {"type": "lora", "rank": 0}}, "method.hyperparameters.adapter.rank", "greater than or equal"),
        ({"learning_rte": 1e-5}, "method.hyperparameters.learning_rte", "(did you mean 'learning_rate'?)"),
        ({"adapter": {"rnak": 4}}, "method.hyperparameters.adapter.rnak", "(did you mean 'rank'?)"),
        ({"resolution": 100}, "method.hyperparameters", "multiple of 8"),
        ({"base_model": "other"}, "method.hyperparameters.base_model", "top-level `model`"),
        ({"seed": 3}, "method.hyperparameters.seed", "top-level `seed`"),
        ({"output_dir": "/etc"}, "method.hyperparameters.output_dir", "worker"),
        # Where a worker keeps a disk inversion cache (any s3:// prefix its credentials reach): not a job's choice.
        ({"inversion_cache_dir": "s3://other/cache"}, "method.hyperparameters.inversion_cache_dir", "trainer setting"),
        ({"inpo_eta": 2}, "method.hyperparameters.inpo_eta", "less than or equal"),
    ],
)
def test_invalid_hyperparameter_is_a_422_naming_the_field_path(
    client: TestClient,
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    hyperparameters: dict[str, Any],
    path: str,
    words: str,
) -> None:
    body = job_body(method={"type": "diffusion_dpo", "hyperparameters": hyperparameters})
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", *path.split(".")]
    assert error["msg"].startswith(f"{path}: ") and words in error["msg"]
    assert client.get(JOBS, headers=auth).json()["data"] == []  # nothing was created


def test_every_bad_hyperparameter_is_reported(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    body = job_body(
        method={"type": "diffusion_dpo", "hyperparameters": {"beta": 0, "max_stpes": 3, "loss_type": "l2"}}
    )
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 422
    paths = sorted(".".join(map(str, e["loc"][1:])) for e in r.json()["detail"])
    assert paths == [f"method.hyperparameters.{f}" for f in ("beta", "loss_type", "max_stpes")]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "1e400", "1e30000000"])
def test_non_finite_hyperparameter_is_a_422(client: TestClient, auth: dict[str, str], raw: str) -> None:
    body = '{"model": "m", "training_file": "t.jsonl", "method": {"type": "inversion_dpo", "hyperparameters": '
    r = client.post(
        JOBS, content=body + '{"beta": ' + raw + "}}}", headers={**auth, "Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "method", "hyperparameters", "beta"]


def test_request_schema_errors_are_422(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    bad_bodies = [
        job_body(method={"type": "ppo"}),
        job_body(model=""),
        job_body(training_file="s3://AKIAEXAMPLE:secretvalue@bucket/x.jsonl"),  # credentials in a URI
        job_body(unknown_field=1),
        job_body(seed=-1),
        job_body(suffix="has space"),
        {"training_file": "x.jsonl", "method": {"type": "inversion_dpo"}},
    ]
    for body in bad_bodies:
        r = client.post(JOBS, json=body, headers=auth)
        assert r.status_code == 422, body
        assert "secretvalue" not in r.text


def test_local_files_can_be_refused(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(allow_local_files=False)
    auth = make_key("alpha")
    r = client.post(JOBS, json=job_body(), headers=auth)
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "model"), ("body", "training_file")}
    ok = job_body(model="org/tiny-model", training_file="s3://bucket/pairs/manifest.jsonl")
    assert client.post(JOBS, json=ok, headers=auth).status_code == 201


def test_idempotency_key_returns_the_same_job_and_409_on_a_different_body(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], gpu_messages: Callable
) -> None:
    headers = {**auth, "Idempotency-Key": "create-red-1"}
    first = client.post(JOBS, json=job_body(seed=1), headers=headers)
    again = client.post(JOBS, json=job_body(seed=1), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert gpu_messages() == [first.json()["id"]]  # the replay enqueued nothing

    other = client.post(JOBS, json=job_body(seed=2), headers=headers)
    assert other.status_code == 409
    assert other.json() == {"detail": "idempotency key reused with a different request"}
    assert len(client.get(JOBS, headers=auth).json()["data"]) == 1
    # Keys are per project: another project's same key is a different job.
    beta = client.post(JOBS, json=job_body(seed=2), headers={**_other_key(client), "Idempotency-Key": "create-red-1"})
    assert beta.status_code == 201 and beta.json()["id"] != first.json()["id"]


def _other_key(client: TestClient) -> dict[str, str]:
    from services.admin import create_api_key

    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, _ = create_api_key(session, "beta")
    return {"Authorization": f"Bearer {key}"}


def test_concurrent_retries_with_one_idempotency_key_make_one_job(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(max_active_jobs_per_project=100)
    headers = {**make_key("alpha"), "Idempotency-Key": "burst"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post(JOBS, json=job_body(seed=5), headers=headers), range(8)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(client.get(JOBS, headers=headers).json()["data"]) == 1


def test_120_jobs_paginate_without_duplicates_or_gaps(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]], tmp_path: Any
) -> None:
    client = make_client(max_active_jobs_per_project=1000)
    auth = make_key("alpha")
    # A missing dataset fails fast, so the creates spend no time reading files. 120 jobs in pages of 17: seven full
    # pages and a partial last one.
    body = job_body(training_file=str(tmp_path / "missing.jsonl"))
    created = [client.post(JOBS, json=body, headers=auth).json()["id"] for _ in range(120)]
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 17}
        if after:
            params["after"] = after
        page = client.get(JOBS, params=params, headers=auth).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(seen) == len(set(seen)) == 120
    assert seen == created[::-1]  # newest first, a stable order
    assert client.get(JOBS, params={"after": "ftjob-" + "0" * 24}, headers=auth).status_code == 400


def test_list_filters_by_status(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], tmp_path: Any
) -> None:
    queued = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    failed = client.post(JOBS, json=job_body(training_file=str(tmp_path / "x.jsonl")), headers=auth).json()["id"]
    ids = lambda status: [j["id"] for j in client.get(JOBS, params={"status": status}, headers=auth).json()["data"]]  # noqa: E731
    assert ids("queued") == [queued]
    assert ids("failed") == [failed]
    assert ids("running") == []
    assert client.get(JOBS, params={"status": "bogus"}, headers=auth).status_code == 422


def test_cancel_queued_job_is_immediate(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    r = client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    # Cancelling again is a no-op; the worker that later gets the message cannot claim it.
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert not jobstore.claim_job(session, job_id, "worker-1")


def test_cancel_validating_job_stops_it_before_the_queue(
    app: FastAPI, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], gpu_messages: Callable
) -> None:
    with app.state.session_factory() as session:
        project_id = session.execute(select(Project.id)).scalar_one()
        job = jobstore.create_job(session, _job_row(project_id, job_body()))
        assert jobstore.cancel_job(session, job.id).status == "cancelled"  # type: ignore[union-attr]
    # The late validator:
    validate_job_files(app.state.session_factory, job.id, app.state.settings, celery=app.state.celery)
    with app.state.session_factory() as session:
        assert jobstore.get_job(session, job.id).status == "cancelled"  # type: ignore[union-attr]
    assert gpu_messages() == []


def _job_row(project_id: int, body: dict[str, Any]) -> Job:
    return Job(
        id=jobstore.new_job_id(),
        project_id=project_id,
        model=body["model"],
        training_file=body["training_file"],
        method_type=body["method"]["type"],
        config={},
        seed=0,
        attempt=0,
    )


def test_cancel_running_job_waits_for_the_worker(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    factory = app.state.session_factory
    with factory() as session:
        assert jobstore.claim_job(session, job_id, "worker-1")
        assert not jobstore.is_cancel_requested(session, job_id, "worker-1")
    assert client.get(f"{JOBS}/{job_id}", headers=auth).json()["status"] == "running"

    r = client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
    assert r.json()["status"] == "cancel_requested" and r.json()["finished_at"] is None
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=auth).json()["status"] == "cancel_requested"

    with factory() as session:  # the worker polls between steps, then stops
        assert jobstore.is_cancel_requested(session, job_id, "worker-1")
        assert jobstore.finish_job(session, job_id, "cancelled", worker_id="worker-1")
    got = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert got["status"] == "cancelled" and got["finished_at"] is not None
    messages = [e["message"] for e in client.get(f"{JOBS}/{job_id}/events", headers=auth).json()["data"]]
    assert messages[-2:] == ["Cancellation requested; waiting for the worker to stop", "The job was cancelled"]


@pytest.mark.parametrize("final", ["succeeded", "failed"])
def test_cancel_finished_job_is_409(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], final: str
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    with app.state.session_factory() as session:
        assert jobstore.claim_job(session, job_id, "w")
        error: jobstore.JobErrorInfo | None = {"code": "out_of_memory", "message": "CUDA out of memory", "param": None}
        assert jobstore.finish_job(session, job_id, final, error if final == "failed" else None)  # type: ignore[arg-type]
    r = client.post(f"{JOBS}/{job_id}/cancel", headers=auth)
    assert r.status_code == 409 and r.json() == {"detail": "job already finished"}


def test_worker_progress_shows_in_job_events_and_checkpoints(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    factory = app.state.session_factory
    with factory() as session:
        assert jobstore.claim_job(session, job_id, "gpu-0")
        assert not jobstore.claim_job(session, job_id, "gpu-1")  # a duplicate message finds it taken
        jobstore.set_run_info(session, job_id, mlflow_run_id="run123")
        for step in (1, 2, 3):
            assert jobstore.record_progress(session, job_id, step, 10, {"loss": 0.69 - step / 100}, worker_id="gpu-0")
        assert not jobstore.record_progress(session, job_id, 4, 10, worker_id="gpu-1")  # not its job
        jobstore.add_checkpoint(session, job_id, 3, "s3://bucket/jobs/x/checkpoint-3", {"loss": 0.66})
        jobstore.add_event(session, job_id, "sample grid at step 3", data={"uri": "s3://bucket/grid.png"})
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert (job["status"], job["step"], job["total_steps"], job["mlflow_run_id"]) == ("running", 3, 10, "run123")
    assert job["started_at"] is not None and job["estimated_finish"] >= job["started_at"]

    page = client.get(f"{JOBS}/{job_id}/events", params={"limit": 3}, headers=auth).json()
    assert page["has_more"] is True
    rest = client.get(f"{JOBS}/{job_id}/events", params={"after": page["data"][-1]["id"]}, headers=auth).json()
    events = page["data"] + rest["data"]
    assert len({e["id"] for e in events}) == len(events)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["data"]["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["data"] == {"step": 1, "total_steps": 10, "loss": pytest.approx(0.68)}
    assert client.get(f"{JOBS}/{job_id}/events", params={"after": "nope"}, headers=auth).status_code == 400

    checkpoints = client.get(f"{JOBS}/{job_id}/checkpoints", headers=auth).json()
    [checkpoint] = checkpoints["data"]
    assert checkpoint["step_number"] == 3 and checkpoint["metrics"] == {"loss": 0.66}
    assert checkpoint["fine_tuning_job_id"] == job_id and checkpoints["has_more"] is False

    with factory() as session:
        jobstore.finish_job(
            session, job_id, "succeeded", fine_tuned_model="models:/tiny-red/1", registered_model_version="1"
        )
        assert not jobstore.finish_job(session, job_id, "failed", {"code": "x", "message": "late"})  # already over
    job = client.get(f"{JOBS}/{job_id}", headers=auth).json()
    assert (job["status"], job["fine_tuned_model"], job["registered_model_version"]) == (
        "succeeded",
        "models:/tiny-red/1",
        "1",
    )
    assert job["estimated_finish"] is None and job["error"] is None


def test_event_stream_follows_until_the_job_ends(
    app: FastAPI, client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    factory = app.state.session_factory
    with factory() as session:
        jobstore.claim_job(session, job_id, "gpu-0")
        jobstore.record_progress(session, job_id, 1, 10, {"loss": 0.5})
        jobstore.finish_job(session, job_id, "succeeded")
    with client.stream("GET", f"{JOBS}/{job_id}/events/stream", headers=auth) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    blocks = [b for b in body.split("\n\n") if b.strip()]
    assert blocks[-1].startswith("event: done") and '"succeeded"' in blocks[-1]
    ids = [line.removeprefix("id: ") for b in blocks for line in b.splitlines() if line.startswith("id: ")]
    listed = [
        e["id"] for e in client.get(f"{JOBS}/{job_id}/events", params={"limit": 100}, headers=auth).json()["data"]
    ]
    assert ids == listed
    # Reconnecting with Last-Event-ID resumes after it.
    with client.stream("GET", f"{JOBS}/{job_id}/events/stream", headers={**auth, "Last-Event-ID": listed[-2]}) as r:
        again = "".join(r.iter_text())
    assert f"id: {listed[-1]}" in again and f"id: {listed[-2]}" not in again


def test_event_stream_delivers_events_written_while_streaming(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    import threading

    client = make_client(events_poll_seconds=0.05)
    auth = make_key("alpha")
    job_id = client.post(JOBS, json=job_body(), headers=auth).json()["id"]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        jobstore.claim_job(session, job_id, "gpu-0")

    def worker() -> None:
        with factory() as session:
            for step in range(1, 4):
                jobstore.record_progress(session, job_id, step, 3, {"loss": 1.0 / step})
            jobstore.finish_job(session, job_id, "succeeded")

    with client.stream("GET", f"{JOBS}/{job_id}/events/stream", headers=auth) as r:
        threading.Timer(0.3, worker).start()
        body = "".join(r.iter_text())
    assert body.count('"type":"metrics"') == 3
    last = body.rstrip().splitlines()[-1]
    assert json.loads(last.removeprefix("data: ")) == {"status": "succeeded"}
