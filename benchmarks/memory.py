"""Peak memory of one inversion_dpo all-N step against the number of inversion steps N, and of the data reader.

For each N in --n (default 10, 20, 50) and each of two ways of taking the gradient over all N points, a FRESH
Python process builds the tiny SD1.5-shaped UNet (invdpo_core.testing), B pairs of random 4 x s x s latents, and
their inversion cache (build_inverted_pairs, `paired` target), then runs ONE optimizer step (zero_grad, loss and
backward, clip at 1.0, AdamW.step) of:

- two_pass: methods.all_points_backward, the trainer's all-N path (a no-grad pass over the N points, then a
  point-by-point backward), whose memory should not grow with N;
- naive: the single-graph version, inversion_dpo_points(k=N) + points_loss + backward, which holds the
  activations of all 2*B*N UNet rows at once, as the released code does. For contrast only.

Method: peak resident memory (RSS) of the step over a baseline. After the model and the cache are built, the child
runs gc, resets the kernel's RSS high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0; the lifetime
ru_maxrss cannot be reset and would still hold the cache build's own peak), reads VmRSS as the baseline, runs the
step and reads VmHWM as the peak; the figure is peak - baseline. The child runs with glibc's
MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so every tensor of 64 KiB or more is its own mapping, returned to the
system when freed: without it the allocator keeps freed blocks resident (the cache build's activations would sit in
the baseline and the step would reuse them unseen). The latents are larger than the tests' (16x16, batch 2 by
default) so that activation memory, not allocator noise, dominates (the naive step at N=10 already adds ~200 MB);
--latent-size 32 works too but takes several minutes per N=50 process on 2 shared cores. Linux only. The step
times printed next to the memory are wall time of one step, for orientation only (benchmarks/train_step.py times).

The data-reader half of issue 8's memory question (peak RSS against the dataset size) is benchmarks/data_memory.py;
this script runs it in a subprocess and keeps its output in the JSON (skip with --skip-data-reader).

    .venv/bin/python benchmarks/memory.py [--n 10 20 50] [--batch 2] [--latent-size 16] [--skip-data-reader]

Writes benchmarks/results/memory.json. Target (issues 2 and 8): two_pass peak at N=50 within 1.25x of N=10.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from timing import load  # benchmarks/timing.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("two_pass", "naive")
TARGET_RATIO = 1.25


def _vm(field: str) -> float:
    """A field of /proc/self/status in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, n: int, batch: int, size: int) -> None:
    """One step in this (fresh) process; prints one JSON line."""
    from diffusers import DDPMScheduler

    from invdpo_core.inversion import build_inverted_pairs, encode_prompts, pair_coin
    from invdpo_core.methods import all_points_backward, inversion_dpo_points, points_loss, timestep_weights
    from invdpo_core.testing import build_tiny_pipeline

    torch.set_num_threads(1)
    device = torch.device("cpu")
    pipe = build_tiny_pipeline("sd15", seed=0)
    unet = pipe.unet.train()  # policy; at init it is also the reference that builds the cache
    gen = torch.Generator().manual_seed(0)
    z_w = torch.randn((batch, 4, size, size), generator=gen)
    z_l = torch.randn((batch, 4, size, size), generator=gen)
    prompts = [("a red circle", "a blue square")[i % 2] for i in range(batch)]
    cond = encode_prompts(pipe, prompts, device=device, resolution=8 * size)
    pairs = build_inverted_pairs(
        unet, pipe.scheduler.config, z_w, z_l, cond, target="paired", num_steps=n,
        use_winner_noise=pair_coin(0, [str(i) for i in range(batch)]),
    )  # fmt: skip
    cache_mb = sum(t.numel() * t.element_size() for t in vars(pairs).values()) / 2**20
    weights = timestep_weights(
        pairs.timesteps, DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod, "uniform"
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=0.0)

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _vm("VmRSS")
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    if mode == "two_pass":
        all_points_backward(unet, pairs, cond, weights=weights, beta=5000.0, loss_type="sigmoid")
    else:
        points = inversion_dpo_points(pairs, cond, k=n, weights=weights, generator=gen)
        loss, _ = points_loss(unet, points, beta=5000.0, loss_type="sigmoid")
        loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = _vm("VmHWM")
    print(
        json.dumps(
            {
                "mode": mode,
                "n": n,
                "baseline_mb": baseline,
                "peak_mb": peak,
                "step_mb": peak - baseline,
                "cache_mb": cache_mb,
                "step_s": seconds,
            }
        )
    )


def run_child(mode: str, n: int, batch: int, size: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", mode, str(n), "--batch", str(batch), "--latent-size", str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_reader() -> dict:
    """Run benchmarks/data_memory.py (peak RSS of iter_pairs on 1k vs 20k pairs) and keep what it printed."""
    script = Path(__file__).resolve().parent / "data_memory.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    return {"command": f"python {script.name}", "returncode": out.returncode, "stdout": out.stdout.splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 50], help="numbers of inversion steps")
    ap.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    ap.add_argument("--latent-size", type=int, default=16, help="latent side (16 = 128 px images)")
    ap.add_argument("--skip-data-reader", action="store_true", help="do not run benchmarks/data_memory.py")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.batch, args.latent_size)
        return

    load_start = load()
    print(load_start)
    b, s = args.batch, args.latent_size
    print(f"tiny sd15 UNet, batch {b} pairs, latents 4x{s}x{s}, one AdamW step per fresh process, peak RSS - baseline")
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in MODES}
    for n in args.n:  # interleaved: both modes at one N before the next N
        for mode in MODES:
            runs[mode][n] = r = run_child(mode, n, b, s)
            print(
                f"  {mode:8} N={n:<3} step +{r['step_mb']:7.1f} MB over a baseline of {r['baseline_mb']:6.1f} MB "
                f"(cache {r['cache_mb']:.1f} MB), {r['step_s']:.1f} s"
            )
    n0 = args.n[0]
    print(
        f"\n{'N':>4} {'two_pass MB':>12} {'x N=' + str(n0):>8} {'naive MB':>10} {'x N=' + str(n0):>8} "
        f"{'step s two_pass / naive':>24}"
    )
    for n in args.n:
        tp, nv = runs["two_pass"][n], runs["naive"][n]
        tp0, nv0 = runs["two_pass"][n0]["step_mb"], runs["naive"][n0]["step_mb"]
        secs = f"{tp['step_s']:.1f} / {nv['step_s']:.1f}"
        print(
            f"{n:>4} {tp['step_mb']:>12.1f} {tp['step_mb'] / tp0:>8.2f} {nv['step_mb']:>10.1f} "
            f"{nv['step_mb'] / nv0:>8.2f} {secs:>24}"
        )
    n1 = args.n[-1]
    ratio = runs["two_pass"][n1]["step_mb"] / runs["two_pass"][n0]["step_mb"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"target: two_pass peak at N={n1} within {TARGET_RATIO}x of N={n0}: {ratio:.2f}x, {verdict}")
    load_end = load()
    print(load_end)

    data = None
    if not args.skip_data_reader:
        print("\ndata reader (benchmarks/data_memory.py):")
        data = data_reader()
        for line in data["stdout"]:
            print(f"  {line}")
        print(load())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "memory",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_start": load_start,
        "load_end": load_end,
        "config": {"batch_pairs": b, "latent": [4, s, s], "target": "paired", "malloc_mmap_threshold": 65536},
        "runs": {mode: {str(n): r for n, r in by_n.items()} for mode, by_n in runs.items()},
        "two_pass_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "data_reader": data,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
