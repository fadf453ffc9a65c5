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
