# syntax=docker/dockerfile:1
# The model server image: the champions of registered models behind the OpenAI Images API, on port 8080.
#
# Build from the repository root (CUDA, the default):
#   docker build -f deploy/docker/serving.Dockerfile -t invdpo-serving:0.1.0 .
# CPU-only build (what docker-compose.cpu.yml does):
#   docker build -f deploy/docker/serving.Dockerfile --build-arg BASE_IMAGE=ubuntu:22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t invdpo-serving:cpu .
# Command, the same as outside Docker:
#   python -m services.serving

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
    && mkdir -p /home/invdpo/.cache \
    && chown -R 10001:10001 /home/invdpo \
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

EXPOSE 8080

# Alive, not ready: /healthz answers while models load (Kubernetes reads /readyz to send traffic).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["python", "-m", "services.serving"]
