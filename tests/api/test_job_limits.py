"""Limits at the API (real PostgreSQL and SQLite, real Redis): bounds on every hyperparameter, the runtime limit and
the project's GPU-time budget checked at create, and idempotent replays answered even at a cap."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

JOBS = "/v1/fine_tuning/jobs"


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 10**9), ("resolution", 4096), ("max_steps", 10**12), ("inversion_steps", 1000)],
)
def test_a_hyperparameter_past_its_bound_is_a_422_naming_it(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]], field: str, value: int
) -> None:
    body = job_body(method={"type": "inversion_dpo", "hyperparameters": {field: value}})
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "method", "hyperparameters", field]
    assert "less than or equal" in error["msg"]
    assert client.get(JOBS, headers=auth).json()["data"] == []


def test_openapi_shows_an_upper_bound_for_every_numeric_hyperparameter(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    def unbounded(name: str) -> list[str]:
        out = []
        for field, prop in schemas[name]["properties"].items():
            if "$ref" in prop:
                out += [f"{field}.{f}" for f in unbounded(prop["$ref"].rsplit("/", 1)[1])]
            elif prop.get("type") in ("integer", "number") and not {"maximum", "exclusiveMaximum"} & set(prop):
                out.append(field)
        return out

    assert "batch_size" in schemas["Hyperparameters"]["properties"]
    assert unbounded("Hyperparameters") == []


def test_max_runtime_seconds_defaults_to_the_setting_and_is_bounded(
    make_client: Callable[..., TestClient], auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(max_runtime_seconds=7200)
    job = client.post(JOBS, json=job_body(), headers=auth).json()
    assert (job["max_runtime_seconds"], job["runtime_seconds"]) == (7200, 0.0)
    assert client.post(JOBS, json=job_body(max_runtime_seconds=60), headers=auth).json()["max_runtime_seconds"] == 60
    for bad in (0, 30 * 24 * 3600 + 1):
        r = client.post(JOBS, json=job_body(max_runtime_seconds=bad), headers=auth)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_runtime_seconds"]


def test_the_projects_gpu_hours_are_checked_at_create(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    client = make_client(max_gpu_hours_per_project=10, retry_after_seconds=30)
    auth, other = make_key("alpha"), make_key("beta")
    hours = 3600
    # Alone past the limit: it could never run here, a 422 naming the field and the limit.
    r = client.post(JOBS, json=job_body(max_runtime_seconds=11 * hours), headers=auth)
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "max_runtime_seconds"]
    assert "asks for 11 GPU-hours" in error["msg"] and "limit of 10" in error["msg"]
    # nodes x gpus_per_node x max_runtime_seconds: 2 GPUs for 3 h are 6 GPU-hours.
    two_gpus = {"nodes": 1, "gpus_per_node": 2}
    first = client.post(JOBS, json=job_body(max_runtime_seconds=3 * hours, resources=two_gpus), headers=auth)
    assert first.status_code == 201, first.text
    r = client.post(JOBS, json=job_body(max_runtime_seconds=5 * hours), headers=auth)
    assert r.status_code == 429 and r.headers["Retry-After"] == "30"
    assert r.json() == {
        "detail": "GPU-hours limit of this project: its active jobs ask for 6 of 10 GPU-hours, this job for 5 more"
    }
    assert client.post(JOBS, json=job_body(max_runtime_seconds=4 * hours), headers=auth).status_code == 201
    assert client.post(JOBS, json=job_body(max_runtime_seconds=5 * hours), headers=other).status_code == 201
    client.post(f"{JOBS}/{first.json()['id']}/cancel", headers=auth)  # a finished job asks for nothing
    assert client.post(JOBS, json=job_body(max_runtime_seconds=5 * hours), headers=auth).status_code == 201


def test_a_projects_own_limits_replace_the_settings(
    make_client: Callable[..., TestClient],
    make_key: Callable,
    job_body: Callable[..., dict[str, Any]],
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.admin import main as admin_main
    from services.api.settings import get_settings

    client = make_client(max_active_jobs_per_project=10, max_gpu_hours_per_project=0)  # 0: no GPU-hours limit
    auth, other = make_key("alpha"), make_key("beta")
    assert client.post(JOBS, json=job_body(max_runtime_seconds=30 * 24 * 3600), headers=auth).status_code == 201

    def admin(*args: str) -> str:  # the admin CLI, as an operator runs it, on the API's database
        monkeypatch.setenv("INVDPO_DATABASE_URL", settings.database_url)
        get_settings.cache_clear()
        try:
            assert admin_main(["set-limits", "--project", "alpha", *args]) == 0
        finally:
            get_settings.cache_clear()
        return capsys.readouterr().out.strip()

    assert admin("--max-active-jobs", "1") == "project alpha: max active jobs 1, max GPU-hours 1344 (API)"
    r = client.post(JOBS, json=job_body(), headers=auth)
    assert r.status_code == 429 and r.json() == {"detail": "too many active jobs in this project (limit 1)"}
    assert client.post(JOBS, json=job_body(), headers=other).status_code == 201
    assert admin("--max-active-jobs", "0", "--max-gpu-hours", "2") == (
        "project alpha: max active jobs 4 (API), max GPU-hours 2"
    )
    r = client.post(JOBS, json=job_body(max_runtime_seconds=3 * 3600), headers=auth)
    assert r.status_code == 422 and "limit of 2" in r.json()["detail"][0]["msg"]


def test_idempotent_retries_at_the_active_job_cap_are_replays(
    make_client: Callable[..., TestClient], make_key: Callable, job_body: Callable[..., dict[str, Any]]
) -> None:
    """Concurrent retries of one create, with the project one job short of its cap: the first creates the job,
    which fills the cap; the others must get that job back (a replay), not a 429 for the job they themselves made."""
    client = make_client(max_active_jobs_per_project=1)
    headers = {**make_key("alpha"), "Idempotency-Key": "at-the-cap"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post(JOBS, json=job_body(seed=5), headers=headers), range(8)))
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses if r.status_code != 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 7
    # And a plain retry afterwards, at the cap, too.
    again = client.post(JOBS, json=job_body(seed=5), headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"


@pytest.fixture
def one_bad_in_four(tmp_path: Any) -> str:
    from PIL import Image

    lines = []
    for i in range(4):
        Image.new("RGB", (64, 64), (200, 10 * i, 10)).save(tmp_path / f"w{i}.png")
        Image.new("RGB", (64, 64), (10, 10 * i, 200)).save(tmp_path / f"l{i}.png")
        lines.append(f'{{"prompt": "square {i}", "chosen": "w{i}.png", "rejected": "l{i}.png"}}')
    (tmp_path / "w2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "manifest.jsonl")


def test_validation_judges_unreadable_images_by_the_jobs_max_bad_share_and_says_what_it_read(
    make_client: Callable[..., TestClient],
    auth: dict[str, str],
    job_body: Callable[..., dict[str, Any]],
    one_bad_in_four: str,
) -> None:
    client = make_client()  # INVDPO_VALIDATION_SAMPLE: 64, more than the four records
    strict = client.post(JOBS, json=job_body(training_file=one_bad_in_four), headers=auth).json()
    job = client.get(f"{JOBS}/{strict['id']}", headers=auth).json()
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_bad_images"
    assert job["error"]["param"] == "training_file" and "above max_bad_share 0.01" in job["error"]["message"]

    body = job_body(
        training_file=one_bad_in_four,
        method={"type": "inversion_dpo", "hyperparameters": {"max_steps": 10, "max_bad_share": 0.25}},
    )
    tolerant = client.post(JOBS, json=body, headers=auth).json()
    assert client.get(f"{JOBS}/{tolerant['id']}", headers=auth).json()["status"] == "queued"
    messages = [e["message"] for e in client.get(f"{JOBS}/{tolerant['id']}/events", headers=auth).json()["data"]]
    assert (
        "Files validated (training_file: 4 of 4 records read, 1 with unreadable images skipped); job queued for a "
        "GPU worker"
    ) in messages

    # INVDPO_VALIDATION_SAMPLE records are read from the start: two here, both readable.
    sampled = make_client(validation_sample=2).post(JOBS, json=job_body(training_file=one_bad_in_four), headers=auth)
    messages = [e["message"] for e in client.get(f"{JOBS}/{sampled.json()['id']}/events", headers=auth).json()["data"]]
    assert "Files validated (training_file: 2 of 4 records read); job queued for a GPU worker" in messages
