"""The arbiter: which formulation of Inversion-DPO (and InPO) aligns a model, measured against Diffusion-DPO.

A tiny text-conditioned UNet (invdpo_core.testing) is pretrained for a few minutes on a synthetic distribution of
4x8x8 latents (one blob per prompt, random channel amplitudes). The reward is computable: mean of latent channel 0
minus mean of channel 1. Preference pairs are made two ways (sampled from the base; drawn from the data), labelled
by the reward, and every method and target is trained from the same base on the same pairs for the same budget,
over several seeds, with the label-swap control (a method that really learns the preference must move the reward
the other way when the labels are swapped). Reward and win-rate against the base are measured on samples from
fixed seeds every few steps.

    python benchmarks/alignment.py            # full study (about 30-40 min on 2 cores)
    python benchmarks/alignment.py --quick    # the main table only (under 15 min on 2 cores)
    python benchmarks/alignment.py --quick --runs inpo,"inpo swap"   # some runs only (parts can run in parallel)
    python benchmarks/alignment.py --quick --prediction v_prediction # the same world, a v-prediction base

Writes benchmarks/results/alignment.json and alignment.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from invdpo_core.config import TrainingConfig, scheduler_as_written
from invdpo_core.data import PreferencePair
from invdpo_core.inversion import (
    Conditioning,
    InvertedPairs,
    build_inverted_pairs,
    ddim_sample,
    encode_prompts,
    inversion_grid,
    pair_coin,
)
from invdpo_core.inversion_cache import InversionCache
from invdpo_core.losses import dpo_loss
from invdpo_core.methods import (
    diffusion_dpo_points,
    inpo_points,
    inversion_dpo_points,
    points_loss,
    policy_errors,
    timestep_weights,
    with_reference_errors,
)
from invdpo_core.testing import build_tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache"
DEVICE = torch.device("cpu")
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- the synthetic world
def sample_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents (n, 4, 8, 8) and their prompt index: a Gaussian blob at a per-prompt place, random amplitudes."""
    prompt = torch.randint(0, len(PROMPTS), (n,), generator=gen)
    centers = torch.tensor([[2.0, 2.0], [2.0, 5.0], [5.0, 2.0], [5.0, 5.0]])[prompt]  # (n, 2)
    centers = centers + 0.5 * torch.randn((n, 2), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    d2 = (yy[None] - centers[:, 0, None, None]) ** 2 + (xx[None] - centers[:, 1, None, None]) ** 2
    blob = torch.exp(-d2 / 3.0)  # (n, 8, 8)
    base_amp = torch.tensor([[1.0, 1.0, 0.5, -0.5], [0.5, 1.5, -0.5, 0.5], [1.5, 0.5, 0.5, 0.5], [1.0, 1.0, -1.0, 0]])
    amp = base_amp[prompt] + 0.6 * torch.randn((n, 4), generator=gen)  # (n, 4)
    z = 2.0 * amp[:, :, None, None] * blob[:, None] + 0.05 * torch.randn((n, 4, 8, 8), generator=gen)
    return z, prompt


def reward(z: torch.Tensor) -> torch.Tensor:
    """The computable preference: mean of channel 0 minus mean of channel 1, (n,)."""
    return z[:, 0].mean(dim=(1, 2)) - z[:, 1].mean(dim=(1, 2))


def reward_b(z: torch.Tensor) -> torch.Tensor:
    """A second, different reward kept aside as a held-out check: mean of channel 2 (brightness of one colour)."""
    return z[:, 2].mean(dim=(1, 2)) * 2


# ---------------------------------------------------------------- base model
@dataclass
class World:
    unet: torch.nn.Module
    scheduler: object
    cond_table: Conditioning  # one row per prompt
    uncond: Conditioning  # the empty prompt, for guided inversion
    eval_noise: torch.Tensor  # (E, 4, 8, 8) fixed sampling seeds
    eval_prompt: torch.Tensor  # (E,)
    sample_steps: int = 20


def pretrain_base(steps: int, seed: int = 0, prediction: str = "epsilon") -> World:
    """The base: pretrained to predict the noise, or (prediction v_prediction, as SD2.x-768) v."""
    from diffusers import DDIMScheduler

    pipe = build_tiny_pipeline("sd15", seed=seed)
    cond_table = encode_prompts(pipe, PROMPTS, device=DEVICE, resolution=64)
    unet = pipe.unet
    written = scheduler_as_written(pipe.scheduler.config)  # a changed key must not be dropped as a class default
    scheduler = DDIMScheduler.from_config({**written, "prediction_type": prediction})
    suffix = "" if prediction == "epsilon" else f"_{prediction}"
    path = CACHE / f"alignment_base_{steps}_{seed}{suffix}.pt"
    if path.exists():
        unet.load_state_dict(torch.load(path))
        print(f"loaded pretrained base from {path}")
    else:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        start = time.time()
        for step in range(steps):
            z, p = sample_data(64, gen)
            t = torch.randint(0, 1000, (64,), generator=gen)
            noise = torch.randn(z.shape, generator=gen)
            pred = unet(scheduler.add_noise(z, noise, t), t, **cond_table.index(p).unet_kwargs()).sample
            target = noise if prediction == "epsilon" else scheduler.get_velocity(z, noise, t)
            loss = (pred - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 500 == 0 or step == steps - 1:
                print(f"pretrain step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
        CACHE.mkdir(exist_ok=True)
        torch.save(unet.state_dict(), path)
    unet.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(1234)
    e = 64
    uncond = encode_prompts(pipe, [""], device=DEVICE, resolution=64)
    noise = torch.randn((e, 4, 8, 8), generator=gen)
    return World(unet, scheduler, cond_table, uncond, noise, torch.arange(e) % len(PROMPTS))


@torch.no_grad()
def generate(world: World, unet: torch.nn.Module, noise: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    return ddim_sample(
        unet, world.scheduler.config, noise, world.cond_table.index(prompt), num_steps=world.sample_steps
    )


# ---------------------------------------------------------------- preference pairs
@dataclass
class Pairs:
    z_w: torch.Tensor
    z_l: torch.Tensor
    prompt: torch.Tensor
    source: str


def make_pairs(world: World, source: str, n: int, reward_fn=reward, seed: int = 7) -> Pairs:
    gen = torch.Generator().manual_seed(seed)
    if source == "data":
        a, p = sample_data(n, gen)
        # Same prompt for both images of a pair: draw a second set and re-draw until the prompts match.
        b = torch.empty_like(a)
        for i in range(n):
            while True:
                z, q = sample_data(1, gen)
                if q.item() == p[i].item():
                    b[i] = z[0]
                    break
    else:  # sampled from the base: two seeds per prompt
        p = torch.randint(0, len(PROMPTS), (n,), generator=gen)
        a = generate(world, world.unet, torch.randn((n, 4, 8, 8), generator=gen), p)
        b = generate(world, world.unet, torch.randn((n, 4, 8, 8), generator=gen), p)
    a_wins = (reward_fn(a) > reward_fn(b)).view(n, 1, 1, 1)
    return Pairs(torch.where(a_wins, a, b), torch.where(a_wins, b, a), p, source)


# ---------------------------------------------------------------- one training run
@dataclass
class Run:
    name: str
    method: str  # diffusion_dpo | inversion_dpo | diffusion_dpo_unshared | inpo
    target: str = "-"
    swap: bool = False
    k: int = 1
    beta: float = 1000.0
    weighting: str = "uniform"
    guidance: float = 1.0
    inversion_steps: int = 20
    lr: float = 1e-4
    eta: float = 0.1  # inpo: random term per inversion step (the released 0.1)
    inverter: str = "policy"  # inpo: who inverts every step, the policy (released) or the frozen base
    # inversion_dpo: the cache entry's storage dtype and kept points per pair, the trainer's defaults unless set
    cache_dtype: str = TrainingConfig.model_fields["inversion_cache_dtype"].default
    points_per_pair: int = TrainingConfig.model_fields["inversion_points_per_pair"].default


@dataclass
class Result:
    run: str
    pairs: str
    seed: int
    steps: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    win_rate: list[float] = field(default_factory=list)
    reward_b: list[float] = field(default_factory=list)
    cache_seconds: float = 0.0
    final_train_acc: float = 0.0


def invert_pairs(world: World, pairs: Pairs, run: Run) -> InvertedPairs:
    uncond = world.uncond if run.guidance != 1.0 else None
    parts = []
    for s in range(0, len(pairs.prompt), 64):
        sl = slice(s, s + 64)
        cond = world.cond_table.index(pairs.prompt[sl])
        parts.append(
            build_inverted_pairs(
                world.unet, world.scheduler.config, pairs.z_w[sl], pairs.z_l[sl], cond,
                target=run.target, num_steps=run.inversion_steps, guidance=run.guidance,
                uncond=None if uncond is None else uncond.repeat(cond.hidden_states.shape[0]),
                use_winner_noise=pair_coin(0, [str(i) for i in range(s, s + cond.hidden_states.shape[0])]),
                storage_dtype=STORAGE[run.cache_dtype],
            )
        )  # fmt: skip
    built = InvertedPairs.cat(parts)
    # Through the trainer's cache (inversion_cache.py): the entry layout, storage dtype and kept points of a pair.
    records = [PreferencePair("", b"", b"", str(i)) for i in range(len(pairs.prompt))]
    grid = inversion_grid(world.scheduler.config, run.inversion_steps)
    cache = InversionCache(
        "memory", str(CACHE), lambda batch, caps: (built, pairs.z_w, pairs.z_l), identity=run.name, target=run.target,
        dtype=STORAGE[run.cache_dtype], points_per_pair=run.points_per_pair, seed=0, grid=grid.timesteps,
        abar=grid.alphas_cumprod[grid.timesteps], device=DEVICE,
    )  # fmt: skip
    return cache.batch(records, [""] * len(records))


def swap_pairs(p: InvertedPairs) -> InvertedPairs:
    return replace(
        p, xt_w=p.xt_l, xt_l=p.xt_w, target_w=p.target_l, target_l=p.target_w, ref_err_w=p.ref_err_l,
        ref_err_l=p.ref_err_w,
    )  # fmt: skip


def evaluate(world: World, unet: torch.nn.Module, base_rewards: torch.Tensor) -> tuple[float, float, float]:
    z = generate(world, unet, world.eval_noise, world.eval_prompt)
    r = reward(z)
    win = ((r > base_rewards).float() + 0.5 * (r == base_rewards).float()).mean().item()
    return r.mean().item(), win, reward_b(z).mean().item()


def train_run(
    world: World, pairs: Pairs, run: Run, seed: int, steps: int, eval_every: int, cache: dict, base_rewards
) -> Result:
    res = Result(run.name, pairs.source, seed)
    policy = copy.deepcopy(world.unet).requires_grad_(True).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=run.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(pairs.prompt)
    inverted = None
    if run.method == "inversion_dpo":
        key = (pairs.source, run.target, run.guidance, run.inversion_steps, run.cache_dtype, run.points_per_pair)
        if key not in cache:
            t0 = time.time()
            cache[key] = (invert_pairs(world, pairs, run), time.time() - t0)
        inverted, res.cache_seconds = cache[key]
        # paired and x0 keep noise; a v-prediction policy is asked for the v it implies (as train.py does).
        abar = world.scheduler.alphas_cumprod[inverted.timesteps]
        inverted = inverted.for_prediction(run.target, abar, world.scheduler.config.prediction_type)
        if run.swap:
            inverted = swap_pairs(inverted)
        weights = timestep_weights(inverted.timesteps, world.scheduler.alphas_cumprod, run.weighting)
    z_w, z_l = (pairs.z_l, pairs.z_w) if run.swap else (pairs.z_w, pairs.z_l)
    start = time.time()
    acc = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            policy.eval()
            r, w, rb = evaluate(world, policy, base_rewards)
            policy.train()
            res.steps.append(step)
            res.wall.append(time.time() - start + res.cache_seconds)
            res.reward.append(r)
            res.win_rate.append(w)
            res.reward_b.append(rb)
        if step == steps:
            break
        idx = torch.randperm(n, generator=gen)[:8]
        cond = world.cond_table.index(pairs.prompt[idx])
        if run.method == "inversion_dpo":
            assert inverted is not None
            k = run.k or inverted.ref_err_w.shape[1]
            points = inversion_dpo_points(inverted.select(idx), cond, k=k, weights=weights, generator=gen)
        elif run.method == "diffusion_dpo":
            points = diffusion_dpo_points(world.unet, world.scheduler, z_w[idx], z_l[idx], cond, generator=gen)
        elif run.method == "inpo":
            points = inpo_points(
                policy if run.inverter == "policy" else world.unet, world.scheduler, z_w[idx], z_l[idx], cond,
                inversion_steps=run.inversion_steps, eta=run.eta, generator=gen,
            )  # fmt: skip
            points = with_reference_errors(world.unet, points)
        else:  # diffusion_dpo_unshared: the ablation with independent noise and timestep for winner and loser
            a = diffusion_dpo_points(world.unet, world.scheduler, z_w[idx], z_l[idx], cond, generator=gen)
            b = diffusion_dpo_points(world.unet, world.scheduler, z_w[idx], z_l[idx], cond, generator=gen)
            err_w, _ = policy_errors(policy, a)  # the winner at a's (t, noise)
            _, err_l = policy_errors(policy, b)  # the loser at b's
            loss, metrics = dpo_loss(err_w, err_l, a.ref_err_w, b.ref_err_l, beta=run.beta)
        if run.method != "diffusion_dpo_unshared":
            loss, metrics = points_loss(policy, points, beta=run.beta, loss_type="sigmoid")
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append(metrics["implicit_acc"].item())
    res.final_train_acc = statistics.mean(acc[-20:])
    return res


# ---------------------------------------------------------------- why: what the reference side looks like
def diagnose(world: World, pair_sets: dict[str, Pairs], steps: int = 20) -> list[dict]:
    """Per target, how the frozen reference's errors at the cached points differ between winner and loser.

    At init the policy equals the reference, so whatever separates Lr_w from Lr_l independently of the policy is a
    handle the loss can pull on. For each target: the mean gap Lr_w - Lr_l, the share of pairs where the winner's
    reference error is larger, and the correlation of the gap with the reward gap r_w - r_l across pairs.
    """
    rows = []
    for src, pairs in pair_sets.items():
        gap_r = reward(pairs.z_w) - reward(pairs.z_l)
        for target in ("paired", "x0", "step"):
            inv = invert_pairs(
                world,
                pairs,
                Run("diag", "inversion_dpo", target, inversion_steps=steps, cache_dtype="fp32", points_per_pair=0),
            )
            gap = (inv.ref_err_w - inv.ref_err_l).mean(dim=1)  # (P,)
            corr = torch.corrcoef(torch.stack([gap, gap_r]))[0, 1].item()
            rows.append(
                {
                    "pairs": src,
                    "target": target,
                    "ref_err_gap_mean": gap.mean().item(),
                    "share_winner_err_larger": (gap > 0).float().mean().item(),
                    "corr_gap_reward_gap": corr,
                    "ref_err_mean": torch.cat([inv.ref_err_w, inv.ref_err_l]).mean().item(),
                }
            )
    return rows


# ---------------------------------------------------------------- the study
def summarize(results: list[Result], base_reward: float) -> list[dict]:
    rows: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rows.setdefault((r.pairs, r.run), []).append(r)
    table = []
    for (src, name), rs in rows.items():
        finals = [r.reward[-1] for r in rs]
        wins = [r.win_rate[-1] for r in rs]
        table.append(
            {
                "pairs": src,
                "run": name,
                "seeds": len(rs),
                "reward_final_mean": statistics.mean(finals),
                "reward_final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "reward_gain": statistics.mean(finals) - base_reward,
                "win_rate_mean": statistics.mean(wins),
                "win_rate_min": min(wins),
                "win_rate_max": max(wins),
                "reward_b_final_mean": statistics.mean(r.reward_b[-1] for r in rs),
                "train_implicit_acc": statistics.mean(r.final_train_acc for r in rs),
                "cache_seconds": statistics.mean(r.cache_seconds for r in rs),
                "wall_seconds": statistics.mean(r.wall[-1] for r in rs),
            }
        )
    return table


def steps_to_reach(results: list[Result], threshold: float) -> dict[str, dict]:
    """Per run (data pairs), the mean first eval step and wall time at which the reward reached `threshold`."""
    out: dict[str, dict] = {}
    for r in results:
        hit = next((i for i, v in enumerate(r.reward) if v >= threshold), None)
        d = out.setdefault(f"{r.pairs}/{r.run}", {"steps": [], "wall": [], "reached": 0, "seeds": 0})
        d["seeds"] += 1
        if hit is not None:
            d["reached"] += 1
            d["steps"].append(r.steps[hit])
            d["wall"].append(r.wall[hit])
    return {
        k: {
            "reached": f"{v['reached']}/{v['seeds']}",
            "steps_mean": statistics.mean(v["steps"]) if v["steps"] else None,
            "wall_mean": statistics.mean(v["wall"]) if v["wall"] else None,
        }
        for k, v in out.items()
    }


def plot(results: list[Result], base_reward: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r.pairs for r in results})
    fig, axes = plt.subplots(len(sources), 2, figsize=(13, 4.5 * len(sources)), squeeze=False)
    names = list(dict.fromkeys(r.run for r in results))
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for row, src in enumerate(sources):
        for name in names:
            rs = [r for r in results if r.pairs == src and r.run == name]
            if not rs:
                continue
            steps = rs[0].steps
            mean = [statistics.mean(r.reward[i] for r in rs) for i in range(len(steps))]
            wall = [statistics.mean(r.wall[i] for r in rs) for i in range(len(steps))]
            style = "--" if "swap" in name else "-"
            axes[row][0].plot(steps, mean, style, color=colors[name], label=name)
            axes[row][1].plot(wall, mean, style, color=colors[name], label=name)
        for col, xlabel in enumerate(["optimizer steps", "wall seconds (incl. inversion cache)"]):
            ax = axes[row][col]
            ax.axhline(base_reward, color="black", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean reward of samples")
            ax.set_title(f"pairs {src}")
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="main table only, under 15 minutes on 2 cores")
    ap.add_argument(
        "--plan",
        choices=["all", "main", "base", "fixes"],
        default="all",
        help="main: every method on pairs drawn from the data (what --quick runs); base: the same on pairs sampled "
        "from the base; fixes: the variations tried on the data pairs. Parts can run as parallel processes.",
    )
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per run (the fixes part uses --fix-seeds)")
    ap.add_argument("--fix-seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ... (for parts)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runs", default=None, help="comma-separated run names: only these (e.g. 'inpo,inpo swap')")
    ap.add_argument(
        "--prediction", choices=["epsilon", "v_prediction"], default="epsilon", help="what the base predicts"
    )
    args = ap.parse_args()
    # Tiny tensors: one thread is as fast, and far faster when other processes share the two cores.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pretrain_steps = args.pretrain_steps or 1200
    t_all = time.time()
    world = pretrain_base(pretrain_steps, prediction=args.prediction)
    base_samples = generate(world, world.unet, world.eval_noise, world.eval_prompt)
    base_rewards = reward(base_samples)
    base_reward = base_rewards.mean().item()
    data_reward = reward(sample_data(2048, torch.Generator().manual_seed(99))[0]).mean().item()
    print(f"base model: sample reward {base_reward:+.3f} (data distribution {data_reward:+.3f})")

    main_runs = [
        Run("diffusion_dpo", "diffusion_dpo", beta=1000.0),
        Run("diffusion_dpo swap", "diffusion_dpo", swap=True),
        Run("inversion paired", "inversion_dpo", "paired"),
        Run("inversion paired swap", "inversion_dpo", "paired", swap=True),
        Run("inversion x0", "inversion_dpo", "x0"),
        Run("inversion x0 swap", "inversion_dpo", "x0", swap=True),
        Run("inversion step", "inversion_dpo", "step"),
        Run("inversion reference", "inversion_dpo", "reference"),
        # InPO as released: 10-step inverse grid, eta 0.1, the current policy inverts every step.
        Run("inpo", "inpo", inversion_steps=10),
        Run("inpo swap", "inpo", swap=True, inversion_steps=10),
    ]
    investigations = [
        Run("paired K=4", "inversion_dpo", "paired", k=4),
        # The cache before issue 20: every one of the N points of a pair kept, in float32.
        Run("paired fp32 all N points", "inversion_dpo", "paired", cache_dtype="fp32", points_per_pair=0),
        Run(
            "paired fp32 all N points swap",
            "inversion_dpo",
            "paired",
            swap=True,
            cache_dtype="fp32",
            points_per_pair=0,
        ),
        # Which of the two defaults costs what: fp16 with all N points, fp32 with M = 4.
        Run("paired fp16 all N points", "inversion_dpo", "paired", cache_dtype="fp16", points_per_pair=0),
        Run("paired fp32 M=4", "inversion_dpo", "paired", cache_dtype="fp32", points_per_pair=4),
        Run("paired 1/(2abar) weight", "inversion_dpo", "paired", weighting="inverse_alpha"),
        Run("paired beta 5000", "inversion_dpo", "paired", beta=5000.0),
        Run("paired guidance 2", "inversion_dpo", "paired", guidance=2.0),
        Run("paired N=50", "inversion_dpo", "paired", inversion_steps=50),
        Run("x0 K=4", "inversion_dpo", "x0", k=4),
        Run("diffusion_dpo, unshared noise and t", "diffusion_dpo_unshared"),
        Run("x0 1/(2abar) weight", "inversion_dpo", "x0", weighting="inverse_alpha"),
        Run("step 1/(2abar) weight", "inversion_dpo", "step", weighting="inverse_alpha"),
        # What in InPO matters: who inverts, the random term, the grid.
        Run("inpo with the frozen base inverting", "inpo", inversion_steps=10, inverter="reference"),
        Run("inpo eta 0", "inpo", inversion_steps=10, eta=0.0),
        Run("inpo N=20", "inpo", inversion_steps=20),
        # All-N (timesteps_per_step 0) is not in the study: 20x the K=1 cost per step on these CPUs; its gradient is
        # the K=N gradient exactly (tests/core/test_methods.py), and K=4 shows what more points per pair do.
    ]
    # Quick: the main table on pairs drawn from the data. Full: also pairs sampled from the base, and every fix tried.
    part = "main" if args.quick else args.plan
    plan: list[tuple[str, Run]] = []
    if part in ("all", "main"):
        plan += [("data", run) for run in main_runs]
    if part in ("all", "base"):
        plan += [("base", run) for run in main_runs]
    if part in ("all", "fixes"):
        plan += [("data", run) for run in investigations]
    if args.runs:
        wanted = args.runs.split(",")
        unknown = set(wanted) - {run.name for run in main_runs + investigations}
        if unknown:
            ap.error(f"--runs: unknown run names {sorted(unknown)}")
        plan = [(src, run) for src, run in plan if run.name in wanted]
    pair_sets = {src: make_pairs(world, src, args.pairs) for src in {src for src, _ in plan}}
    cache: dict = {}
    results: list[Result] = []
    eval_every = max(args.steps // 5, 1)
    main_names = {run.name for run in main_runs}
    stem = "alignment" if part == "all" else f"alignment_{part}"
    if args.runs:
        stem += "_" + "_".join(name.replace(" ", "-").replace("/", "") for name in args.runs.split(","))
    if args.first_seed:
        stem += f"_from_seed{args.first_seed}"
    if args.prediction != "epsilon":
        stem += f"_{args.prediction}"
    for src, run in plan:
        n_seeds = args.seeds if run.name in main_names else args.fix_seeds
        for seed in range(args.first_seed, args.first_seed + n_seeds):
            t0 = time.time()
            res = train_run(world, pair_sets[src], run, seed, args.steps, eval_every, cache, base_rewards)
            results.append(res)
            # Written after every run, so a study cut short still leaves what it measured.
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.partial.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
            print(
                f"[{time.time() - t_all:6.0f}s] pairs={src:4s} {run.name:42s} seed={seed} "
                f"reward {res.reward[0]:+.3f} -> {res.reward[-1]:+.3f} win {res.win_rate[-1]:.2f} "
                f"train acc {res.final_train_acc:.2f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    table = summarize(results, base_reward)
    print(f"\nbase reward {base_reward:+.3f}; {args.steps} steps, {args.pairs} pairs, 8 pairs per step")
    print(
        f"{'pairs':5s} {'run':42s} {'seeds':>5s} {'reward (mean ± sd)':>18s} {'gain':>7s} "
        f"{'win-rate [min,max]':>19s} {'acc':>5s}"
    )
    for row in table:
        print(
            f"{row['pairs']:5s} {row['run']:42s} {row['seeds']:5d} {row['reward_final_mean']:+9.3f} ± "
            f"{row['reward_final_sd']:.3f} {row['reward_gain']:+7.3f} {row['win_rate_mean']:6.2f} "
            f"[{row['win_rate_min']:.2f},{row['win_rate_max']:.2f}] {row['train_implicit_acc']:5.2f}"
        )
    # Convergence: steps and wall time to half of Diffusion-DPO's gain, when this part trained Diffusion-DPO.
    dpo_gain = [row["reward_gain"] for row in table if row["run"] == "diffusion_dpo" and row["pairs"] == "data"]
    threshold, reach = None, {}
    if dpo_gain:
        threshold = base_reward + 0.5 * dpo_gain[0]
        reach = steps_to_reach([r for r in results if r.pairs == "data"], threshold)
        print(f"\nsteps / wall seconds to reach reward {threshold:+.3f} (half of diffusion_dpo's gain), data pairs:")
        for name, v in reach.items():
            steps_mean = "-" if v["steps_mean"] is None else f"{v['steps_mean']:.0f}"
            wall_mean = "-" if v["wall_mean"] is None else f"{v['wall_mean']:.1f}"
            print(f"  {name:48s} reached {v['reached']}  steps {steps_mean:>4s}  wall s {wall_mean:>6s}")
    diagnostics = diagnose(world, pair_sets) if part != "fixes" and not args.runs else []
    print("\nreference errors at the cached points (Lr_w - Lr_l), 20 inversion steps:")
    for d in diagnostics:
        print(
            f"  pairs={d['pairs']:4s} {d['target']:7s} gap {d['ref_err_gap_mean']:+.4f} "
            f"(winner larger in {d['share_winner_err_larger']:.0%}), corr with reward gap "
            f"{d['corr_gap_reward_gap']:+.2f}, mean Lr {d['ref_err_mean']:.4f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "diagnostics": diagnostics,
        "machine": {"torch_threads": torch.get_num_threads(), "device": "cpu"},
        "settings": vars(args) | {"out": str(args.out), "pretrain_steps": pretrain_steps},
        "base_reward": base_reward,
        "data_reward": data_reward,
        "table": table,
        "reach_threshold": threshold,
        "reach": reach,
        "runs": [asdict(r) for r in results],
        "total_seconds": time.time() - t_all,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    plot(results, base_reward, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.json and {stem}.png in {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
