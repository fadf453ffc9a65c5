"""The model server in-process (SQLite job database, SQLite MLflow registry, the follower polling for real): the
OpenAI SDK against it, its 400s, keys and projects, batching, the bounded queue, and a refused promotion."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from PIL import Image
from registry_fixtures import FAILING, PASSING, Registry, Tenant, wait_until

from services.jobs import jobstore
from services.serving.app import create_app
from services.serving.settings import Settings

POLL = 0.3


def served_version(http: TestClient, name: str) -> int | None:
    return http.get("/healthz").json()["models"][name]["version"]


@pytest.fixture(scope="module")
def alpha(registry: Registry) -> Tenant:
    return registry.tenant("alpha")


@pytest.fixture(scope="module")
def cats(registry: Registry, alpha: Tenant) -> int:
    """Model `cats` of project alpha: v1 passed the gate and is champion."""
    v1 = registry.version("cats", alpha.project_id, PASSING)
    MlflowClient(registry.tracking_uri).set_registered_model_alias("cats", "champion", str(v1))
    return v1


@contextmanager
def running(registry: Registry, cache: Path, **overrides: Any) -> Iterator[TestClient]:
    """The server app with its follower and batchers running, once every model it serves has loaded."""
    settings = Settings(
        **{"models": "cats", "poll_seconds": POLL, "device": "cpu", **overrides},
        database_url=registry.database_url, mlflow_tracking_uri=registry.tracking_uri, cache_dir=str(cache),
    )  # fmt: skip
    with TestClient(create_app(settings)) as http:
        wait_until(lambda: http.get("/readyz").status_code == 200, 180, "the models to load")
        yield http


@pytest.fixture(scope="module")
def http(registry: Registry, cats: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A server on `cats` with the default settings, shared by the tests that change nothing."""
    with running(registry, tmp_path_factory.mktemp("cache")) as client:
        yield client


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixel_gap(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images, on the 0-255 scale."""
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def test_the_openai_sdk_generates_images(http: TestClient, alpha: Tenant, cats: int) -> None:
    client = openai.OpenAI(api_key=alpha.key, base_url="http://testserver/v1", http_client=http, max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="cats", prompt="a red apple", n=2, size="64x64", response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"seed": 3, "steps": 2},
    )  # fmt: skip
    assert raw.headers["x-model-version"] == str(cats)
    result = raw.parse()
    assert result.created > 0 and result.data is not None and len(result.data) == 2
    first, second = (png(image.b64_json or "") for image in result.data)
    assert first.size == second.size == (64, 64)
    assert pixel_gap(first, second) > 5  # seeds 3 and 4
    again = client.images.generate(
        model="cats", prompt="a red apple", size="64x64", response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"seed": 3, "steps": 2},
    )  # fmt: skip
    # Seed 3 alone: the image of seed 3 in the batch of two, up to the batch's float rounding.
    assert again.data is not None and pixel_gap(png(again.data[0].b64_json or ""), first) < 1

    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="cats", prompt="a red apple", size="1024x1024")
    assert refused.value.param == "size" and "64x64" in refused.value.message


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"n": 5}, "n", "n: at most 4 images per request"),
        ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
        ({"size": "512x512"}, "size", "size: '512x512' is not supported; this model generates 64x64"),
        ({"prompt": "x" * 1001}, "prompt", "prompt: longer than 1000 characters"),
        ({"prompt": ""}, "prompt", "prompt: String should have at least 1 character"),
        ({"model": "dogs"}, "model", "model: 'dogs' is not served here"),
        ({"response_format": "url"}, "response_format", "response_format: Input should be 'b64_json'"),
        ({"steps": 101}, "steps", "steps: at most 100"),
        ({"seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    http: TestClient, alpha: Tenant, change: dict[str, Any], param: str, message: str
) -> None:
    body = {"model": "cats", "prompt": "a cat", "steps": 1, **change}
    answer = http.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {alpha.key}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["message"], error["type"]) == (param, message, "invalid_request_error")


def test_a_key_generates_only_with_its_projects_models(http: TestClient, alpha: Tenant, registry: Registry) -> None:
    beta = registry.tenant("beta")
    body = {"model": "cats", "prompt": "a cat", "steps": 1}
    url = "/v1/images/generations"
    assert http.post(url, json=body).json()["error"]["code"] == "invalid_api_key"
    assert http.post(url, json=body, headers={"Authorization": "Bearer invdpo-0000-nope"}).status_code == 401
    answer = http.post(url, json=body, headers={"Authorization": f"Bearer {beta.key}"})
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "model", answer.text
    assert http.post(url, json=body, headers={"Authorization": f"Bearer {alpha.key}"}).status_code == 200


def _concurrently(http: TestClient, key: str, count: int, **body: Any) -> list[Any]:
    answers: list[Any] = [None] * count

    def send(i: int) -> None:
        answers[i] = http.post(
            "/v1/images/generations", json={"model": "cats", "prompt": f"a cat {i}", "steps": 1, **body},
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def _metric(http: TestClient, line_start: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start}")


def test_concurrent_requests_share_pipeline_calls(registry: Registry, alpha: Tenant, cats: int, tmp_path) -> None:
    # 4 requests of 2 images fill a batch of 8: the call starts once all have arrived (the wait only bounds it).
    with running(registry, tmp_path, max_wait_ms=10000, max_batch_size=8) as http:
        answers = _concurrently(http, alpha.key, 4, n=2)
        assert [a.status_code for a in answers] == [200] * 4
        assert all(len(a.json()["data"]) == 2 for a in answers)
        calls = _metric(http, 'invdpo_serving_batch_images_count{model="cats"}')
        images = _metric(http, 'invdpo_serving_batch_images_sum{model="cats"}')
    assert images == 8 and calls <= 2, (calls, images)  # without batching: 4 calls


def test_a_full_queue_answers_429_with_retry_after(registry: Registry, alpha: Tenant, cats: int, tmp_path) -> None:
    # The first request waits up to 10 s for company; meanwhile the queue (1) is full.
    settings = {"max_wait_ms": 10000, "max_batch_size": 2, "max_queue": 1, "max_images_per_request": 1}
    with running(registry, tmp_path, **settings) as http:
        first = threading.Thread(target=_concurrently, args=(http, alpha.key, 1))
        first.start()
        wait_until(lambda: _metric(http, 'invdpo_serving_queue_depth{model="cats"}') == 1, 30, "a waiting request")
        answer = http.post(
            "/v1/images/generations", json={"model": "cats", "prompt": "a dog", "steps": 1},
            headers={"Authorization": f"Bearer {alpha.key}"},
        )  # fmt: skip
        first.join()
    assert answer.status_code == 429 and answer.headers["retry-after"] == "2", answer.text
    assert answer.json()["error"]["code"] == "queue_full"


def test_a_gate_refused_champion_keeps_the_previous_version_serving(
    registry: Registry, alpha: Tenant, tmp_path
) -> None:
    mlflow = MlflowClient(registry.tracking_uri)
    v1 = registry.version("dogs", alpha.project_id, PASSING)
    mlflow.set_registered_model_alias("dogs", "champion", str(v1))
    with running(registry, tmp_path, models="dogs") as http:
        refused = registry.version("dogs", alpha.project_id, FAILING)
        mlflow.set_registered_model_alias("dogs", "champion", str(refused))
        health = wait_until(lambda: http.get("/healthz").json()["models"]["dogs"].get("not_served"), 60, "a refusal")
        assert health == {"version": refused, "reason": "promotion gate failed: eval/implicit_acc_lower 0.45 <= 0.5"}
        time.sleep(2 * POLL)
        assert served_version(http, "dogs") == v1
        assert _metric(http, 'invdpo_serving_model_version{model="dogs"}') == v1
        assert _metric(http, 'invdpo_serving_alias_version_held_back{model="dogs"}') == refused

        # MLflow's tags are not evidence: anyone with write access to the registry can set the one the promote
        # route writes. The version stays held back.
        mlflow.set_model_version_tag("dogs", str(refused), "promotion_forced_by", "project 1, key invdpo-1234")
        time.sleep(2 * POLL)
        assert served_version(http, "dogs") == v1

        # Forced through the API: the promote route records who forced it in the job database; then it serves.
        with registry.sessions() as session:
            row = jobstore.version_verdict(session, "dogs", refused)
            assert row is not None
            jobstore.record_promotion(session, row, forced_by="project 1, key invdpo-1234", reason="a human looked")
        wait_until(lambda: served_version(http, "dogs") == refused, 120, "the forced version")
        assert "not_served" not in http.get("/healthz").json()["models"]["dogs"]


def test_a_version_loads_in_a_process_whose_mlflow_globals_point_elsewhere(
    registry: Registry, alpha: Tenant, cats: int, tmp_path: Path, mlflow_sqlite: Callable[[Path], str]
) -> None:
    """The model server's process has no MLFLOW_TRACKING_URI (make stack, a plain container): its settings' URI must
    be the one a models:/ URI is resolved through, not MLflow's global default (./mlruns)."""
    import mlflow

    from services.serving.models import load_version

    previous = mlflow.get_tracking_uri()
    elsewhere = mlflow_sqlite(tmp_path)  # what the process's globals say: an empty store
    # No registry URI of its own: MLflow's registry follows the global tracking URI. (Not set_registry_uri: it also
    # exports MLFLOW_REGISTRY_URI, which outlives the test and redirects every later test's registry.)
    mlflow.set_tracking_uri(elsewhere)
    try:
        settings = Settings(
            models="cats", device="cpu", database_url=registry.database_url,
            mlflow_tracking_uri=registry.tracking_uri, cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        with registry.sessions() as session:
            served = load_version("cats", cats, session, settings)
        assert (served.name, served.version, served.project_id) == ("cats", cats, alpha.project_id)
    finally:
        mlflow.set_tracking_uri(previous)
