"""The core's command-line commands: `invdpo tiny-model`, `invdpo dataset ...`, `invdpo train`.

`build_parser()` is extended by services/cli.py with the job-client commands; the core knows nothing of HTTP.
Each command is a function taking the parsed args and returning an exit code; user errors raise `CLIError`
and are printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class CLIError(Exception):
    """A user-facing failure: printed as `error: <message>` with exit code 2."""


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from invdpo_core.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind=args.kind, seed=args.seed)
    pipe.save_pretrained(args.out_dir)
    print(f"wrote tiny {args.kind} pipeline to {args.out_dir}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="invdpo", description="Inversion-DPO fine-tuning of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a tiny diffusers pipeline built from configs (no download)")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    return parser, sub


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
