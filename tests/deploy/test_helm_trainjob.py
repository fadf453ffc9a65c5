"""The chart's multi-node part (worker.trainJob): RBAC for TrainJobs, the worker's INVDPO_TRAINJOB_* settings and the
API's node limit. Rendered with Helm's own renderer (test_helm_chart.render); the strict validation of the Role and
RoleBinding is test_helm_chart's, through ci/trainjob-values.yaml. The TrainJob the rendered worker would create
is built from its rendered environment and checked against Kubeflow Trainer v2.3.0's CRD (tests/crds)."""

from __future__ import annotations

import pytest
from deploy_contract import CHART, validate_settings
from fixtures_kubernetes import validate_trainjob
from test_helm_chart import NAMESPACE, RELEASE, container, env_of, find, load_values, render, the

from services.worker.trainjob import build_trainjob

TRAINJOB_VALUES = load_values(CHART / "ci" / "trainjob-values.yaml")
JOB_ID = "ftjob-00112233445566778899aabb"


def test_off_by_default_no_rbac_no_token_no_multi_node() -> None:
    documents = render()
    assert find(documents, "Role") == [] and find(documents, "RoleBinding") == []
    worker = the(documents, "Deployment", "worker")
    assert worker["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not [name for name in env_of(worker) if name.startswith("INVDPO_TRAINJOB_")]
    assert "INVDPO_MAX_NODES_PER_JOB" not in env_of(the(documents, "Deployment", "api"))


def test_the_worker_may_manage_trainjobs_in_its_namespace_only() -> None:
    documents = render(TRAINJOB_VALUES)
    role, binding = the(documents, "Role"), the(documents, "RoleBinding")
    assert role["rules"] == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        }
    ]
    assert find(documents, "ClusterRole") == [] and find(documents, "ClusterRoleBinding") == []
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    worker = the(documents, "Deployment", "worker")
    pod = worker["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert pod["automountServiceAccountToken"] is True  # the client's in-cluster credentials
    assert env_of(the(documents, "Deployment", "api"))["INVDPO_MAX_NODES_PER_JOB"]["value"] == "8"


def test_the_rendered_worker_builds_a_trainjob_the_crd_accepts_without_secret_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = render({**TRAINJOB_VALUES, "networkPolicy": {"enabled": True}})
    worker = the(documents, "Deployment", "worker")
    env = env_of(worker)
    literal = {name: item.get("value", "postgresql+psycopg://u:p@h:5432/d") for name, item in env.items()}
    settings = validate_settings("services.worker.settings", literal, monkeypatch)
    manifest = build_trainjob(JOB_ID, 4, 8, settings)  # type: ignore[arg-type]
    validate_trainjob(manifest)

    assert manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = manifest["spec"]["trainer"]
    assert trainer["image"] == container(worker)["image"]
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    node_env = {e["name"]: e for e in trainer["env"]}
    # The nodes read the worker's Secrets by reference, never by value.
    for name in ("INVDPO_DATABASE_URL", "INVDPO_BROKER_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert env[name]["valueFrom"] == node_env[name]["valueFrom"] and "value" not in node_env[name], name
    assert node_env["INVDPO_ARTIFACT_URI"] == env["INVDPO_ARTIFACT_URI"]
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    template = pod["template"]["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "nvidia.com/gpu.present": "true"
    }  # fmt: skip
    assert template["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # The NetworkPolicy in front of MLflow admits the TrainJob pods (rank 0 logs the run there).
    (mlflow_policy,) = [p for p in find(documents, "NetworkPolicy") if p["metadata"]["name"].endswith("mlflow")]
    allowed = mlflow_policy["spec"]["ingress"][0]["from"]  # the API, the workers, the model servers, ...
    labels = template["metadata"]["labels"].items()
    assert any("podSelector" in a and a["podSelector"]["matchLabels"].items() <= labels for a in allowed), allowed
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_trainjob_values_are_checked_by_the_schema() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match="maxNodes"):
        render({"worker": {"trainJob": {"enabled": True, "maxNodes": 0}}})
    with pytest.raises(helm.HelmValuesError, match="queueName"):
        render({"worker": {"trainJob": {"queueName": "not a queue"}}})
    with pytest.raises(helm.HelmValuesError, match="additional properties 'runtimeName' not allowed"):
        render({"worker": {"trainJob": {"runtimeName": "x"}}})
