"""`python -m services.serving`: the model server under uvicorn, settings from the environment."""

from __future__ import annotations

import os

import uvicorn

from services.serving import access
from services.serving.app import create_app
from services.serving.settings import get_settings


def main() -> None:
    settings = get_settings()
    # Progress bars are one log line per refresh in a container log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    access.configure_logging(settings.log_level)
    # One process: the models live in its memory, and batching needs every request in one queue.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


if __name__ == "__main__":
    main()
