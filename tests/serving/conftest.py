"""Model server fixtures: the tiny pipeline saved once, and an embedded registry (SQLite job database, SQLite
MLflow registry with local artifacts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_fixtures import Registry, make_registry

from invdpo_core.testing import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd15")
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path, mlflow_sqlite: Callable[[Path], str]
) -> Iterator[Registry]:
    """SQLite job database and SQLite MLflow registry with local artifacts (the embedded setup)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    yield from make_registry(
        f"sqlite:///{tmp_path / 'invdpo.db'}", mlflow_sqlite(tmp_path), tiny_pipeline_dir,
        tmp_path / "artifacts",
    )  # fmt: skip
