"""The core's command-line commands: `invdpo tiny-model`, `invdpo dataset ...`, `invdpo upload`, `invdpo train`,
`invdpo evaluate`.

`build_parser()` is extended by services/cli.py with the job-client commands; the core knows nothing of HTTP.
Each command is a function taking the parsed args and returning an exit code; user errors raise `CLIError`
and are printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path


class CLIError(Exception):
    """A user-facing failure: printed as `error: <message>` with exit code 2."""


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from invdpo_core.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind=args.kind, seed=args.seed)
    pipe.save_pretrained(args.out_dir)
    print(f"wrote tiny {args.kind} pipeline to {args.out_dir}")
    return 0


def cmd_dataset_validate(args: argparse.Namespace) -> int:
    from invdpo_core.data import DatasetError, inspect_dataset

    try:
        report = inspect_dataset(
            args.uri, sample=args.sample, tie_policy=args.tie_policy, max_bad_share=args.max_bad_share
        )
    except DatasetError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # an out-of-range option
        raise CLIError(str(exc)) from None
    scope = f" (first {report.records} records only)" if report.sampled else ""
    print(f"dataset: {args.uri}: {report.format}, {report.files} file(s){scope}")
    print(f"records: {report.records} read of {report.total_records}")
    print(f"pairs: {report.pairs}")
    print(f"ties: {report.ties} ({report.ties_dropped} dropped)")
    print(f"unreadable images: {report.unreadable_images} ({report.skipped_pairs} pairs skipped)")
    if report.first_unreadable:
        print(f"first unreadable: {report.first_unreadable}")
    print("image sizes: " + ", ".join(f"{size} x{count}" for size, count in report.image_sizes.items()))
    return 0


def cmd_dataset_make_toy(args: argparse.Namespace) -> int:
    from invdpo_core.data import inspect_dataset
    from invdpo_core.toy import make_toy_dataset

    if args.pairs < 1:
        raise CLIError(f"--pairs must be >= 1, got {args.pairs}")
    if args.model_dir and not (Path(args.model_dir) / "model_index.json").is_file():
        raise CLIError(f"--model-dir {args.model_dir}: no model_index.json (not a diffusers pipeline)")
    try:
        path = make_toy_dataset(
            args.out, args.pairs, fmt=args.format, seed=args.seed, kind=args.kind, model_dir=args.model_dir
        )
    except OSError as exc:  # e.g. OUT is a file, or not writable
        raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    report = inspect_dataset(str(path))
    print(f"wrote {report.pairs} toy pairs to {path}")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from invdpo_core.storage import StorageError, is_s3, upload_dir

    if not is_s3(args.uri):
        raise CLIError(f"{args.uri}: not an s3:// URI")
    files = sum(1 for p in Path(args.dir).rglob("*") if p.is_file())
    try:
        upload_dir(args.dir, args.uri)
    except (FileNotFoundError, StorageError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    print(f"uploaded {files} file(s) from {args.dir} to {args.uri.rstrip('/')}/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json
    import signal

    from invdpo_core.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None

    from tqdm import tqdm

    from invdpo_core.checkpoint import CheckpointError
    from invdpo_core.data import DatasetError
    from invdpo_core.storage import ModelReferenceError
    from invdpo_core.train import TrainCallbacks, TrainError, train

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    bars: dict[str, tqdm] = {}

    def on_cache_progress(done: int, total: int) -> None:
        if args.json:
            return emit("cache", done=done, total=total)
        if "cache" not in bars:
            bars["cache"] = tqdm(total=total, desc="inversion cache", unit="pair", dynamic_ncols=True)
        bars["cache"].total = total
        bars["cache"].update(done - bars["cache"].n)

    def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
        if args.json:
            return emit("step", step=step, total=total, **metrics)
        if "cache" in bars:
            bars.pop("cache").close()
        if "train" not in bars:  # made at the first step, so a resumed run's ETA counts only this run's steps
            bars["train"] = tqdm(total=total, initial=step - 1, desc="train", unit="step", dynamic_ncols=True)
        bar = bars["train"]
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", implicit_acc=f"{metrics['implicit_acc']:.2f}", refresh=False)
        bar.update(step - bar.n)

    def on_skipped_pair(count: int, reason: str) -> None:
        if args.json:
            return emit("skipped", count=count, reason=reason)
        tqdm.write(f"skipped a pair with an unreadable image ({count} so far): {reason}", file=sys.stderr)

    def on_checkpoint(path: Path, step: int) -> None:
        if args.json:
            emit("checkpoint", step=step, path=str(path))

    def on_validation(step: int, images: list) -> None:
        folder = Path(config.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"step-{step:06d}-{i}.png" for i in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            image.save(path)
        if args.json:
            emit("validation", step=step, paths=[str(p) for p in paths])

    # The first Ctrl-C asks for a checkpoint and a clean stop after the current step; a second one aborts.
    stop = {"requested": False}

    def on_sigint(signum: int, frame: object) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    callbacks = TrainCallbacks(
        on_step=on_step,
        should_stop=lambda: stop["requested"],
        on_checkpoint=on_checkpoint,
        on_validation=on_validation,
        on_cache_progress=on_cache_progress,
        on_skipped_pair=on_skipped_pair,
    )
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(config, callbacks, model_cache_dir=args.model_cache_dir)
    except (ConfigError, DatasetError, ModelReferenceError, TrainError, CheckpointError, OSError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        for bar in bars.values():
            bar.close()
    if args.json:
        emit(
            "done",
            steps=result.steps,
            stopped_early=result.stopped_early,
            metrics=result.metrics,
            wall_time_s=round(result.wall_time_s, 3),
            pairs_per_s=round(result.pairs_per_s, 3),
            model_path=str(result.model_path) if result.model_path else None,
            checkpoint=str(result.checkpoint) if result.checkpoint else None,
        )
    elif result.stopped_early:
        print(f"stopped at step {result.steps}; resume with the same command (checkpoint {result.checkpoint})")
    else:
        print(
            f"trained {result.steps} steps in {result.wall_time_s:.1f} s ({result.pairs_per_s:.2f} pairs/s); "
            f"model: {result.model_path}"
        )
    return 130 if stop["requested"] else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from invdpo_core.data import DatasetError
    from invdpo_core.evaluate import EvaluationError, evaluate
    from invdpo_core.storage import ModelReferenceError

    scorers: dict[str, str] = {}
    for item in args.scorer:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--scorer {item!r}: expected NAME=PATH")
        scorers[name] = path
    try:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise CLIError(f"--prompts {args.prompts}: cannot read: {exc.strerror or exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = evaluate(
            args.model, args.base, args.pairs, prompts, out_dir=args.out, scorers=scorers, device=device,
            seed=args.seed, beta=args.beta, draws=args.draws, max_pairs=args.max_pairs,
            inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
            batch_size=args.batch_size, model_cache_dir=args.model_cache_dir,
        )  # fmt: skip
    except (EvaluationError, DatasetError, ModelReferenceError, OSError) as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    if args.json:
        print(json.dumps({**result.to_json(), "metrics": result.metrics()}, indent=2))
        return 0
    pm, level = result.pair_metrics, f"{result.confidence:.0%}"
    assert pm is not None, "--pairs is required"
    print(f"model: {result.model} ({result.adapter}) against base: {result.base}")
    print(f"held-out pairs: {pm.pairs}, {pm.draws} (t, noise) draws each, beta {pm.beta:g}")
    iv = pm.implicit_acc
    print(f"  implicit accuracy: {iv.mean:.3f} [{iv.lower:.3f}, {iv.upper:.3f}] ({level} bootstrap interval)")
    iv = pm.reward_margin
    print(f"  reward margin: {iv.mean:.4g} [{iv.lower:.4g}, {iv.upper:.4g}]")
    print(f"prompts: {result.prompts} (seeds {result.seed}..{result.seed + result.prompts - 1}, same for both)")
    for name, m in result.scorers.items():
        iv = m.win_rate
        print(
            f"  {name}: win-rate {iv.mean:.3f} [{iv.lower:.3f}, {iv.upper:.3f}] ({m.wins} wins, {m.ties} ties, "
            f"{m.losses} losses); mean score {m.base_mean:.4g} -> {m.model_mean:.4g}"
        )
    for name, reason in result.not_run.items():
        print(f"  {name}: not run ({reason})")
    print(f"grid: {result.grid} (top: base, bottom: fine-tuned)")
    print(f"wrote {Path(args.out) / 'evaluation.json'}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="invdpo", description="Inversion-DPO fine-tuning of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_cache_dir = os.environ.get("INVDPO_CACHE_DIR")
    model_cache_help = "where models from s3:// are downloaded (default $INVDPO_CACHE_DIR, else ~/.cache/invdpo)"

    p = sub.add_parser("tiny-model", help="write a tiny diffusers pipeline built from configs (no download)")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("dataset", help="check or make preference datasets")
    dataset = p.add_subparsers(dest="dataset_command", required=True)
    p = dataset.add_parser("validate", help="read a dataset as training would and report what it holds")
    p.add_argument("uri", help="Pick-a-Pic parquet file/dir/prefix or JSONL manifest, local or s3://")
    p.add_argument("--tie-policy", choices=["drop", "keep"], default="drop", help="label 0.5 pairs")
    p.add_argument("--max-bad-share", type=float, default=0.01, help="tolerated share of unreadable-image pairs")
    p.add_argument("--sample", type=int, default=None, help="check only the first N records")
    p.set_defaults(func=cmd_dataset_validate)
    p = dataset.add_parser("make-toy", help="write toy 'redder is better' pairs generated by a tiny pipeline")
    p.add_argument("out", help="output directory")
    p.add_argument("--pairs", type=int, required=True)
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["sd15", "sdxl"], default="sd15", help="tiny pipeline shape (no --model-dir)")
    p.add_argument("--model-dir", default=None, help="generate with this diffusers pipeline instead")
    p.set_defaults(func=cmd_dataset_make_toy)

    p = sub.add_parser("upload", help="copy a local directory (a model, a dataset) to an s3:// prefix")
    p.add_argument("dir", help="local directory; its files keep their relative paths")
    p.add_argument("uri", help="s3://bucket/prefix (the endpoint and credentials: the standard AWS variables)")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("train", help="fine-tune on preference pairs; resumes from the output_dir's checkpoints")
    p.add_argument("--config", default=None, help="YAML training config (fields: invdpo_core/config.py)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (dotted for nested: adapter.type=lora); repeatable",
    )
    p.add_argument("--json", action="store_true", help="one JSON line per event on stdout instead of a progress bar")
    p.add_argument("--model-cache-dir", default=model_cache_dir, help=model_cache_help)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="compare a fine-tuned model with its base: implicit accuracy, win-rates, grid")
    p.add_argument("--model", required=True, help="fine-tuned diffusers pipeline, or a LoRA output dir of train")
    p.add_argument("--base", required=True, help="the base pipeline: local dir, hub id or s3:// prefix")
    p.add_argument("--pairs", required=True, help="held-out preference pairs (parquet or JSONL, local or s3://)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a scorer's local directory: pickscore, hpsv2, hpsv2.1, clip_score, aesthetic; repeatable "
        "(the built-in toy reward always runs)",
    )
    p.add_argument("--out", default="evaluation", help="where grid.png and evaluation.json go")
    p.add_argument("--beta", type=float, default=5000.0, help="DPO temperature of the reward margin")
    p.add_argument("--draws", type=int, default=8, help="(timestep, noise) draws per pair")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance when generating")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the base UNet's native size)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs or prompts per forward")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i; also seeds the draws and bootstrap")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    p.add_argument("--model-cache-dir", default=model_cache_dir, help=model_cache_help)
    p.set_defaults(func=cmd_evaluate)
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
