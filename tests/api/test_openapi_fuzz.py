"""Schemathesis against the app's own OpenAPI schema: no 5xx, and every answer matches the schema.

Each operation gets bounded examples (positive and negative). `schemathesis.pytest.from_fixture` does not run
under pytest 9, so the test draws cases from each operation's Hypothesis strategy itself.

Every default check runs except positive_data_acceptance: the schema cannot say everything the API validates
(hyperparameters are checked against the training config, cursors must name an existing job, text must be storable
in PostgreSQL: no NUL, no lone surrogates), so some schema-valid requests get a 400 or 422 by design.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.api.main import app as default_app

JOBS = "/v1/fine_tuning/jobs"
# The SSE stream stays open until its job ends; test_jobs.py covers it.
OPERATIONS = [
    (method.upper(), path)
    for path, operations in default_app.openapi()["paths"].items()
    if not path.endswith("/events/stream")
    for method in operations
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_operation_conforms_to_the_schema(
    method: str,
    path: str,
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    job_body: Callable[..., dict[str, Any]],
    tmp_path: Path,
    mlflow_sqlite: Callable[[Path], str],
) -> None:
    # A registry of our own for the promote route (an empty MLflow: every version is unknown).
    client = make_client(mlflow_tracking_uri=mlflow_sqlite(tmp_path))
    app: FastAPI = client.app  # type: ignore[assignment]
    auth = make_key("alpha")
    # Real jobs, so that some generated requests reach existing rows.
    for _ in range(2):
        client.post(JOBS, json=job_body(), headers=auth)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

    check()


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


BODY_OPERATIONS = [
    (method.upper(), path)
    for path, operations in default_app.openapi()["paths"].items()
    for method, operation in operations.items()
    if "requestBody" in operation
]


@pytest.mark.parametrize(("method", "path"), BODY_OPERATIONS)
def test_deeply_nested_bodies_are_refused_without_a_5xx(
    method: str,
    path: str,
    make_client: Callable[..., TestClient],
    make_key: Callable[[str], dict[str, str]],
    tmp_path: Path,
    mlflow_sqlite: Callable[[Path], str],
) -> None:
    """Bodies nested 400 and 900 deep (Python's parser and pydantic recurse: ~1000 levels ended in a 500), whole or
    under each top-level field, through schemathesis' checks: a 400 naming the reason, never a 5xx."""
    client = make_client(mlflow_tracking_uri=mlflow_sqlite(tmp_path))
    app: FastAPI = client.app  # type: ignore[assignment]
    auth = make_key("alpha")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = schema[path][method]
    fields = list(app.openapi()["components"]["schemas"][_body_schema(app, method, path)]["properties"])
    assert fields
    path_parameters = {"job_id": "ftjob-" + "a" * 24, "name": "tiny"}
    for depth in (400, 900):
        for body in [_nested(depth)] + [{field: _nested(depth)} for field in fields]:
            case = operation.Case(
                body=body,
                media_type="application/json",
                path_parameters={k: v for k, v in path_parameters.items() if "{" + k + "}" in path},
            )
            response = case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])
            assert response.status_code == 400, (depth, response.text)
            assert response.json() == {"detail": "request body nests deeper than 32 levels"}


def _body_schema(app: FastAPI, method: str, path: str) -> str:
    ref = app.openapi()["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return str(ref.rsplit("/", 1)[1])
