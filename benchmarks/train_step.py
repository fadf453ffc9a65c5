"""Time per optimizer step: Inversion-DPO (cached trajectory, K=1 and all N) against Diffusion-DPO, side by side.

What is timed, on the same tiny SD1.5-shaped UNet (invdpo_core.testing), batch of pairs and latent size:

- diffusion_dpo: one shared timestep and noise per pair, the frozen reference UNet forward under no_grad, the
  policy forward and backward (methods.diffusion_dpo_points + points_loss).
- inversion_dpo K=1: one point per pair read from the cached inversion, policy forward and backward, no
  reference forward (methods.inversion_dpo_points + points_loss).
- inversion_dpo all N: every one of the N inverted points, two-pass gradient (methods.all_points_backward).

Each "step" is zero_grad, the loss, backward, gradient clipping at 1.0 and AdamW.step(), as in invdpo_core/train.py
with its defaults; latents and prompt embeddings are precomputed for every method (the trainer also VAE-encodes
the images of every diffusion_dpo step, which inversion_dpo reads from its cache; that is left out here and only
widens the gap). Also timed: the one-off cost of building the inversion cache (build_inverted_pairs) for the same
batch, `paired` target (3N reference UNet calls per pair; D + 2M with the trainer's default of M = 4 kept points
per pair, inversion_points_per_pair) and an unpaired target, `x0` (4N), reported per pair in
seconds and in diffusion_dpo steps, with the number of visits per pair after which the K=1 saving repays it.

Also timed, in its own interleaved rounds (--build-reps): the trainer's cache build as it runs
(train.fill_inversion_cache with train.invert_pairs over --build-pairs pairs of a toy dataset: image loading, VAE,
text encoders, the reference's inversion), in reference UNet rows (images) per second, against raw batched no-grad
forwards of the same UNet at the build's usual batch of rows; target (issue 20): the ratio at least 0.8.

How: after a warm-up, every method runs once per round, rounds repeated --reps times (A, B, C, ..., A, B, C, ...;
the starting method rotates each round), so all methods see the same load on shared cores. Each call's CPU time
(time.process_time) and wall time are recorded: CPU time is what the call costs whatever else runs on the machine,
wall time also holds other jobs' time slices. Reported: the median times of each, and the median (and quartiles)
of the per-round ratio to the diffusion_dpo step of the same round; the target is judged on CPU time.
The load average is printed at the start and the end. Absolute times depend on the machine and its load; the
ratios are the result. One torch thread by default: on 2 cores shared with other jobs, 2 OpenMP threads ran
the UNet about 10x slower than 1 (threads spin waiting for each other).

    .venv/bin/python benchmarks/train_step.py [--batch 4] [--latent-size 8|16|32] [--inversion-steps 20] [--reps 20]
        [--build-pairs 16] [--build-reps 5]

Writes benchmarks/results/train_step.json. Target (issue 8): the K=1 step at most 0.8x the diffusion_dpo step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from timing import interleaved, load, quartiles  # benchmarks/timing.py, beside this script

from invdpo_core.config import TrainingConfig, parse_config
from invdpo_core.inversion import build_inverted_pairs, encode_prompts, inversion_grid, pair_coin
from invdpo_core.inversion_cache import InversionCache, kept_points
from invdpo_core.methods import (
    all_points_backward,
    diffusion_dpo_points,
    inversion_dpo_points,
    points_loss,
    timestep_weights,
)
from invdpo_core.pipeline import load_pipeline
from invdpo_core.testing import build_tiny_pipeline
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import (
    STORAGE_DTYPES,
    Position,
    fill_inversion_cache,
    invert_pairs,
    make_accelerator,
    prepare_models,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")
BETA = 5000.0
TARGET_K1_RATIO = 0.8
TARGET_BUILD_RATIO = 0.8  # issue 20: the cache build at >= 0.8x the speed of raw batched UNet forwards
KEPT_POINTS = TrainingConfig.model_fields["inversion_points_per_pair"].default  # the trainer's M


def build_throughput(
    pipe: Any, b: int, s: int, n: int, pairs: int, reps: int, warmup: int, tmp: Path
) -> dict[str, Any]:
    """The trainer's cache build (train.fill_inversion_cache with train.invert_pairs: image loading, VAE, text
    encoders, the reference's inversion) over `pairs` pairs of a toy dataset, in UNet forwards (rows: images) per
    second, against raw batched no-grad forwards of the same reference at the build's own batch of rows,
    interleaved round by round."""
    model_dir = tmp / "model"
    pipe.save_pretrained(model_dir)
    dataset = make_toy_dataset(tmp / "data", pairs, model_dir=model_dir)
    config = parse_config(
        {
            "base_model": str(model_dir), "dataset": str(dataset), "resolution": 8 * s, "inversion_steps": n,
            "batch_size": b, "max_steps": pairs // b, "output_dir": str(tmp / "run"),
        }
    )  # fmt: skip
    accelerator = make_accelerator(config)
    loaded = load_pipeline(str(model_dir))
    _, reference = prepare_models(loaded, config, DEVICE, torch.float32)
    ref = reference.frozen_copy
    assert ref is not None, "a full fine-tune has a frozen copy"
    calls: list[int] = []  # rows of every reference forward
    forward = ref.forward

    def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(x.shape[0])
        return forward(x, *args, **kwargs)

    ref.forward = counted  # type: ignore[method-assign]
    inv = inversion_grid(loaded.scheduler.config, n)

    def build() -> None:
        cache = InversionCache(
            "memory", "", partial(invert_pairs, loaded, reference, config, accelerator, None), identity="",
            target=config.inversion_target, dtype=STORAGE_DTYPES[config.inversion_cache_dtype],
            points_per_pair=config.inversion_points_per_pair, seed=config.seed, grid=inv.timesteps,
            abar=inv.alphas_cumprod[inv.timesteps], device=DEVICE,
        )  # fmt: skip
        fill_inversion_cache(cache, config, Position(), accelerator, None)
        assert cache.inverted == pairs, cache.inverted

    calls.clear()
    build()
    rows_per_build, calls_per_build = sum(calls), len(calls)
    row_batch = max(set(calls), key=calls.count)  # the build's usual forward: 2B rows (winners and losers)
    x = torch.randn((row_batch, 4, s, s), generator=torch.Generator().manual_seed(0))
    t = torch.full((row_batch,), 500)
    hidden = encode_prompts(loaded, ["a red circle"] * row_batch, device=DEVICE, resolution=8 * s).hidden_states
    raw_calls = max(1, rows_per_build // row_batch)  # about the build's work

    def raw() -> None:
        with torch.inference_mode():
            for _ in range(raw_calls):
                ref(x, t, encoder_hidden_states=hidden)

    calls.clear()
    wall, cpu = interleaved({"build": build, "raw": raw}, reps, warmup)
    per_round = {
        kind: [
            (rows_per_build / bt) / (raw_calls * row_batch / rt)
            for bt, rt in zip(times["build"], times["raw"], strict=True)
        ]
        for kind, times in (("cpu", cpu), ("wall", wall))
    }
    return {
        "pairs": pairs,
        "unet_rows_per_build": rows_per_build,
        "unet_calls_per_build": calls_per_build,
        "raw_batch_rows": row_batch,
        "raw_calls_per_round": raw_calls,
        "build_rows_per_cpu_s": rows_per_build / statistics.median(cpu["build"]),
        "raw_rows_per_cpu_s": raw_calls * row_batch / statistics.median(cpu["raw"]),
        "ratio_cpu": quartiles(per_round["cpu"]),
        "ratio_wall": quartiles(per_round["wall"]),
        "build_cpu_s": cpu["build"],
        "raw_cpu_s": cpu["raw"],
        "build_wall_s": wall["build"],
        "raw_wall_s": wall["raw"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--latent-size", type=int, default=8, help="latent side (8 = 64 px images); try 16 or 32")
    ap.add_argument("--inversion-steps", type=int, default=20, help="N (the trainer's default is 20)")
    ap.add_argument("--reps", type=int, default=20, help="interleaved rounds (>= 20 for the README figures)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--build-pairs", type=int, default=16, help="P pairs of the timed cache build")
    ap.add_argument("--build-reps", type=int, default=5, help="interleaved rounds of cache build and raw forwards")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load()
    print(load_start)

    # --- the model, the data and the cache ---------------------------------------------------------------------
    b, s, n = args.batch, args.latent_size, args.inversion_steps
    pipe = build_tiny_pipeline("sd15", seed=0)
    unet = pipe.unet.train()  # the policy, fully fine-tuned
    ref = copy.deepcopy(unet).eval().requires_grad_(False)  # the frozen reference
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    z_w = torch.randn((b, 4, s, s), generator=gen)  # (B, 4, s, s) winners
    z_l = torch.randn((b, 4, s, s), generator=gen)  # (B, 4, s, s) losers
    prompts = [("a red circle", "a blue square")[i % 2] for i in range(b)]
    cond = encode_prompts(pipe, prompts, device=DEVICE, resolution=8 * s)
    coin = pair_coin(0, [str(i) for i in range(b)])

    def build_cache(target: str, keep: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        return build_inverted_pairs(
            ref, pipe.scheduler.config, z_w, z_l, cond, target=target, num_steps=n, use_winner_noise=coin, keep=keep
        )

    # The trainer's default: each pair keeps M of the N points, inverted up to the deepest D (D + 2M calls).
    keep_m = torch.stack([kept_points(0, str(i), n, KEPT_POINTS) for i in range(b)])

    pairs = build_cache("paired")
    weights = timestep_weights(pairs.timesteps, noise_scheduler.alphas_cumprod, "uniform")  # (N,)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=0.0)
    params = [p for p in unet.parameters() if p.requires_grad]

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    def diffusion_dpo() -> None:
        optimizer.zero_grad(set_to_none=True)
        points = diffusion_dpo_points(ref, noise_scheduler, z_w, z_l, cond, generator=gen)
        loss, _ = points_loss(unet, points, beta=BETA, loss_type="sigmoid")
        loss.backward()
        optimizer_step()

    def inversion_k1() -> None:
        optimizer.zero_grad(set_to_none=True)
        points = inversion_dpo_points(pairs, cond, k=1, weights=weights, generator=gen)
        loss, _ = points_loss(unet, points, beta=BETA, loss_type="sigmoid")
        loss.backward()
        optimizer_step()

    def inversion_all_n() -> None:
        optimizer.zero_grad(set_to_none=True)
        all_points_backward(unet, pairs, cond, weights=weights, beta=BETA, loss_type="sigmoid")
        optimizer_step()

    fns: dict[str, Callable[[], object]] = {
        "diffusion_dpo": diffusion_dpo,
        "inversion_dpo K=1": inversion_k1,
        f"inversion_dpo all N={n}": inversion_all_n,
        "cache build, paired (3N calls/pair)": lambda: build_cache("paired"),
        "cache build, x0 (4N calls/pair)": lambda: build_cache("x0"),
        f"cache build, paired M={KEPT_POINTS} (N+2M calls/pair)": lambda: build_cache("paired", keep_m),
    }
    print(
        f"tiny sd15 UNet ({sum(p.numel() for p in params) / 1e6:.2f} M params), batch {b} pairs, latents 4x{s}x{s} "
        f"({8 * s} px), N={n}, {args.reps} interleaved rounds after {args.warmup} warm-up, {args.threads} thread(s)"
    )
    elapsed = time.perf_counter()
    wall, cpu = interleaved(fns, args.reps, args.warmup)
    elapsed = time.perf_counter() - elapsed
    load_end = load()

    # --- report ------------------------------------------------------------------------------------------------
    rows: dict[str, dict[str, Any]] = {}
    for name in fns:
        per = b if name.startswith("cache") else 1  # a cache build is reported per pair, a step per batch of B
        rows[name] = {
            "unit": "pair" if per == b else f"step of {b} pairs",
            "median_cpu_s": statistics.median(cpu[name]) / per,
            "median_wall_s": statistics.median(wall[name]) / per,
            "pairs_per_cpu_s": None if per == b else b / statistics.median(cpu[name]),
            "pairs_per_wall_s": None if per == b else b / statistics.median(wall[name]),
            # Per round: this call (per pair for the cache) over the diffusion_dpo step of the same round.
            "ratio_to_diffusion_dpo_step_cpu": quartiles(
                [t / per / d for t, d in zip(cpu[name], cpu["diffusion_dpo"], strict=True)]
            ),
            "ratio_to_diffusion_dpo_step_wall": quartiles(
                [t / per / d for t, d in zip(wall[name], wall["diffusion_dpo"], strict=True)]
            ),
            "cpu_s": cpu[name],
            "wall_s": wall[name],
        }
    print(
        f"\n{'':36} {'CPU s':>11} {'pairs/CPU s':>11} {'x diff_dpo step, CPU':>22} {'wall s':>7} "
        f"{'x diff_dpo step, wall':>22}"
    )
    for name, r in rows.items():
        c1, c2, c3 = r["ratio_to_diffusion_dpo_step_cpu"]
        w1, w2, w3 = r["ratio_to_diffusion_dpo_step_wall"]
        secs = f"{r['median_cpu_s']:.4f}" + ("/pair" if r["unit"] == "pair" else "")
        pps = "-" if r["pairs_per_cpu_s"] is None else f"{r['pairs_per_cpu_s']:.1f}"
        c_cell, w_cell = f"{c2:.3f} ({c1:.3f}-{c3:.3f})", f"{w2:.3f} ({w1:.3f}-{w3:.3f})"
        print(f"{name:36} {secs:>11} {pps:>11} {c_cell:>22} {r['median_wall_s']:>7.3f} {w_cell:>22}")
    all_n = rows[f"inversion_dpo all N={n}"]["ratio_to_diffusion_dpo_step_cpu"][1]
    print(f"all N={n}: {all_n / n:.3f}x a diffusion_dpo step per inverted point (N no-grad forwards + N with grad)")
    k1 = rows["inversion_dpo K=1"]["ratio_to_diffusion_dpo_step_cpu"][1]
    k1_wall = rows["inversion_dpo K=1"]["ratio_to_diffusion_dpo_step_wall"][1]
    verdict = "met" if k1 <= TARGET_K1_RATIO else "MISSED"
    print(
        f"target: K=1 step <= {TARGET_K1_RATIO}x diffusion_dpo step: {k1:.3f}x CPU time, {verdict} "
        f"(wall time {k1_wall:.3f}x)"
    )
    saving = rows["diffusion_dpo"]["median_cpu_s"] - rows["inversion_dpo K=1"]["median_cpu_s"]  # per step of B
    payback = {}
    for name in (
        "cache build, paired (3N calls/pair)",
        "cache build, x0 (4N calls/pair)",
        f"cache build, paired M={KEPT_POINTS} (N+2M calls/pair)",
    ):
        # A pair's cache costs t_cache; each visit of that pair saves (t_diff - t_k1) / B of CPU time.
        payback[name] = rows[name]["median_cpu_s"] / (saving / b) if saving > 0 else None
        visits = "never (no saving)" if payback[name] is None else f"{payback[name]:.1f} visits of each pair"
        print(f"{name}: repaid by the K=1 saving after {visits} (epochs)")
    print(f"{elapsed:.0f} s of timed rounds; {load_end}")

    with tempfile.TemporaryDirectory() as tmp:
        build = build_throughput(pipe, b, s, n, args.build_pairs, args.build_reps, 1, Path(tmp))
    c1, c2, c3 = build["ratio_cpu"]
    verdict = "met" if c2 >= TARGET_BUILD_RATIO else "MISSED"
    print(
        f"cache build ({build['pairs']} pairs, batch {b}: {build['unet_rows_per_build']} UNet rows in "
        f"{build['unet_calls_per_build']} calls, data + VAE + text encoders included): "
        f"{build['build_rows_per_cpu_s']:.1f} rows/CPU s vs raw batched forwards of {build['raw_batch_rows']} rows "
        f"{build['raw_rows_per_cpu_s']:.1f} rows/CPU s: ratio {c2:.3f} ({c1:.3f}-{c3:.3f}) CPU, "
        f"{build['ratio_wall'][1]:.3f} wall; target >= {TARGET_BUILD_RATIO}: {verdict}"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "train_step",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "load_start": load_start,
        "load_end": load_end,
        "config": {
            "batch_pairs": b,
            "latent": [4, s, s],
            "inversion_steps": n,
            "reps": args.reps,
            "warmup": args.warmup,
            "beta": BETA,
            "optimizer": "AdamW lr 1e-5, clip 1.0",
        },
        "results": rows,
        "k1_target": TARGET_K1_RATIO,
        "k1_ratio_median_cpu": k1,
        "k1_ratio_median_wall": k1_wall,
        "k1_target_met": k1 <= TARGET_K1_RATIO,
        "cache_payback_visits": payback,
        "cache_build_throughput": build,
        "build_ratio_target": TARGET_BUILD_RATIO,
        "build_ratio_median_cpu": c2,
        "build_ratio_target_met": c2 >= TARGET_BUILD_RATIO,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
