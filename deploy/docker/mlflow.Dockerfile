# syntax=docker/dockerfile:1
# MLflow tracking server with the PostgreSQL driver and boto3, which the official image does not carry.
#
#   docker build -f deploy/docker/mlflow.Dockerfile -t invdpo-mlflow:3.17.2 .
#   mlflow server --backend-store-uri postgresql+psycopg://... --artifacts-destination s3://BUCKET/mlflow \
#     --serve-artifacts --host 0.0.0.0 --port 5000
# With --serve-artifacts the server proxies artifact uploads and downloads, so only it needs S3 credentials.

ARG PYTHON_IMAGE=python:3.10-slim-bookworm
FROM ${PYTHON_IMAGE}

# Keep in step with the mlflow client the services install (pyproject: mlflow>=3).
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mlflow --shell /usr/sbin/nologin mlflow \
    && pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" "boto3>=1.34"

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000

# /health is exempt from MLflow's Host-header check, so it answers whatever name the probe uses.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

# Default: a throwaway server (SQLite and artifacts in the home directory). Compose and the Helm chart pass
# the full command with the PostgreSQL backend and the S3 artifact destination.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
