"""Fixtures of the deploy tests, and a count of what was rendered and validated, printed at the end of the run."""

from __future__ import annotations

import pytest
from deploy_contract import CRD_KINDS, KUBERNETES_VERSIONS

COUNTS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def counts(pytestconfig: pytest.Config) -> dict:
    """What was rendered and validated, reported in the terminal summary."""
    return pytestconfig.stash.setdefault(
        COUNTS, {"manifests": {}, "validations": 0, "skipped_crds": 0, "compose_services": 0, "lint": 0}
    )


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    stats = config.stash.get(COUNTS, None)
    if not stats or not stats["manifests"]:
        return
    write = terminalreporter.write_line
    write("")
    write(f"deploy: chart rendered with {len(stats['manifests'])} values files (manifests incl. hooks and tests):")
    for name, count in sorted(stats["manifests"].items()):
        write(f"  {name:40s} {count}")
    write(
        f"deploy: {stats['validations']} kubernetes-validate --strict validations "
        f"(Kubernetes {', '.join(KUBERNETES_VERSIONS)}), {stats['skipped_crds']} CRD manifest checks skipped "
        f"by name ({', '.join(sorted(kind for _, kind in CRD_KINDS))}); {stats['lint']} helm lint runs"
    )
    if stats["compose_services"]:
        write(f"deploy: docker-compose.yml services checked: {stats['compose_services']}")
