"""The Helm chart, rendered offline with Helm's own Go SDK (helm-python-sdk) and validated with kubernetes-validate.

Rendered with the default values and with every ci/*-values.yaml; every manifest (hooks and the test pod included)
must pass strict validation for each Kubernetes version in KUBERNETES_VERSIONS. KEDA's CRDs have no schema there
and are skipped by name (CRD_KINDS), which is asserted rather than left to a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from deploy_contract import (
    CHART,
    COMMANDS,
    CRD_KINDS,
    KUBERNETES_VERSIONS,
    SETTINGS_MODULES,
    check_env_names,
    validate_settings,
)

RELEASE, NAMESPACE = "demo", "ml"
VALUES_FILES = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
POD_KINDS = {"Deployment", "Job", "Pod"}


def values_id(path: Path | None) -> str:
    return "default" if path is None else path.name


def load_values(path: Path | None) -> dict | None:
    return None if path is None else yaml.safe_load(path.read_text())


def render(values: dict | None = None) -> list[dict]:
    """Every manifest the chart renders (NOTES.txt excluded), hooks and the helm test pod included."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    documents = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


@pytest.fixture(scope="module")
def renders(counts: dict) -> dict[str, list[dict]]:
    result = {values_id(path): render(load_values(path)) for path in VALUES_FILES}
    counts["manifests"].update({name: len(docs) for name, docs in result.items()})
    return result


def find(documents: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        doc
        for doc in documents
        if doc["kind"] == kind
        and (component is None or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def the(documents: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(documents, kind, component)
    assert len(found) == 1, f"expected one {kind} {component}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def container(doc: dict) -> dict:
    containers = pod_spec(doc)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(doc: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container(doc).get("env", [])}


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_strict_validation(renders: dict, counts: dict, path: Path | None, version: str) -> None:
    documents = renders[values_id(path)]
    assert documents
    for doc in documents:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            # Skipped by name: no schema ships for KEDA's CRDs. Prove it is that, not a typo in a core kind.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            counts["skipped_crds"] += 1
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{values_id(path)}: {name} invalid for {version}: {'.'.join(map(str, error.path))}: {error}")
        counts["validations"] += 1


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_helm_lint_finds_no_warnings_or_errors(counts: dict, path: Path | None) -> None:
    report = helm.lint(CHART, load_values(path), strict=True, kube_version=f"v{KUBERNETES_VERSIONS[-1]}.0")
    counts["lint"] += 1
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_default_release_has_exactly_these_resources(renders: dict) -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in renders["default"])
    assert kinds == [
        ("Deployment", "demo-invdpo-api"),
        ("Deployment", "demo-invdpo-mlflow"),
        ("Deployment", "demo-invdpo-worker"),
        ("Job", "demo-invdpo-migrate"),
        ("Job", "demo-invdpo-mlflow-users"),
        ("NetworkPolicy", "demo-invdpo-api"),
        ("NetworkPolicy", "demo-invdpo-mlflow"),
        ("NetworkPolicy", "demo-invdpo-worker"),
        ("Pod", "demo-invdpo-test"),
        ("Service", "demo-invdpo-api"),
        ("Service", "demo-invdpo-mlflow"),
        ("ServiceAccount", "demo-invdpo"),
    ]


def test_each_optional_feature_has_a_ci_values_file_turning_it_on() -> None:
    """Every `enabled: false` switch in values.yaml is turned on by some ci/*-values.yaml."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def switches(node: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in node.items():
            if key == "enabled" and value is False:
                found.add(prefix.rstrip("."))
            elif isinstance(value, dict):
                found |= switches(value, f"{prefix}{key}.")
        return found

    def turned_on(node: dict, path: str) -> bool:
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return isinstance(node, dict) and node.get("enabled") is True

    off_by_default = switches(defaults)
    assert off_by_default == {
        "api.ingress",
        "api.autoscaling",
        "worker.podDisruptionBudget",
        "worker.keda",
        "worker.trainJob",
        "serving",
        "serving.keda",
    }
    ci = [load_values(path) for path in VALUES_FILES[1:]]
    for switch in off_by_default:
        assert any(turned_on(values, switch) for values in ci), f"no ci/*-values.yaml turns on {switch}"


# The worker.


def test_worker_asks_for_a_gpu_and_tolerates_gpu_nodes_by_default(renders: dict) -> None:
    worker = the(renders["default"], "Deployment", "worker")
    spec = pod_spec(worker)
    assert container(worker)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["terminationGracePeriodSeconds"] >= 3600, "a scale-down must leave a job time to upload a checkpoint"
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert worker["spec"]["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"]
    assert container(worker)["command"] == COMMANDS["worker"]


def test_worker_gpu_limit_merges_with_resources_and_can_be_turned_off(renders: dict) -> None:
    resources = container(the(renders["resources-values.yaml"], "Deployment", "worker"))["resources"]
    assert resources["limits"] == {"memory": "48Gi", "nvidia.com/gpu": "1"}
    assert resources["requests"] == {"cpu": "4", "memory": "32Gi"}
    cpu = the(renders["cpu-worker-values.yaml"], "Deployment", "worker")
    assert "resources" not in container(cpu)
    assert "tolerations" not in pod_spec(cpu) and "nodeSelector" not in pod_spec(cpu)


def test_worker_probes_read_the_heartbeat_file(renders: dict) -> None:
    worker = container(the(renders["default"], "Deployment", "worker"))
    heartbeat = env_of(the(renders["default"], "Deployment", "worker"))["INVDPO_HEARTBEAT_FILE"]["value"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and command[3:] == [heartbeat, "120"], probe
    mounts = {mount["mountPath"] for mount in worker["volumeMounts"]}
    assert {"/tmp", "/home/invdpo", "/scratch", "/home/invdpo/.cache", "/dev/shm"} <= mounts
    assert heartbeat.startswith("/tmp/")


def test_keda_scales_the_worker_on_the_gpu_queue_without_killing_running_jobs(renders: dict) -> None:
    documents = renders["keda-values.yaml"]
    worker = the(documents, "Deployment", "worker")
    scaled = the(documents, "ScaledObject")
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "gpu"
    assert trigger["authenticationRef"]["name"] == the(documents, "TriggerAuthentication")["metadata"]["name"]
    scale_down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 600
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 3600


def test_worker_pdb_selects_the_workers(renders: dict) -> None:
    documents = renders["pdb-values.yaml"]
    pdb = the(documents, "PodDisruptionBudget")
    worker = the(documents, "Deployment", "worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 0


# The model servers.


def servers(documents: list[dict], kind: str) -> dict[str, dict]:
    """The model server resources of one kind, by deployment entry name (component serving-<name>)."""
    return {
        doc["metadata"]["labels"]["app.kubernetes.io/component"].removeprefix("serving-"): doc
        for doc in documents
        if doc["kind"] == kind and doc["metadata"]["labels"]["app.kubernetes.io/component"].startswith("serving-")
    }


def test_model_servers_are_off_by_default_and_one_per_entry_when_on(renders: dict) -> None:
    assert not servers(renders["default"], "Deployment")
    documents = renders["serving-values.yaml"]
    deployments = servers(documents, "Deployment")
    assert set(deployments) == {"cats", "dogs"}
    cats = deployments["cats"]
    assert cats["spec"]["replicas"] == 2
    assert cats["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    server = container(cats)
    assert server["command"] == COMMANDS["serving"]
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["resources"]["limits"] == {"nvidia.com/gpu": "1"}, "a GPU by default"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(cats)["tolerations"]
    env = env_of(cats)
    assert env["INVDPO_SERVING_MODELS"]["value"] == "cats,cats-sdxl@staging"
    assert env_of(deployments["dogs"])["INVDPO_SERVING_MODELS"]["value"] == "dogs"
    assert (env["INVDPO_SERVING_POLL_SECONDS"]["value"], env["INVDPO_SERVING_MAX_WAIT_MS"]["value"]) == ("5", "25")
    assert "INVDPO_SERVING_REQUEST_TIMEOUT_SECONDS" not in env, "null keeps the server's default"
    assert "secretKeyRef" in env["INVDPO_DATABASE_URL"]["valueFrom"], "API keys are checked in the job database"
    # The chart's MLflow asks every client for a user (401 without): the server reads the registry as the service
    # user, from its Secret.
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] and "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert servers(documents, "Service")[name]["spec"]["selector"] == selector
        assert servers(documents, "PodDisruptionBudget")[name]["spec"]["selector"]["matchLabels"] == selector
    assert not find(documents, "ScaledObject")


def test_model_server_variables_are_its_settings(renders: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for deployment in servers(renders["serving-values.yaml"], "Deployment").values():
        env = env_of(deployment)
        assert check_env_names(set(env), SETTINGS_MODULES["serving"]) == []
        literal = {name: item.get("value", "postgresql+psycopg://u:p@h:5432/d") for name, item in env.items()}
        settings = validate_settings(SETTINGS_MODULES["serving"], literal, monkeypatch)
        assert settings.model_refs()  # type: ignore[attr-defined]


def test_keda_scales_each_model_server_on_its_queue_depth(renders: dict) -> None:
    documents = renders["serving-keda-values.yaml"]
    (deployment,) = servers(documents, "Deployment").values()
    (scaled,) = servers(documents, "ScaledObject").values()
    name = deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == name
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 6)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    assert (
        trigger["metadata"]["query"] == f'sum(invdpo_serving_queue_depth{{namespace="{NAMESPACE}",pod=~"{name}-.*"}})'
    )
    with pytest.raises(helm.HelmRenderError, match="prometheusAddress is required"):
        render({"serving": {"enabled": True, "keda": {"enabled": True}}})


# The API, MLflow, hooks.


def test_api_probes_use_the_health_endpoints(renders: dict) -> None:
    api = container(the(renders["default"], "Deployment", "api"))
    assert api["command"] == COMMANDS["api"]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_autoscaled_api_leaves_replicas_to_the_hpa(renders: dict) -> None:
    documents = renders["hpa-values.yaml"]
    api = the(documents, "Deployment", "api")
    assert "replicas" not in api["spec"]
    assert the(documents, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == api["metadata"]["name"]


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook(renders: dict) -> None:
    job = the(renders["default"], "Job", "migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["command"] == COMMANDS["migrate"]
    # A pre-install hook runs before the chart's ServiceAccount exists.
    assert "serviceAccountName" not in pod_spec(job)
    assert env_of(the(renders["default"], "Deployment", "api"))["INVDPO_MIGRATE_ON_STARTUP"]["value"] == "false"
    existing = the(renders["existing-serviceaccount-values.yaml"], "Job", "migrate")
    assert pod_spec(existing)["serviceAccountName"] == "invdpo-runner"
    assert not find(renders["existing-serviceaccount-values.yaml"], "ServiceAccount")
    startup = renders["migrate-on-startup-values.yaml"]
    assert not find(startup, "Job", "migrate")
    assert env_of(the(startup, "Deployment", "api"))["INVDPO_MIGRATE_ON_STARTUP"]["value"] == "true"


def test_helm_test_pod_calls_the_api_health_endpoints(renders: dict) -> None:
    pod = the(renders["default"], "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = the(renders["default"], "Service", "api")
    base = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert container(pod)["command"][-2:] == [f"{base}/healthz", f"{base}/readyz"]


def test_mlflow_runs_in_the_release_or_is_external(renders: dict) -> None:
    mlflow = container(the(renders["default"], "Deployment", "mlflow"))
    assert mlflow["command"][:2] == ["/bin/sh", "-c"]
    command = mlflow["command"][2].split()
    assert command[command.index("exec") + 1 : command.index("exec") + 5] == [
        "mlflow", "server", "--app-name", "basic-auth"
    ]  # fmt: skip
    assert "--serve-artifacts" in command
    assert mlflow["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "MLFLOW_BACKEND_STORE_URI" in {item["name"] for item in mlflow["env"]}
    service = the(renders["default"], "Service", "mlflow")["metadata"]["name"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert {service, f"{service}:*", f"{service}.{NAMESPACE}.svc.cluster.local:*"} <= set(allowed)
    api_env = env_of(the(renders["default"], "Deployment", "api"))
    assert api_env["INVDPO_MLFLOW_TRACKING_URI"]["value"] == f"http://{service}:5000"
    external = renders["external-mlflow-values.yaml"]
    assert not find(external, "Deployment", "mlflow") and not find(external, "Service", "mlflow")
    for component in ("api", "worker"):
        value = env_of(the(external, "Deployment", component))["INVDPO_MLFLOW_TRACKING_URI"]["value"]
        assert value == "https://mlflow.example.com"


def test_mlflow_requires_users_and_only_the_release_services_reach_it(renders: dict) -> None:
    """Basic-auth with NO_PERMISSIONS for anyone not granted; the API and the workers log in as the service user the
    post-install Job creates; the network policy (on by default) admits to MLflow only the API, the workers, the
    model server, that Job and mlflowFrom."""
    mlflow = container(the(renders["default"], "Deployment", "mlflow"))
    assert "default_permission = NO_PERMISSIONS" in mlflow["command"][2]
    env = env_of(the(renders["default"], "Deployment", "mlflow"))
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    for component in ("api", "worker", "mlflow-users"):
        env = env_of(the(renders["default"], "Job" if component == "mlflow-users" else "Deployment", component))
        assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "invdpo", component
        assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"], component
    assert container(the(renders["default"], "Job", "mlflow-users"))["command"] == [
        "invdpo-admin", "mlflow-service-user"
    ]  # fmt: skip

    policy = the(renders["default"], "NetworkPolicy", "mlflow")
    [rule] = policy["spec"]["ingress"]
    admitted = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]]
    assert admitted == ["invdpo-api", "invdpo-worker", "invdpo-serving", "invdpo-mlflow-users"]
    assert all(peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo" for peer in rule["from"])
    pods = {the(renders["default"], kind, c)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for kind, c in (("Deployment", "api"), ("Deployment", "worker"), ("Job", "mlflow-users"))}  # fmt: skip
    assert pods <= set(admitted)
    assert the(renders["default"], "NetworkPolicy", "worker")["spec"].get("ingress") is None  # nothing reaches it
    [ui] = the(renders["networkpolicy-values.yaml"], "NetworkPolicy", "mlflow")["spec"]["ingress"]
    assert ui["from"][-1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}


def test_credentials_come_from_existing_secrets(renders: dict) -> None:
    for component in ("api", "worker"):
        env = env_of(the(renders["default"], "Deployment", component))
        for name in ("INVDPO_DATABASE_URL", "INVDPO_BROKER_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[name]["valueFrom"], f"{component}: {name}"
    assert not find(renders["default"], "Secret"), "the chart never creates or holds credentials"
    iam = env_of(the(renders["s3-iam-role-values.yaml"], "Deployment", "worker"))
    assert "AWS_ACCESS_KEY_ID" not in iam and "AWS_SECRET_ACCESS_KEY" not in iam


# Every rendering.


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_every_pod_runs_non_root_read_only_without_capabilities(renders: dict, path: Path | None) -> None:
    for doc in renders[values_id(path)]:
        if doc["kind"] not in POD_KINDS:
            continue
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        # Only a worker that manages TrainJobs (worker.trainJob) needs its token, to reach the API server.
        manages_trainjobs = path is not None and path.name == "trainjob-values.yaml" and doc["kind"] == "Deployment"
        manages_trainjobs = manages_trainjobs and doc["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
        assert spec["automountServiceAccountToken"] is manages_trainjobs
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for item in spec["containers"]:
            context = item["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, doc["metadata"]["name"]
            assert context["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]
            assert context["capabilities"]["drop"] == ["ALL"], doc["metadata"]["name"]
            tmp = [mount for mount in item["volumeMounts"] if mount["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{doc['metadata']['name']}: writable /tmp"


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_selectors_use_name_and_instance_only_and_never_overlap(renders: dict, path: Path | None) -> None:
    documents = renders[values_id(path)]
    selectors = {}
    for doc in documents:
        if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]["matchLabels"]
        elif doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        else:
            continue
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, doc["metadata"]["name"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert not re.search(r"\d+\.\d+", selector["app.kubernetes.io/name"]), "no version in a selector"
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
            selectors[doc["metadata"]["name"]] = tuple(sorted(selector.items()))
    assert len(set(selectors.values())) == len(selectors), f"Deployments share a selector: {selectors}"
    for service in find(documents, "Service"):
        matching = [name for name, selector in selectors.items() if dict(selector) == service["spec"]["selector"]]
        assert len(matching) == 1, f"{service['metadata']['name']} selects {matching}"


@pytest.mark.parametrize("component", ["api", "migrate", "test", "mlflow", "worker"])
def test_container_variables_are_settings_fields_or_library_variables(
    renders: dict, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = SETTINGS_MODULES.get(component)
    for values_name, documents in renders.items():
        for doc in documents:
            if doc["kind"] not in POD_KINDS or doc["metadata"]["labels"]["app.kubernetes.io/component"] != component:
                continue
            env = env_of(doc)
            assert check_env_names(set(env), module) == [], f"{values_name}: {doc['metadata']['name']}"
            if module:
                # Secret-backed values are unknown here; a well-formed stand-in lets the literals be judged.
                literal = {name: item.get("value", "postgresql+psycopg://u:p@h:5432/d") for name, item in env.items()}
                validate_settings(module, literal, monkeypatch)


# The values schema.


@pytest.mark.parametrize(
    "values, key",
    [
        ({"replicaCount": 2}, "replicaCount"),
        ({"api": {"replicaCout": 3}}, "replicaCout"),
        ({"worker": {"gpu": {"cuont": 2}}}, "cuont"),
        ({"worker": {"keda": {"listname": "gpu"}}}, "listname"),
        ({"worker": {"resources": {"limit": {"memory": "1Gi"}}}}, "limit"),
        ({"mlflow": {"backendstore": {}}}, "backendstore"),
        ({"networkPolicy": {"enable": True}}, "enable"),
        ({"serving": {"deployments": [{"name": "a", "models": ["m"], "replicaCount": 1, "replicas": 2}]}}, "replicas"),
    ],
)
def test_a_misspelled_values_key_fails_the_render(values: dict, key: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"additional properties '{key}' not allowed"):
        render(values)


def test_wrong_types_and_missing_requirements_fail_the_render() -> None:
    with pytest.raises(helm.HelmValuesError, match="gpu"):
        render({"worker": {"gpu": {"count": "one"}}})
    with pytest.raises(helm.HelmRenderError, match="externalTrackingUri is required"):
        render({"mlflow": {"enabled": False}})
    with pytest.raises(helm.HelmRenderError, match="redis.address"):
        render({"worker": {"keda": {"enabled": True}}})


def test_values_yaml_and_schema_describe_the_same_keys() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema

    def compare(values: dict, node: dict, path: str) -> None:
        properties = node.get("properties")
        if properties is None or node.get("additionalProperties") is not False:
            return  # a free-form map (annotations, nodeSelector, affinity...)
        assert set(values) <= set(properties), f"{path or 'top level'}: {set(values) - set(properties)}"
        if values:  # an empty default ({}) is an optional object such as resources
            assert set(properties) <= set(values), f"{path}: not in values.yaml: {set(properties) - set(values)}"
        for key, value in values.items():
            if isinstance(value, dict):
                compare(value, properties[key], f"{path}.{key}".lstrip("."))

    compare(defaults, schema, "")


def test_every_values_key_has_a_comment_above_it() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_line = re.compile(r"^(\s*)([\w./-]+|\"[^\"]+\"):(\s|$)")
    list_item_indent = None
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if line.lstrip().startswith("- "):
            list_item_indent = indent
            continue
        if list_item_indent is not None and indent > list_item_indent:
            continue  # a key inside a list item (default data such as a toleration)
        list_item_indent = None
        match = key_line.match(line)
        assert match, f"values.yaml:{number + 1}: unexpected line {line!r}"
        previous = lines[number - 1]
        assert previous.strip().startswith("#") and previous.startswith(match.group(1) + "#"), (
            f"values.yaml:{number + 1}: {match.group(2)} has no comment above it"
        )


# In an argument a secret is readable by anything on the node (/proc/PID/cmdline, `ps`) and by whoever can read the
# pod spec: a URL with a password, a password flag, or `$(VAR)` of a Secret-backed variable (Kubernetes expands
# it into the argv).
_SECRET_ARG = re.compile(r"://[^/@\s:]*:[^/@\s]+@|--(?:password|requirepass|token|secret)\b|requirepass\s", re.I)


def _container_args(doc: dict) -> list[tuple[str, str, list[str]]]:
    spec = pod_spec(doc)
    found = []
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        secret_env = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            argv += [str(a) for a in c.get(probe, {}).get("exec", {}).get("command", [])]
        found.append((c["name"], ",".join(sorted(secret_env)), argv))
    return found


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_no_secret_in_any_container_args(renders: dict, path: Path | None) -> None:
    workloads = [d for d in renders[values_id(path)] if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]
    assert workloads
    for doc in workloads:
        for name, secret_env, argv in _container_args(doc):
            for arg in argv:
                assert not _SECRET_ARG.search(arg), f"{doc['metadata']['name']}/{name}: {arg!r}"
                for var in filter(None, secret_env.split(",")):
                    assert f"$({var})" not in arg, f"{doc['metadata']['name']}/{name} expands {var} in its args"
    assert _SECRET_ARG.search("postgresql://u:hunter2@db/x") and _SECRET_ARG.search("--requirepass x")
