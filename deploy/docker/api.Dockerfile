# syntax=docker/dockerfile:1
# The API image: FastAPI control plane and the database migrations, no torch. The API validates a job with the
# torch-free core (config, data, storage) before a GPU is spent, so it installs the package's dependencies
# minus the GPU stack (deploy/docker/service_requirements.py reads them from the package metadata).
#
# Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t invdpo-api:0.1.0 .
# Commands, the same as outside Docker:
#   API (default)  uvicorn services.api.main:app --host 0.0.0.0 --port 8000
#   migrations     python -m services.jobs.migrate

# Python 3.10: the interpreter of the worker image's Ubuntu 22.04 base, so both images run the shared
# package on the same Python (pyproject requires >= 3.10).
ARG PYTHON_IMAGE=python:3.10-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed, non-root UID/GID: Kubernetes securityContext (runAsUser 10001) and file ownership agree.
RUN groupadd --gid 10001 invdpo \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/invdpo --shell /usr/sbin/nologin invdpo \
    && python -m venv /opt/venv

WORKDIR /app

# Dependencies first, from package metadata only, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
COPY deploy/docker/service_requirements.py /tmp/service_requirements.py
RUN mkdir -p invdpo_core services \
    && touch invdpo_core/__init__.py services/__init__.py \
    && pip install --no-deps . \
    && python /tmp/service_requirements.py service > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm -rf invdpo_core services /tmp/requirements.txt /tmp/service_requirements.py

# The source also stays in /app, the working directory, so files that are not Python modules (alembic.ini,
# the migration scripts) are found exactly as in a checkout. The last command proves the image has no torch.
COPY invdpo_core ./invdpo_core
COPY services ./services
RUN pip install --no-deps --force-reinstall . \
    && rm -rf build *.egg-info \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz): /readyz also checks the database and broker, which compose and Kubernetes probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["uvicorn", "services.api.main:app", "--host", "0.0.0.0", "--port", "8000"]
