"""Total compute to a fixed reward: what each method spends to reach the alignment study's threshold, cache included.

The alignment study (benchmarks/alignment.py) says after how many optimizer steps each method's samples first reach
a fixed reward (half of Diffusion-DPO's gain, evaluated every 40 steps; mean over the training seeds that reached
it). This script measures what one step and one cache entry cost in the same world (the tiny SD1.5-shaped UNet,
4x8x8 latents, 8 pairs per step, AdamW, no clipping; 20-step inversion for the cached targets, InPO's released
10-step grid and eta 0.1) and multiplies:

    total(V) = S * step + (8 S / V) * cache_per_pair

where S is the steps to the threshold and V the visits per pair: a run that reaches the threshold in S steps while
visiting each pair V times trains on 8S/V distinct pairs, and each of them must be inverted once. Methods without
a cache (diffusion_dpo, inpo) cost the same at every V.

Two units:
- UNet-forward equivalents, counted, not assumed: a forward pre-hook on every UNet counts the rows it is called
  on; a row forwarded without grad counts 1, with grad 3 (its forward and a backward taken as 2 forwards, the usual
  convention). InPO's count varies with its sampled timestep, so it is the mean over every timed step (its exact
  expectation is printed beside it).
- CPU seconds (time.process_time, this process), timed interleaved on shared cores (benchmarks/timing.py); the mean
  per call, since totals add means.

    .venv/bin/python benchmarks/total_compute.py [--study RESULTS.json ...] [--reps 20]

--costs takes the per-call costs from an earlier output of this script instead of timing again (the costs do not
depend on the study; the study can then be re-read when more of it has run).
--study takes one or more outputs of alignment.py (parts run separately, e.g. `--runs inpo`); the threshold is the
first one's; the seeds of a run are gathered over the files (a seed found in several files is taken from the last).

Writes benchmarks/results/total_compute.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMInverseScheduler
from timing import interleaved, load  # benchmarks/timing.py, beside this script

from invdpo_core.config import TrainingConfig
from invdpo_core.inversion import build_inverted_pairs, encode_prompts, pair_coin
from invdpo_core.inversion_cache import kept_points
from invdpo_core.methods import (
    diffusion_dpo_points,
    inpo_points,
    inversion_dpo_points,
    points_loss,
    with_reference_errors,
)
from invdpo_core.testing import build_tiny_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")
PAIRS_PER_STEP = 8  # the study's
BETA = 1000.0
VISITS = (1, 5, 20)
KEPT = TrainingConfig.model_fields["inversion_points_per_pair"].default  # the trainer's M kept points per pair
# Study run name -> (what one step costs, which cache it builds first or None).
# The study's inversion runs keep the trainer's default M = 4 points per pair (D + 2M reference calls for paired,
# 2D + 2M for the others, D the pair's deepest kept point: the inversion stops there); "paired fp32 all N points"
# (alignment.py's fixes) keeps all N (3N). The labels say N, as the results files name them.
STUDY_RUNS = {
    "diffusion_dpo": ("diffusion_dpo step", None),
    "inversion paired": ("inversion_dpo K=1 step", f"cache paired M={KEPT} (N+2M)"),
    "paired fp32 all N points": ("inversion_dpo K=1 step", "cache paired (3N)"),
    "inversion x0": ("inversion_dpo K=1 step", f"cache x0 M={KEPT} (2N+2M)"),
    "inversion step": ("inversion_dpo K=1 step", f"cache x0 M={KEPT} (2N+2M)"),  # same calls as x0
    "inversion reference": ("inversion_dpo K=1 step", f"cache x0 M={KEPT} (2N+2M)"),
    "inpo": ("inpo step (N=10, eta 0.1)", None),
}


class RowCounter:
    """Rows forwarded through the hooked UNets, split by whether autograd records them."""

    def __init__(self, *unets: torch.nn.Module) -> None:
        self.grad = self.no_grad = 0
        for unet in unets:
            unet.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self.grad += args[0].shape[0]
        else:
            self.no_grad += args[0].shape[0]

    def equivalents(self) -> float:
        return self.no_grad + 3 * self.grad


def expected_inpo_inversion_steps(scheduler_config, n: int) -> float:  # type: ignore[no-untyped-def]
    """E[m]: the mean number of grid steps below t ~ U{0..T-1}, the inversion steps per image of an InPO step."""
    inv = DDIMInverseScheduler.from_config(scheduler_config)
    inv.set_timesteps(n)
    t_all = torch.arange(inv.config.num_train_timesteps)
    return (inv.timesteps[None, :] < t_all[:, None]).sum(dim=1).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--study", type=Path, nargs="+", default=[RESULTS / "alignment_main.json"], help="alignment.py outputs"
    )
    ap.add_argument("--reps", type=int, default=20, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "total_compute.json")
    ap.add_argument("--costs", type=Path, default=None, help="reuse per_call from an earlier output; no timing")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the study runs
    studies = [json.loads(path.read_text()) for path in args.study]
    threshold = studies[0].get("reach_threshold")
    if threshold is None:
        raise SystemExit(f"{args.study[0]} has no reach threshold: run benchmarks/alignment.py --quick first")
    # Steps to the threshold per run on the data pairs, from each seed's reward curve; later files override.
    by_seed: dict[tuple[str, int], dict] = {}
    for path, study in zip(args.study, studies, strict=True):
        for r in study["runs"]:
            if r["pairs"] == "data":
                by_seed[(r["run"], r["seed"])] = r | {"file": path.name}
    curves: dict[str, list[dict]] = {}
    for (run, _), r in sorted(by_seed.items()):
        curves.setdefault(run, []).append(r)
    reach = {}
    for run, seeds in curves.items():
        hits = [next((s for s, v in zip(r["steps"], r["reward"], strict=True) if v >= threshold), None) for r in seeds]
        reached = [h for h in hits if h is not None]
        reach[run] = {
            "reached": f"{len(reached)}/{len(seeds)}",
            "steps_mean": statistics.mean(reached) if reached else None,
            "file": seeds[0]["file"],
        }
    load_start = load()
    print(load_start)

    # --- the study's world: model, a batch of 8 pairs, the caches -----------------------------------------------
    b, n_cached, n_inpo = PAIRS_PER_STEP, 20, 10
    pipe = build_tiny_pipeline("sd15", seed=0)
    policy = pipe.unet.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    scheduler = pipe.scheduler
    gen = torch.Generator().manual_seed(0)
    z_w, z_l = torch.randn((b, 4, 8, 8), generator=gen), torch.randn((b, 4, 8, 8), generator=gen)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    cond = encode_prompts(pipe, [prompts[i % 4] for i in range(b)], device=DEVICE, resolution=64)
    coin = pair_coin(0, [str(i) for i in range(b)])

    keep = torch.stack([kept_points(0, str(i), n_cached, KEPT) for i in range(b)])  # (B, M)

    def cache(target: str, kept: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        return build_inverted_pairs(
            ref, scheduler.config, z_w, z_l, cond, target=target, num_steps=n_cached, use_winner_noise=coin, keep=kept
        )

    pairs = cache("paired")
    weights = torch.ones(n_cached)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)

    def step(make_points: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = points_loss(policy, make_points(), beta=BETA, loss_type="sigmoid")  # type: ignore[arg-type]
            loss.backward()
            optimizer.step()

        return run

    fns: dict[str, Callable[[], object]] = {
        "diffusion_dpo step": step(lambda: diffusion_dpo_points(ref, scheduler, z_w, z_l, cond, generator=gen)),
        "inversion_dpo K=1 step": step(lambda: inversion_dpo_points(pairs, cond, k=1, weights=weights, generator=gen)),
        "inpo step (N=10, eta 0.1)": step(
            lambda: with_reference_errors(
                ref, inpo_points(policy, scheduler, z_w, z_l, cond, inversion_steps=n_inpo, eta=0.1, generator=gen)
            )
        ),
        "cache paired (3N)": lambda: cache("paired"),
        "cache x0 (4N)": lambda: cache("x0"),
        f"cache paired M={KEPT} (N+2M)": lambda: cache("paired", keep),
        f"cache x0 M={KEPT} (2N+2M)": lambda: cache("x0", keep),
    }
    # Count UNet rows per call: wrap each function so the counter's change is attributed to it.
    counter = RowCounter(policy, ref)
    counts: dict[str, list[float]] = {name: [] for name in fns}

    def counted(name: str, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            before = counter.equivalents()
            fn()
            counts[name].append(counter.equivalents() - before)

        return run

    elapsed = time.perf_counter()
    if args.costs is None:
        _, cpu = interleaved({name: counted(name, fn) for name, fn in fns.items()}, args.reps, args.warmup)
        per_call = {}
        for name in fns:
            per = b if name.startswith("cache") else 1  # caches reported per pair, steps per step of 8 pairs
            per_call[name] = {
                "unit": "pair" if per == b else f"step of {b} pairs",
                "unet_equivalents": statistics.mean(counts[name][args.warmup :]) / per,
                "cpu_s": statistics.mean(cpu[name]) / per,
            }
    else:
        earlier = json.loads(args.costs.read_text())
        per_call, load_start = earlier["per_call"], earlier["load_start"]
        print(f"per-call costs from {args.costs} (measured under {load_start})")
    elapsed = time.perf_counter() - elapsed
    load_end = load()
    m = expected_inpo_inversion_steps(scheduler.config, n_inpo)
    inpo_expected = b * (2 * m + 2 + 2 * 3)  # inversion (no grad) + reference + policy with grad, per step
    print("\nper call (mean of the interleaved rounds; UNet-forward equivalents: no-grad row 1, grad row 3):")
    for name, c in per_call.items():
        print(f"  {name:28s} {c['unet_equivalents']:8.1f} UNet eq  {c['cpu_s']:.4f} CPU s  per {c['unit']}")
    inpo_measured = per_call["inpo step (N=10, eta 0.1)"]["unet_equivalents"]
    print(f"  InPO: E[inversion steps per image] = {m:.2f} of {n_inpo}; expected {inpo_expected:.1f} UNet eq per step")

    # --- totals to the study's threshold -----------------------------------------------------------------------
    print(
        f"\nto reach reward {threshold:+.3f} (half of diffusion_dpo's gain in {args.study[0].name}; rewards evaluated "
        f"every 40 steps), {b} pairs per step; totals at {', '.join(map(str, VISITS))} visits per pair"
    )
    header = " ".join(f"{'V=' + str(v):>16s}" for v in VISITS)
    print(f"{'run':22s} {'reached':>7s} {'steps':>5s}   UNet eq (x diffusion_dpo)      {header}")
    rows = {}
    dpo = None
    for run, (step_name, cache_name) in STUDY_RUNS.items():
        r = reach.get(run)
        if r is None:
            continue
        if r["steps_mean"] is None:
            rows[run] = {"reached": r["reached"], "steps": None, "from": r["file"]}
            continue
        s = r["steps_mean"]
        totals = {}
        for v in VISITS:
            pairs_inverted = b * s / v
            eq = s * per_call[step_name]["unet_equivalents"]
            cpu_s = s * per_call[step_name]["cpu_s"]
            if cache_name is not None:
                eq += pairs_inverted * per_call[cache_name]["unet_equivalents"]
                cpu_s += pairs_inverted * per_call[cache_name]["cpu_s"]
            totals[v] = {"unet_equivalents": eq, "cpu_s": cpu_s}
        if run == "diffusion_dpo":
            dpo = totals
        rows[run] = {
            "reached": r["reached"],
            "steps": s,
            "from": r["file"],
            "step": step_name,
            "cache": cache_name,
            "totals": totals,
        }
    for run, row in rows.items():
        if row["steps"] is None:
            print(f"{run:22s} {row['reached']:>7s} {'-':>5s}   never reached in the study's 200 steps ({row['from']})")
            continue
        for unit, fmt in (("unet_equivalents", "{:9.0f}"), ("cpu_s", "{:9.2f}")):
            cells = []
            for v in VISITS:
                value = row["totals"][v][unit]
                ratio = value / dpo[v][unit] if dpo else float("nan")
                row["totals"][v][f"{unit}_x_diffusion_dpo"] = ratio
                cells.append(f"{fmt.format(value)} ({ratio:4.2f}x)")
            label = "UNet eq" if unit == "unet_equivalents" else "CPU s"
            first = f"{run:22s} {row['reached']:>7s} {row['steps']:5.0f}" if unit == "unet_equivalents" else " " * 36
            source = f"  ({row['from']})" if unit == "unet_equivalents" else ""
            print(f"{first}   {label:8s} {' '.join(f'{c:>16s}' for c in cells)}{source}")
    print(f"{elapsed:.0f} s of timed rounds; {load_end}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "total_compute",
        "study": [path.name for path in args.study],
        "threshold": threshold,
        "load_start": load_start,
        "load_end": load_end,
        "config": {
            "pairs_per_step": b,
            "inversion_steps_cached": n_cached,
            "inpo_inversion_steps": n_inpo,
            "inpo_eta": 0.1,
            "reps": args.reps,
            "equivalents": "no-grad row 1, grad row 3",
        },
        "per_call": per_call,
        "inpo_expected_inversion_steps_per_image": m,
        "inpo_expected_unet_equivalents_per_step": inpo_expected,
        "inpo_measured_unet_equivalents_per_step": inpo_measured,
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
