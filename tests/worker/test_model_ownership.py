"""Models belong to projects, on the real stack (PostgreSQL, Redis, the MLflow server, the API in-process).

The attacks of issue 13: project A names B's model in a job, promotes B's version with force, rewrites the MLflow
`job_id` tag the API used to trust; a key without models:force forces a refused version; a champion moved with
the MLflow client to a version the gate refused. B's versions and aliases must come out untouched, the forced
promotion recorded in the database with who and why, the moved champion reported.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import select

from services.admin import create_api_key
from services.jobs import champions, jobstore
from services.jobs.models import DEFAULT_SCOPES, SCOPES, Job, JobEvent, ModelVersion, Project

JOBS = "/v1/fine_tuning/jobs"


def _project(api: TestClient, scopes: tuple[str, ...] = DEFAULT_SCOPES) -> tuple[dict[str, str], int, str]:
    """A new project and a key: (auth header, project id, key prefix)."""
    name = f"own-{uuid.uuid4().hex[:8]}"
    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, prefix = create_api_key(session, name, scopes=scopes)
        project_id = session.scalars(select(Project.id).where(Project.name == name)).one()
    return {"Authorization": f"Bearer {key}"}, project_id, prefix


def _registered(api: TestClient, mlflow_server: str, project_id: int, gate: list[bool]) -> tuple[str, list[str]]:
    """A model of the project with one version per gate verdict, as the worker leaves it: registered in MLflow
    (tag job_id, alias candidate on the last), the name claimed and each version's verdict recorded."""
    client = MlflowClient(tracking_uri=mlflow_server)
    name = f"model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    factory = api.app.state.session_factory  # type: ignore[attr-defined]
    job_ids = []
    for passed in gate:
        with factory() as session:
            job_id = jobstore.new_job_id()
            session.add(
                Job(id=job_id, project_id=project_id, status="succeeded", model="org/model", training_file="s3://b/d",
                    method_type="diffusion_dpo", config={}, seed=0, attempt=0, registered_model_name=name)
            )  # fmt: skip
            session.commit()
            assert jobstore.claim_model_name(session, name, project_id)
            version = client.create_model_version(name, "s3://b/m", tags={"job_id": job_id}).version
            jobstore.record_model_version(
                session, name, int(version), job_id=job_id, project_id=project_id, gate_passed=passed,
                gate_reasons=[] if passed else ["eval/implicit_acc_lower 0.45 <= 0.5"],
            )  # fmt: skip
        client.set_registered_model_alias(name, "candidate", version)
        job_ids.append(job_id)
    return name, job_ids


def test_another_projects_model_cannot_be_registered_into_read_or_promoted(
    api: TestClient, mlflow_server: str
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    auth_b, project_b, _ = _project(api)
    name, [job_b] = _registered(api, mlflow_server, project_b, [True])
    assert api.post(f"/v1/models/{name}/promote", json={"version": 1}, headers=auth_b).status_code == 200
    before = client.get_registered_model(name)
    assert before.aliases == {"candidate": "1", "champion": "1"}

    auth_a, project_a, _ = _project(api, SCOPES)  # every scope, models:force included
    # Refused when created, before any file is looked at.
    body = {"model": "s3://a/model", "training_file": "s3://a/data/manifest.jsonl", "registered_model_name": name,
            "method": {"type": "inversion_dpo"}}  # fmt: skip
    answer = api.post(JOBS, json=body, headers=auth_a)
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "registered_model_name"]
    assert error["msg"] == f"registered_model_name: registered model {name} belongs to another project"
    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert session.scalars(select(Job).where(Job.project_id == project_a)).all() == []

    # The tag the API used to trust for ownership, rewritten by anyone who reaches MLflow: it changes nothing.
    job_a = jobstore.new_job_id()
    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        session.add(Job(id=job_a, project_id=project_a, status="succeeded", model="m", training_file="s3://b/d",
                        method_type="diffusion_dpo", config={}, seed=0, attempt=0))  # fmt: skip
        session.commit()
    client.set_model_version_tag(name, "1", "job_id", job_a)
    force = {"version": 1, "force": True, "reason": "takeover"}
    for request in ({"version": 1}, force):
        answer = api.post(f"/v1/models/{name}/promote", json=request, headers=auth_a)
        assert answer.status_code == 404 and answer.json()["detail"] == "model not found", answer.text
    assert api.get(f"/v1/models/{name}", headers=auth_a).status_code == 404
    assert name not in {m["name"] for m in api.get("/v1/models", headers=auth_a).json()["data"]}

    after = client.get_registered_model(name)
    assert after.aliases == before.aliases
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    mine = api.get(f"/v1/models/{name}", headers=auth_b).json()
    assert [(v["version"], v["job_id"], v["forced_by"]) for v in mine["versions"]] == [(1, job_b, None)]
    assert name in {m["name"] for m in api.get("/v1/models", headers=auth_b).json()["data"]}


def test_forcing_needs_the_scope_and_a_reason_and_is_recorded_in_the_database(
    api: TestClient, mlflow_server: str
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    auth, project_id, _ = _project(api)  # the default scopes: no models:force
    name, [job_id] = _registered(api, mlflow_server, project_id, [False])
    url = f"/v1/models/{name}/promote"

    answer = api.post(url, json={"version": 1}, headers=auth)
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"] == "promotion gate failed: eval/implicit_acc_lower 0.45 <= 0.5"
    answer = api.post(url, json={"version": 1, "force": True, "reason": "hotfix"}, headers=auth)
    assert answer.status_code == 403 and answer.json()["detail"] == "this API key lacks the scope models:force"
    assert "champion" not in client.get_registered_model(name).aliases

    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        key, prefix = create_api_key(session, session.get(Project, project_id).name, "release-bot", SCOPES)
    forcer = {"Authorization": f"Bearer {key}"}
    answer = api.post(url, json={"version": 1, "force": True}, headers=forcer)
    assert answer.status_code == 422 and "reason: required when force is true" in answer.text
    answer = api.post(url, json={"version": 1, "force": True, "reason": "hotfix for incident 42"}, headers=forcer)
    assert answer.status_code == 200, answer.text
    assert client.get_registered_model(name).aliases["champion"] == "1"
    with api.app.state.session_factory() as session:  # type: ignore[attr-defined]
        row = session.get(ModelVersion, (name, 1))
        assert row is not None and row.promoted_at is not None and row.allowed
        assert (row.forced_by, row.forced_reason, row.gate_passed) == (
            f"key {prefix} (release-bot)", "hotfix for incident 42", False
        )  # fmt: skip
        assert jobstore.version_verdict(session, name, 1) is row

    reader, _, _ = _project(api, ("jobs:read",))
    assert api.post(JOBS, json={}, headers=reader).status_code in (403, 422)
    assert api.get("/v1/models", headers=reader).json() == {"detail": "this API key lacks the scope models:read"}


def test_a_champion_moved_outside_invdpo_to_a_refused_version_is_reported(api: TestClient, mlflow_server: str) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    auth, project_id, _ = _project(api)
    name, [good_job, refused_job] = _registered(api, mlflow_server, project_id, [True, False])
    factory = api.app.state.session_factory  # type: ignore[attr-defined]
    assert api.post(f"/v1/models/{name}/promote", json={"version": 1}, headers=auth).status_code == 200
    assert not any(c.name == name for c in champions.check_champions(factory, mlflow_server))

    client.set_registered_model_alias(name, "champion", "2")  # what the MLflow UI does

    def warnings(job_id: str) -> list[Any]:
        with factory() as session:
            return list(
                session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.level == "warn"))
            )

    found = [c for c in champions.check_champions(factory, mlflow_server) if c.name == name]
    assert found == [champions.UngatedChampion(name, 2, refused_job)]
    champions.check_champions(factory, mlflow_server)  # a second pass reports nothing new
    [message] = warnings(refused_job)  # the API's own loop may have been first; either way: once
    assert message.startswith(f"champion of {name} was moved outside invdpo to version 2, which the promotion gate")
    events = api.get(f"{JOBS}/{refused_job}/events", params={"limit": 100}, headers=auth).json()["data"]
    assert any(e["level"] == "warn" and "moved outside invdpo" in e["message"] for e in events)
    assert warnings(good_job) == []
    metrics = ""
    for _ in range(50):  # the API's loop (every second in this fixture) publishes the count
        metrics = api.get("/metrics").text
        if any(line.startswith("invdpo_ungated_champions ") and float(line.split()[1]) >= 1
               for line in metrics.splitlines()):  # fmt: skip
            break
        time.sleep(0.2)
    else:
        raise AssertionError(metrics[-2000:])

    # Moved back to an allowed version: no longer reported; a later bad move would be reported again.
    client.set_registered_model_alias(name, "champion", "1")
    assert not any(c.name == name for c in champions.check_champions(factory, mlflow_server))
    with factory() as session:
        assert session.get(ModelVersion, (name, 2)).allowed is False  # type: ignore[union-attr]
