"""Limits at the API (real PostgreSQL and SQLite, real Redis): bounds on every hyperparameter, the runtime limit and
the project's GPU-time budget checked at create, and idempotent replays answered even at a cap."""

from __future__ import annotations

from collections.abc import Callable
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
