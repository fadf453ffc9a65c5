"""The `invdpo` command: the core's commands plus the job-API client (`invdpo jobs ...`, `invdpo models ...`)."""

from __future__ import annotations

import sys

from invdpo_core.cli import build_parser, run
from services.client import add_client_commands


def main(argv: list[str] | None = None) -> int:
    parser, sub = build_parser()
    add_client_commands(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
