import os

# An accidental download must fail loudly, never hang on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


# --- S3: a real moto server on loopback, shared by core, API and worker tests (see tests/fixtures_s3.py) ---
import pytest  # noqa: E402
from fixtures_s3 import create_bucket, moto_s3_server, point_aws_env_at  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL (http://127.0.0.1:PORT) of an S3 server that lives for the whole test session."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point AWS_ENDPOINT_URL_S3 and dummy credentials at `s3_server`; yields a fresh empty bucket name."""
    point_aws_env_at(monkeypatch, s3_server)
    yield create_bucket(s3_server)


# --- MLflow on SQLite: each store starts as a copy of one whose schema is made --------------------------------------
import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402


@pytest.fixture(scope="session")
def mlflow_sqlite_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store: making one runs MLflow's schema migrations, about 5 s each time."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def mlflow_sqlite(mlflow_sqlite_template) -> Callable[[Path], str]:
    """mlflow_sqlite(directory) -> the tracking URI of a fresh, empty store `directory/mlflow.db` (kept if there)."""

    def make(directory: Path) -> str:
        path = Path(directory) / "mlflow.db"
        if not path.exists():
            shutil.copyfile(mlflow_sqlite_template, path)
        return f"sqlite:///{path}"

    return make
