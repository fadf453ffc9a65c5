"""`python -m services.serving`: the model server under uvicorn, settings from the environment."""

from __future__ import annotations

import uvicorn

from services.serving import access
from services.serving.app import create_app
from services.serving.settings import get_settings


def main() -> None:
    settings = get_settings()
    access.configure_logging(settings.log_level)
    # One process: the models live in its memory, and batching needs every request in one queue.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


if __name__ == "__main__":
    main()
