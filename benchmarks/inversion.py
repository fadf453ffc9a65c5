"""Inversion throughput: our ddim_invert loop against the raw UNet forwards it performs and against diffusers.

Three ways of doing N UNet calls on the same batch of B latents with the tiny SD1.5-shaped UNet
(invdpo_core.testing), all under inference mode, single precision:

- ours: invdpo_core.inversion.ddim_invert(...), the inversion loop (scheduler set-up, the
  DDIM update at every step, the stacked trajectory it returns);
- raw: the same N UNet forwards with the same batch and timestep labels and nothing else (the input is the clean
  latent every time): the floor any inversion loop sits on;
- diffusers: a plain DDIMInverseScheduler loop (from_config, set_timesteps, unet, scheduler.step), the loop
  tests/core/test_inversion.py checks ours against (the final latents are compared here too).

How: after a warm-up, one call of each per round, --reps rounds (the starting one rotates each round), so all three
see the same load on shared cores. Each call's CPU time (time.process_time) and wall time are recorded; CPU time is
what the call costs whatever else runs on the machine, wall time also holds other jobs' time slices. Reported: the
median times and latents per CPU second of each, and the median (quartiles) of the per-round ratio to the raw
forwards (ours/raw - 1 is the overhead of our loop; the target is judged on CPU time) and of ours to diffusers.
The load average is printed at the start and the end. One torch thread by default (on 2 shared cores, 2 OpenMP threads
ran the UNet about 10x slower).

    .venv/bin/python benchmarks/inversion.py [--batch 8] [--latent-size 8] [--inversion-steps 50] [--reps 20]

Writes benchmarks/results/inversion.json. Target (issue 8): the overhead of our loop at most 10% over raw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler
from timing import interleaved, load, quartiles  # benchmarks/timing.py, beside this script

from invdpo_core.inversion import ddim_invert, encode_prompts, inversion_grid
from invdpo_core.testing import build_tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_OVERHEAD = 0.10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="latents inverted together")
    ap.add_argument("--latent-size", type=int, default=8, help="latent side (8 = 64 px images)")
    ap.add_argument("--inversion-steps", type=int, default=50, help="N, the UNet calls per inversion")
    ap.add_argument("--reps", type=int, default=20, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "inversion.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load()
    print(load_start)

    b, s, n = args.batch, args.latent_size, args.inversion_steps
    pipe = build_tiny_pipeline("sd15", seed=0)
    unet = pipe.unet.eval().requires_grad_(False)
    config = pipe.scheduler.config
    z0 = torch.randn((b, 4, s, s), generator=torch.Generator().manual_seed(0))  # (B, 4, s, s)
    prompts = [("a red circle", "a blue square")[i % 2] for i in range(b)]
    cond = encode_prompts(pipe, prompts, device=torch.device("cpu"), resolution=8 * s)
    kwargs = cond.unet_kwargs()
    labels = [torch.full((b,), t, dtype=torch.long) for t in inversion_grid(config, n).timesteps.tolist()]

    def ours() -> torch.Tensor:
        return ddim_invert(unet, config, z0, cond, num_steps=n).latents[-1]

    @torch.inference_mode()
    def raw() -> None:
        for t in labels:
            unet(z0, t, **kwargs)

    @torch.inference_mode()
    def diffusers_loop() -> torch.Tensor:
        inv = DDIMInverseScheduler.from_config(config)
        inv.set_timesteps(n)
        x = z0
        for t in inv.timesteps:
            eps = unet(x, t, **kwargs).sample
            x = inv.step(eps, t, x).prev_sample
        return x

    max_diff = (ours() - diffusers_loop()).abs().max().item()
    print(
        f"tiny sd15 UNet, batch {b}, latents 4x{s}x{s}, N={n} UNet calls each, {args.reps} interleaved rounds after "
        f"{args.warmup} warm-up, {args.threads} thread(s); ours vs diffusers final latent max |diff| {max_diff:.2e}"
    )
    fns: dict[str, Callable[[], object]] = {"raw UNet forwards": raw, "ours (ddim_invert)": ours}
    fns["diffusers DDIMInverseScheduler loop"] = diffusers_loop
    elapsed = time.perf_counter()
    wall, cpu = interleaved(fns, args.reps, args.warmup)
    elapsed = time.perf_counter() - elapsed
    load_end = load()

    def ratios(clock: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
        return quartiles([a / b for a, b in zip(clock[num], clock[den], strict=True)])

    raw_name, ours_name, diff_name = list(fns)
    rows = {
        name: {
            "median_wall_s": statistics.median(wall[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "latents_per_s_cpu": b / statistics.median(cpu[name]),
            "latents_per_s_wall": b / statistics.median(wall[name]),
            "ratio_to_raw_cpu": ratios(cpu, name, raw_name),
            "ratio_to_raw_wall": ratios(wall, name, raw_name),
            "wall_s": wall[name],
            "cpu_s": cpu[name],
        }
        for name in fns
    }
    print(
        f"\n{'':36} {'CPU s':>7} {'latents/CPU s':>13} {'x raw, CPU (q1-q3)':>22} {'wall s':>7} "
        f"{'x raw, wall (q1-q3)':>22}"
    )
    for name, r in rows.items():
        c1, c2, c3 = r["ratio_to_raw_cpu"]
        w1, w2, w3 = r["ratio_to_raw_wall"]
        c_cell, w_cell = f"{c2:.3f} ({c1:.3f}-{c3:.3f})", f"{w2:.3f} ({w1:.3f}-{w3:.3f})"
        print(
            f"{name:36} {r['median_cpu_s']:>7.3f} {r['latents_per_s_cpu']:>13.1f} {c_cell:>22} "
            f"{r['median_wall_s']:>7.3f} {w_cell:>22}"
        )
    vs_diffusers = {"cpu": ratios(cpu, ours_name, diff_name), "wall": ratios(wall, ours_name, diff_name)}
    print(
        f"ours / diffusers loop: CPU {vs_diffusers['cpu'][1]:.3f} ({vs_diffusers['cpu'][0]:.3f}-"
        f"{vs_diffusers['cpu'][2]:.3f}), wall {vs_diffusers['wall'][1]:.3f} ({vs_diffusers['wall'][0]:.3f}-"
        f"{vs_diffusers['wall'][2]:.3f})"
    )
    overhead = rows[ours_name]["ratio_to_raw_cpu"][1] - 1
    overhead_wall = rows[ours_name]["ratio_to_raw_wall"][1] - 1
    verdict = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
    print(
        f"target: loop overhead over raw forwards <= {TARGET_OVERHEAD:.0%}: {overhead:+.1%} CPU time, {verdict} "
        f"(wall time {overhead_wall:+.1%})"
    )
    print(f"{elapsed:.0f} s of timed rounds; {load_end}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "inversion",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "load_start": load_start,
        "load_end": load_end,
        "config": {"batch": b, "latent": [4, s, s], "inversion_steps": n, "reps": args.reps, "warmup": args.warmup},
        "ours_vs_diffusers_max_abs_diff": max_diff,
        "results": rows,
        "ours_over_diffusers": vs_diffusers,
        "overhead_over_raw_cpu": overhead,
        "overhead_over_raw_wall": overhead_wall,
        "target_overhead": TARGET_OVERHEAD,
        "target_met": overhead <= TARGET_OVERHEAD,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
