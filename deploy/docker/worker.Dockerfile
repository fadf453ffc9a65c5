# syntax=docker/dockerfile:1
# The GPU worker image: Celery consuming the `gpu` and `default` queues, one training job at a time.
#
# Build from the repository root (CUDA, the default):
#   docker build -f deploy/docker/worker.Dockerfile -t invdpo-worker:0.1.0 .
# CPU-only build (what docker-compose.cpu.yml does):
#   docker build -f deploy/docker/worker.Dockerfile --build-arg BASE_IMAGE=ubuntu:22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t invdpo-worker:cpu .
# Command, the same as outside Docker:
#   celery -A services.worker.app worker -Q gpu,default --concurrency 1 --prefetch-multiplier 1 -n worker@%h

# CUDA runtime + cuDNN on Ubuntu 22.04, and the torch wheel built for the same CUDA major.minor (cu128). The
# host needs an NVIDIA driver recent enough for this CUDA (>= 570 for 12.8). Both are build arguments:
# PyPI's own torch wheel is built for CUDA 13 and needs driver >= 580; pair it with a CUDA 13 base image.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

# Pinned like the Makefile pins it for development.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/invdpo/.cache/huggingface

# Ubuntu 22.04's Python is 3.10 (pyproject requires >= 3.10); the API image uses the same minor version.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 invdpo \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/invdpo --shell /usr/sbin/nologin invdpo \
    && mkdir -p /home/invdpo/.cache /scratch \
    && chown -R 10001:10001 /home/invdpo /scratch \
    && python3 -m venv /opt/venv

# torch first, from the index of the chosen build: `pip install .` then finds it satisfied and keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app

# Dependencies before the source, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p invdpo_core services \
    && touch invdpo_core/__init__.py services/__init__.py \
    && pip install ".[service]" \
    && rm -rf invdpo_core services build *.egg-info

# The source also stays in /app, the working directory, as in a checkout (see api.Dockerfile).
COPY invdpo_core ./invdpo_core
COPY services ./services
RUN pip install --no-deps --force-reinstall . \
    && rm -rf build *.egg-info \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

USER 10001:10001

# Liveness: the worker touches its heartbeat file every 10 s (INVDPO_HEARTBEAT_FILE); older than 120 s, or
# missing, is unhealthy. The heartbeat has to keep beating through long training steps.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, time; p = os.environ.get('INVDPO_HEARTBEAT_FILE', '/tmp/invdpo-worker-heartbeat'); sys.exit(time.time() - os.stat(p).st_mtime > 120)"]

CMD ["celery", "-A", "services.worker.app", "worker", "-Q", "gpu,default", "--concurrency", "1", \
     "--prefetch-multiplier", "1", "-n", "worker@%h"]
