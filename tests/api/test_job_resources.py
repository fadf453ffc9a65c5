"""`resources: {nodes, gpus_per_node}` on a job: bounded by the schema and by the deployment's max_nodes_per_job,
stored on the row and shown back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

JOBS = "/v1/fine_tuning/jobs"


def test_a_job_without_resources_is_one_node(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    job = client.post(JOBS, json=job_body(), headers=auth).json()
    assert job["resources"] is None


def test_nodes_above_the_deployment_limit_are_a_422_naming_the_field(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    job_body: Callable[..., dict[str, Any]],
) -> None:
    client = make_client(max_nodes_per_job=4)
    auth = make_key("team-a")
    r = client.post(JOBS, json=job_body(resources={"nodes": 5, "gpus_per_node": 8}), headers=auth)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "resources", "nodes"] and "at most 4" in error["msg"]

    # 32 GPUs for the default week would be 5376 GPU-hours, above the default project limit (test_job_limits.py).
    body = job_body(resources={"nodes": 4, "gpus_per_node": 8}, max_runtime_seconds=24 * 3600)
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 201, r.text
    job = client.get(f"{JOBS}/{r.json()['id']}", headers=auth).json()
    assert job["resources"] == {"nodes": 4, "gpus_per_node": 8}


def test_multi_node_is_off_by_default(
    client: TestClient, auth: dict[str, str], job_body: Callable[..., dict[str, Any]]
) -> None:
    r = client.post(JOBS, json=job_body(resources={"nodes": 2}), headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "resources", "nodes"]


def test_resource_bounds_are_422(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    job_body: Callable[..., dict[str, Any]],
) -> None:
    client = make_client(max_nodes_per_job=64)
    auth = make_key("team-b")
    for resources, field in [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 65}, "nodes"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"gpus_per_node": 17}, "gpus_per_node"),
        ({"nodes": 2, "cpus": 4}, "cpus"),
    ]:
        r = client.post(JOBS, json=job_body(resources=resources), headers=auth)
        assert r.status_code == 422, (resources, r.text)
        assert r.json()["detail"][0]["loc"][:3] == ["body", "resources", field], r.text


def test_a_disk_inversion_cache_is_refused_on_several_nodes(
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    job_body: Callable[..., dict[str, Any]],
) -> None:
    client = make_client(max_nodes_per_job=4)
    auth = make_key("team-c")
    body = job_body(resources={"nodes": 2})
    body["method"]["hyperparameters"]["inversion_cache"] = "disk"
    r = client.post(JOBS, json=body, headers=auth)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "method", "hyperparameters", "inversion_cache"]
    body["resources"] = {"nodes": 1}
    assert client.post(JOBS, json=body, headers=auth).status_code == 201
