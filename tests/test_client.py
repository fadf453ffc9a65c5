"""The `invdpo jobs` / `invdpo models` client against the real API app under uvicorn on loopback (SQLite, the
shared Redis on 127.0.0.1:6379 as broker, in a database number of its own). No worker runs: where a test needs
a job to progress, it moves the job with the jobstore functions a worker calls."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from PIL import Image

from services.admin import create_api_key
from services.api.main import create_app
from services.api.settings import Settings
from services.cli import main
from services.jobs import jobstore
from services.jobs.models import SCOPES, Job

REDIS_URL = "redis://127.0.0.1:6379/13"  # the shared server; DB 13 is this module's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A model directory the API accepts (its check reads only model_index.json; nothing trains here) and a
    one-pair JSONL dataset of two real PNGs."""
    root = tmp_path_factory.mktemp("client-files")
    (root / "model").mkdir()
    (root / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    Image.new("RGB", (64, 64), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 220)).save(root / "blue.png")
    (root / "manifest.jsonl").write_text('{"prompt": "a red square", "chosen": "red.png", "rejected": "blue.png"}\n')
    return {"model": str(root / "model"), "training_file": str(root / "manifest.jsonl")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_sqlite: Callable[[Path], str]) -> Iterator[dict[str, Any]]:
    """The API app under uvicorn in a thread; yields its URL, a key of project `alpha` and its session factory."""
    db = tmp_path_factory.mktemp("client-db")
    settings = Settings(
        database_url=f"sqlite:///{db / 'invdpo.db'}",
        mlflow_tracking_uri=mlflow_sqlite(db),
        broker_url=REDIS_URL,
        reconcile_interval_seconds=0,  # no re-sends behind the tests' backs
        events_poll_seconds=0.05,
        max_active_jobs_per_project=100,
        log_level="WARNING",
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # set once the lifespan (migrations) has run and the socket listens
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    with app.state.session_factory() as session:
        key, _ = create_api_key(session, "alpha", scopes=SCOPES)
    yield {
        "url": f"http://127.0.0.1:{port}",
        "key": key,
        "sessions": app.state.session_factory,
        "mlflow": settings.mlflow_tracking_uri,
    }
    server.should_exit = True
    thread.join(10)
    broker = redis.Redis.from_url(REDIS_URL)
    broker.delete("gpu", *broker.keys("_kombu.binding*"))  # only what this module's messages created
    broker.close()


@pytest.fixture
def api(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("INVDPO_API_URL", server["url"])
    monkeypatch.setenv("INVDPO_API_KEY", server["key"])
    return server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def create(api: dict[str, Any], files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Callable[..., dict]:
    """create(*extra_args) -> the job made by `invdpo jobs create ... --json`."""

    def make(*extra: str) -> dict[str, Any]:
        argv = ["jobs", "create", "--model", files["model"], "--training-file", files["training_file"]]
        code, out, err = run(capsys, *argv, "--set", "max_steps=4", *extra, "--json")
        assert code == 0, err
        return json.loads(out)

    return make


def wait_for_status(api: dict[str, Any], job_id: str, status: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        with api["sessions"]() as session:
            job = jobstore.get_job(session, job_id)
            assert job is not None
            if job.status == status:
                return
            assert job.status == "validating_files", f"job went to {job.status}: {job.error_message}"
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.05)


def act_as_worker(api: dict[str, Any], job_id: str, outcome: str, *, pause: float = 0.0) -> None:
    """What a worker does to a job: claim it, report steps with metrics and a checkpoint, finish it."""
    wait_for_status(api, job_id, "queued")
    sessions = api["sessions"]
    with sessions() as session:
        assert jobstore.claim_job(session, job_id, "test-worker")
    for step in range(1, 5):
        time.sleep(pause)
        with sessions() as session:
            metrics = {"loss": 0.69 - 0.1 * step, "implicit_acc": 0.25 * step}
            jobstore.record_progress(session, job_id, step, 4, metrics, worker_id="test-worker")
    with sessions() as session:
        jobstore.add_checkpoint(session, job_id, 4, f"file:///tmp/{job_id}/checkpoint-4", {"loss": 0.29})
        if outcome == "succeeded":
            metrics = {"eval/implicit_acc": 0.75, "eval/implicit_acc_lower": 0.5, "eval/implicit_acc_upper": 1.0}
            metrics |= {"eval/win_rate/toy": 1.0, "eval/win_rate_lower/toy": 1.0, "eval/win_rate_upper/toy": 1.0}
            metrics |= {"eval/implicit_acc_n": 16, "eval/win_rate_n/toy": 2}
            jobstore.set_evaluation(session, job_id, {"metrics": metrics, "not_run": {}, "grid": None})
            jobstore.finish_job(session, job_id, "succeeded", fine_tuned_model="models:/toy/1")
        elif outcome == "failed":
            error: jobstore.JobErrorInfo = {"code": "out_of_memory", "message": "CUDA out of memory", "param": None}
            jobstore.finish_job(session, job_id, "failed", error)
        else:
            jobstore.cancel_job(session, job_id)  # running -> cancel_requested; the worker then stops
            jobstore.finish_job(session, job_id, "cancelled")


def test_create_sends_every_option(create: Callable[..., dict], api: dict[str, Any]) -> None:
    job = create(
        "--method", "diffusion_dpo", "--set", "beta=2000", "--set", "adapter.type=lora", "--set",
        "validation_prompts=[a red circle, a blue square]", "--seed", "7", "--suffix", "v1",
        "--registered-model-name", "toy-model", "--metadata", "team=vision", "--metadata", "ticket=A-1=2",
        "--max-runtime-seconds", "3600",
    )  # fmt: skip
    assert job["id"].startswith("ftjob-") and job["status"] == "validating_files"
    hyperparameters = job["method"]["hyperparameters"]
    assert job["method"]["type"] == "diffusion_dpo"
    assert hyperparameters["beta"] == 2000
    assert hyperparameters["max_steps"] == 4
    assert hyperparameters["adapter"]["type"] == "lora"
    assert hyperparameters["validation_prompts"] == ["a red circle", "a blue square"]  # YAML-parsed values
    assert (job["seed"], job["suffix"], job["registered_model_name"]) == (7, "v1", "toy-model")
    assert job["metadata"] == {"team": "vision", "ticket": "A-1=2"}
    assert job["max_runtime_seconds"] == 3600


def test_idempotency_key_returns_the_same_job(
    create: Callable[..., dict], files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    first = create("--idempotency-key", "retry-1")
    assert create("--idempotency-key", "retry-1")["id"] == first["id"]
    argv = ["jobs", "create", "--model", files["model"], "--training-file", files["training_file"]]
    code, out, _ = run(capsys, *argv, "--set", "max_steps=4", "--idempotency-key", "retry-1")
    assert code == 0 and out.startswith(f"replayed {first['id']} (")  # not "created": no new job was made


def test_list_and_get(create: Callable[..., dict], api: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    job = create()
    wait_for_status(api, job["id"], "queued")
    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert code == 0
    page = json.loads(out)
    assert page["object"] == "list" and job["id"] in [j["id"] for j in page["data"]]

    code, out, _ = run(capsys, "jobs", "list", "--status", "queued")
    assert code == 0 and job["id"] in out and "queued" in out

    code, out, err = run(capsys, "jobs", "list", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 2  # header and one job
    assert "invdpo jobs list --limit 1 --after ftjob-" in err  # more jobs exist: how to get them
    create()
    wait_for_status(api, job["id"], "queued")
    code, out, err = run(capsys, "jobs", "list", "--status", "queued", "--limit", "1")
    assert code == 0 and "invdpo jobs list --status queued --limit 1 --after ftjob-" in err  # the filter is kept

    code, out, _ = run(capsys, "jobs", "get", job["id"], "--json")
    assert code == 0 and json.loads(out)["status"] == "queued"
    code, out, _ = run(capsys, "jobs", "get", job["id"])
    assert code == 0 and f"id:               {job['id']}" in out and "status:           queued" in out


def test_cancel(create: Callable[..., dict], capsys: pytest.CaptureFixture[str]) -> None:
    job = create()
    code, out, _ = run(capsys, "jobs", "cancel", job["id"])
    assert (code, out) == (0, f"{job['id']} cancelled\n")
    code, out, _ = run(capsys, "jobs", "cancel", job["id"], "--json")  # cancelling again is a no-op
    assert code == 0 and json.loads(out)["status"] == "cancelled"


def test_pause_and_resume(
    create: Callable[..., dict], api: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job = create()
    wait_for_status(api, job["id"], "queued")
    code, out, _ = run(capsys, "jobs", "pause", job["id"])
    assert (code, out) == (0, f"{job['id']} paused\n")
    code, out, _ = run(capsys, "jobs", "resume", job["id"])
    assert (code, out) == (0, f"{job['id']} queued\n")
    code, _, err = run(capsys, "jobs", "resume", job["id"])
    assert code == 2 and err.strip() == "error: 409 only a paused job can be resumed; this one is queued"


def test_events_and_checkpoints(
    create: Callable[..., dict], api: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    job = create()
    act_as_worker(api, job["id"], "succeeded")

    code, out, _ = run(capsys, "jobs", "events", job["id"])
    assert code == 0
    assert "Validating training file" in out.splitlines()[0]
    assert "Step 4/4: loss=0.29, implicit_acc=1" in out and "The job has successfully completed" in out
    code, out, _ = run(capsys, "jobs", "events", job["id"], "--json", "--limit", "2")
    page = json.loads(out)
    assert len(page["data"]) == 2 and page["has_more"]
    code, out, _ = run(capsys, "jobs", "events", job["id"], "--after", page["data"][-1]["id"], "--json")
    assert [e["id"] for e in json.loads(out)["data"]][0] > page["data"][-1]["id"]

    code, out, _ = run(capsys, "jobs", "get", job["id"])
    assert "fine_tuned_model: models:/toy/1\n" in out
    assert "evaluation:       implicit_acc 0.75 [0.5, 1] n=16, win_rate/toy 1 [1, 1] n=2\n" in out

    code, out, _ = run(capsys, "jobs", "checkpoints", job["id"])
    assert (code, out) == (0, f"step       4  file:///tmp/{job['id']}/checkpoint-4  loss=0.29\n")
    code, out, _ = run(capsys, "jobs", "checkpoints", job["id"], "--json")
    assert json.loads(out)["data"][0]["step_number"] == 4


@pytest.mark.parametrize(("outcome", "exit_code"), [("succeeded", 0), ("failed", 1), ("cancelled", 3)])
def test_events_follow_ends_with_the_job(
    create: Callable[..., dict],
    api: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    outcome: str,
    exit_code: int,
) -> None:
    job = create()
    # Steps 1 s apart: the job is still running when --follow connects, so the live bar is what is shown (a job
    # already finished is replayed as history, without a bar: checked below).
    worker = threading.Thread(target=act_as_worker, args=(api, job["id"], outcome), kwargs={"pause": 1.0})
    worker.start()
    code, out, err = run(capsys, "jobs", "events", job["id"], "--follow")
    worker.join()
    assert code == exit_code
    assert "Training started (attempt 1)" in out and "test-worker" not in out  # the worker's id is for the logs
    assert out.splitlines()[-1].startswith(f"{job['id']} {outcome}")
    assert "4/4" in err and "implicit_acc=1" in err  # the progress bar (tqdm writes to stderr)
    if outcome == "failed":
        assert out.splitlines()[-1] == f"{job['id']} failed: out_of_memory: CUDA out of memory"
    # Following the finished job again replays its messages without a progress bar (no rate, no "running").
    code, out, err = run(capsys, "jobs", "events", job["id"], "--follow")
    assert code == exit_code and "Training started (attempt 1)" in out
    assert out.splitlines()[-1].startswith(f"{job['id']} {outcome}")
    assert "step/s" not in err and "running" not in err


def test_create_follow_json_lines(
    create: Callable[..., dict], api: dict[str, Any], capsys: pytest.CaptureFixture[str], files: dict[str, str]
) -> None:
    def worker() -> None:  # the job id is known only once `create` has answered: find it in the database
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with api["sessions"]() as session:
                job = session.query(Job).filter(Job.metadata_.is_not(None)).order_by(Job.created_at.desc()).first()
                if job is not None and job.metadata_ == {"case": "follow-json"}:
                    return act_as_worker(api, job.id, "succeeded")
            time.sleep(0.05)

    thread = threading.Thread(target=worker)
    thread.start()
    argv = ["jobs", "create", "--model", files["model"], "--training-file", files["training_file"]]
    code, out, _ = run(capsys, *argv, "--metadata", "case=follow-json", "--follow", "--json")
    thread.join()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert lines[0]["object"] == "fine_tuning.job" and lines[0]["status"] == "validating_files"
    events = lines[1:-1]
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3, 4]
    assert lines[-1]["status"] == "succeeded" and lines[-1]["fine_tuned_model"] == "models:/toy/1"


def test_missing_key_is_one_line(
    api: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INVDPO_API_KEY")
    code, out, err = run(capsys, "jobs", "list")
    assert (code, out) == (2, "")
    hint = "(no API key: set INVDPO_API_KEY, e.g. from `invdpo-admin create-key`)"
    assert err == f"error: 401 missing or invalid API key {hint}\n"


def test_unknown_job_is_a_404(api: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "jobs", "get", "ftjob-000000000000000000000000")
    assert (code, err) == (2, "error: 404 job not found\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "beta=-1"], "error: 422 method.hyperparameters.beta: Input should be greater than 0\n"),
        (["--set", "adapter.rank=0"], "error: 422 method.hyperparameters.adapter.rank: Input should be greater"),
        (["--suffix", "has space"], "error: 422 suffix: String should match pattern"),
    ],
)
def test_validation_error_names_the_field(
    api: dict[str, Any], files: dict[str, str], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["jobs", "create", "--model", files["model"], "--training-file", files["training_file"], *args]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_bad_override_is_one_line(api: dict[str, Any], files: dict[str, str], capsys) -> None:
    argv = ["jobs", "create", "--model", files["model"], "--training-file", files["training_file"]]
    code, _, err = run(capsys, *argv, "--metadata", "no-equals-sign")
    assert (code, err) == (2, "error: --metadata 'no-equals-sign': expected key=value\n")


def test_unreachable_api_is_one_line_without_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("INVDPO_API_URL", url)
    monkeypatch.setenv("INVDPO_API_KEY", "invdpo-0123abcd-secretsecretsecret")
    code, out, err = run(capsys, "jobs", "get", "ftjob-000000000000000000000000")
    assert code == 2 and out == ""
    assert err.startswith(f"error: cannot reach the API at {url}: ") and err.count("\n") == 1
    assert "secret" not in err


def test_promote(
    create: Callable[..., dict], api: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    job = create()
    registry = MlflowClient(tracking_uri=api["mlflow"])
    registry.create_registered_model("toy-model")
    # What the worker registers: a version tagged with the job that made it.
    registry.create_model_version("toy-model", source=str(tmp_path), tags={"job_id": job["id"]})
    with api["sessions"]() as session:  # and records (no verdict: the API judges the job's evaluation)
        project = jobstore.get_job(session, job["id"]).project_id
        assert jobstore.claim_model_name(session, "toy-model", project)
        jobstore.record_model_version(
            session, "toy-model", 1, job_id=job["id"], project_id=project, gate_passed=None, gate_reasons=[]
        )
    capsys.readouterr()  # MLflow's own log lines while it made its tables
    # The job has no evaluation, so the promotion gate has no evidence and refuses; --force overrides it.
    code, out, err = run(capsys, "models", "promote", "toy-model", "1")
    assert (code, out) == (2, "")
    assert err.startswith("error: 409 promotion gate failed: eval/implicit_acc_lower missing") and err.count("\n") == 1
    code, out, _ = run(capsys, "models", "promote", "toy-model", "1", "--force", "--reason", "demo")
    assert (code, out) == (0, f"models:/toy-model@champion -> version 1 (job {job['id']})\n")
    assert str(registry.get_model_version_by_alias("toy-model", "champion").version) == "1"
    assert registry.get_model_version("toy-model", "1").tags["promotion_forced_by"].startswith("key invdpo-")

    code, _, err = run(capsys, "models", "promote", "toy-model", "2", "--force", "--reason", "demo")
    assert (code, err) == (2, "error: 404 model version not found\n")
