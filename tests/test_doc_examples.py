"""Every example (bash, python, yaml block) in README.md, services/*/README.md and docs/*.md is checked somewhere.

- Blocks marked `<!-- walkthrough -->` run as written against `make stack` in tests/test_readme_walkthrough.py.
- README.md's `mlflow models serve` block runs in tests/serving/test_readme_pyfunc.py.
- The others need Docker, a Kubernetes cluster, a GPU cluster or many minutes, and are not run; CHECKED says, per
  block, what cheaper check stands in: the make targets, files and script flags they name exist, the invdpo and
  invdpo-admin command lines parse, the chart renders with the documented values, the Secrets the documentation
  creates are the ones the chart reads, a documented config is a valid TrainingConfig.
A block that nothing claims fails test_every_example_is_checked.
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("services/*/README.md")), *sorted(ROOT.glob("docs/*.md"))]
# Files of this repository an example names.
PATHS = re.compile(
    r"(?<![\w/])((?:benchmarks|deploy/(?:docker|helm|compose))/[\w./-]+|docker-compose[\w.]*\.yml|\.env\.example)"
)
FENCE = re.compile(r"^(<!-- walkthrough -->\n)?```(bash|sh|python|yaml)\n(.*?)^```", re.S | re.M)

# (file, text the block contains, how it is checked and why it is not run)
CHECKED = [
    ("README.md", "make demo", "make targets; `make demo` runs in tests/test_demo.py, `make test` is CI"),
    ("README.md", "make stack ", "make targets; the stack itself runs in tests/test_readme_walkthrough.py"),
    ("README.md", "python benchmarks/faults.py", "the script exists; not run: ~20 min (tests/worker/test_faults.py)"),
    ("README.md", "mlflow models serve", "run as written by tests/serving/test_readme_pyfunc.py (slow)"),
    ("README.md", "make lint", "make targets; CI runs them"),
    ("docs/deploy.md", "docker build", "the Dockerfiles exist; not run: Docker (tests/deploy/test_dockerfiles.py)"),
    ("docs/deploy.md", "cp .env.example .env", "files exist; not run: needs Docker (tests/deploy/test_compose.py)"),
    ("docs/deploy.md", "docker compose exec api", "invdpo-admin parses the command; not run: needs Docker"),
    ("docs/deploy.md", "docker-compose.cpu.yml up", "files exist; not run: needs Docker"),
    ("docs/deploy.md", "kubectl create namespace", "the Secrets are the chart's (names, keys); not run: a cluster"),
    ("docs/deploy.md", "# my-values.yaml", "renders with the chart; not run: a cluster"),
    ("docs/deploy.md", "helm install", "the chart exists, invdpo-admin parses; not run: a cluster"),
    ("docs/deploy.md", "helm upgrade", "the chart exists; not run: a cluster"),
    ("docs/deploy.md", "kubectl get crd", "not run: a cluster with Kubeflow Trainer (read-only checks of it)"),
    ("docs/deploy.md", "trainJob:", "renders with the chart; not run: a GPU cluster"),
    ("docs/deploy.md", "get trainjobs -l", "the label is the worker's; not run: a GPU cluster"),
    ("docs/method.md", "--plan base", "the script and its flags exist; not run: 11 min and more"),
    ("docs/method.md", "method: inpo", "a valid TrainingConfig"),
    ("docs/method.md", "ema_decay:", "a valid TrainingConfig"),
    ("docs/method.md", "test_real_config.py", "the test file exists; not run here: a slow test of its own"),
    ("docs/method.md", "--runs", "the scripts and their flags exist; not run: hours"),
    ("docs/method.md", "all-N-points-swap.json benchmarks", "the script, its flag and the study files exist; not run"),
    ("services/api/README.md", "claim_job(session", "the functions and parameters exist in services/jobs/jobstore.py"),
]


def blocks() -> list[tuple[str, bool, str, str]]:
    """(file relative to the repository, marked for the walkthrough, language, code) of every example block."""
    out = []
    for path in DOCS:
        for marked, language, code in FENCE.findall(path.read_text()):
            out.append((str(path.relative_to(ROOT)), bool(marked), language, code))
    return out


def checked(name: str, code: str) -> list[str]:
    return [how for file, text, how in CHECKED if file == name and text in code]


def lines(code: str) -> list[str]:
    """Command lines, continuations joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_every_example_is_checked() -> None:
    unclaimed = [(name, code[:60]) for name, marked, _, code in blocks() if not marked and not checked(name, code)]
    assert unclaimed == [], "an example no test runs or checks: mark it or add it to CHECKED"
    twice = [
        (name, code[:60])
        for name, marked, _, code in blocks()
        if len(checked(name, code)) > 1 or (marked and checked(name, code))
    ]
    assert twice == []
    used = {
        (file, text) for file, text, _ in CHECKED for name, _, _, code in blocks() if name == file and text in code
    }
    assert used == {(file, text) for file, text, _ in CHECKED}, "a CHECKED entry matches no block any more"


def test_every_make_target_exists() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {t for _, _, _, code in blocks() for t in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", code)}
    assert named and named <= targets, named - targets


def test_every_file_and_script_flag_named_exists() -> None:
    for _, _, _, code in blocks():
        for path in re.findall(PATHS, code) + re.findall(r"(?<![\w/])tests/[\w/]+\.py", code):
            assert path.startswith("benchmarks/results/") or (ROOT / path).exists(), path  # results: outputs
        for line in lines(code):
            if not line.startswith("python benchmarks/"):
                continue
            words = shlex.split(line)
            if len(words) > 1:
                source = (ROOT / words[1]).read_text()
                for flag in [w for w in words if w.startswith("--")]:
                    assert f'"{flag}"' in source, f"{words[1]} has no {flag}"


def test_every_invdpo_and_invdpo_admin_command_line_parses() -> None:
    from invdpo_core.cli import build_parser
    from services import admin
    from services.client import add_client_commands

    parser, sub = build_parser()
    add_client_commands(sub)
    parsed = 0
    for _, _, language, code in blocks():
        if language != "bash":
            continue
        for line in lines(code):
            if not re.search(r"(^|[\s(|;])invdpo(-admin)?\s", line):
                continue  # e.g. a line of a JSON body
            for command in re.split(r"\$\(|\||;|&&", line):
                words = shlex.split(command.replace(")", " "))
                for i, word in enumerate(words):
                    # The command itself, or run in a container: `compose exec api ...`, `kubectl exec ... -- ...`.
                    if word in ("invdpo", "invdpo-admin") and (i == 0 or words[i - 1] in ("api", "--")):
                        args = ["X" if w.startswith("$") else w for w in words[i + 1 :]]  # a variable: any value
                        try:
                            (admin.build_parser() if word == "invdpo-admin" else parser).parse_args(args)
                        except SystemExit:
                            pytest.fail(f"does not parse: {word} {' '.join(args)}")
                        parsed += 1
                        break
    assert parsed >= 10


def test_the_secrets_deploy_md_creates_are_the_ones_the_chart_reads() -> None:
    (code,) = [
        code for name, _, _, code in blocks() if name == "docs/deploy.md" and "kubectl create namespace" in code
    ]
    created: dict[str, set[str]] = {}
    for line in lines(code):
        words = shlex.split(line.replace("$(openssl rand -hex 24)", "RANDOM"))
        if "secret" in words and "generic" in words:
            name = words[words.index("generic") + 1]
            created[name] = {w.split("=", 2)[1] for w in words if w.startswith("--from-literal=")}

    needed: dict[str, set[str]] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("existingSecret"):
                needed[node["existingSecret"]] = {
                    v for k, v in node.items() if k.endswith("Key") and isinstance(v, str)
                }
            for value in node.values():
                walk(value)

    values = yaml.safe_load((ROOT / "deploy/helm/invdpo/values.yaml").read_text())
    walk(values)
    missing = {name: keys for name, keys in needed.items() if not keys <= created.get(name, set())}
    assert missing == {}, "Secrets the chart's defaults read that docs/deploy.md does not create (with those keys)"
    # The optional ones it creates carry the keys the chart reads.
    assert created["invdpo-redis"] == {values["worker"]["keda"]["redis"]["passwordKey"]}
    assert created["invdpo-huggingface"] == {values["worker"]["huggingface"]["tokenKey"]}


@pytest.mark.parametrize("text", ["# my-values.yaml", "trainJob:"])
def test_the_values_deploy_md_shows_render_with_the_chart(text: str) -> None:
    (code,) = [code for name, _, _, code in blocks() if name == "docs/deploy.md" and text in code]
    values = yaml.safe_load(code)
    with helm.Chart.load(ROOT / "deploy/helm/invdpo") as chart:
        rendered = chart.render(values, name="invdpo", namespace="invdpo")
    assert any("Deployment" in text for text in rendered.values())


def test_the_trainjob_label_deploy_md_filters_on_is_the_workers() -> None:
    (code,) = [code for name, _, _, code in blocks() if name == "docs/deploy.md" and "get trainjobs -l" in code]
    label = re.search(r"-l ([\w./-]+)=", code).group(1)  # type: ignore[union-attr]
    assert label in (ROOT / "services/worker/trainjob.py").read_text()


@pytest.mark.parametrize("text", ["method: inpo", "ema_decay:"])
def test_the_settings_of_method_md_are_a_valid_config(text: str) -> None:
    from invdpo_core.config import parse_config

    (code,) = [code for name, _, _, code in blocks() if name == "docs/method.md" and text in code]
    settings = yaml.safe_load(code)
    config = parse_config({"base_model": "m", "dataset": "d", **settings})
    assert config.model_dump(include=set(settings)) == {
        k: v if not isinstance(v, dict) else {**config.model_dump()[k], **v} for k, v in settings.items()
    }


def test_the_jobstore_functions_of_the_api_readme_exist_with_those_parameters() -> None:
    from services.jobs import jobstore

    (code,) = [code for name, _, _, code in blocks() if name == "services/api/README.md" and "claim_job(" in code]
    for line in lines(code):
        name, _, rest = line.partition("(")
        documented = [p.split("=")[0].strip() for p in rest.split(")")[0].split(",") if p.strip() not in ("", "...")]
        documented = [p for p in documented if not p.startswith('"')]  # a literal value shown, not a name
        actual = list(inspect.signature(getattr(jobstore, name)).parameters)
        assert [p for p in documented if p not in actual] == [], f"{name}: {documented} vs {actual}"
