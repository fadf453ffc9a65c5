"""A real S3 endpoint for tests: moto's server on a loopback port, speaking the S3 HTTP API to boto3.

The fixtures in conftest.py wrap these: `s3_server` (session; the endpoint URL) and `s3_env` (per test; points the
standard AWS variables at the server and yields a fresh, empty bucket).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from botocore.config import Config

# Dummy credentials: moto accepts any, and they keep boto3 from looking at the host's AWS configuration.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """Start moto's threaded server on 127.0.0.1 (the OS picks a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def point_aws_env_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Make every boto3 client created in the test talk to `endpoint` with dummy credentials, whatever the host
    has configured (profiles, session tokens, other endpoints, proxies)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/invdpo-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/invdpo-test-aws-credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    # A proxy from the environment must not intercept loopback traffic.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def s3_test_client(endpoint: str) -> Any:
    """A boto3 client for the test server that does not depend on the environment."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


def create_bucket(endpoint: str) -> str:
    """A new bucket with a unique name, so tests sharing the session server never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_test_client(endpoint).create_bucket(Bucket=name)
    return name
