"""The two methods as builders of training points that feed the one DPO loss in losses.py.

- diffusion_dpo: one timestep and one noise shared by winner and loser, forward noising, the noise as target,
  the reference evaluated under no_grad every step (Wallace et al., arXiv 2311.12908).
- inversion_dpo: points, targets and reference errors from the cached DDIM inversion (inversion.py), so the step
  runs no reference UNet. K points per pair are sampled, or all N with a two-pass gradient whose memory does not
  grow with N.
- inpo: InPO (Lu et al., arXiv 2503.18454): one timestep shared by winner and loser, each image inverted by the
  CURRENT policy (no grad) through a short stochastic inverse DDIM schedule up to it, each image's own
  inversion-implied noise as its target; the reference evaluated every step at the same points. Nothing cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from invdpo_core.inversion import Conditioning, InvertedPairs, ddim_invert, implied_noise, prediction_target
from invdpo_core.losses import dpo_loss

EpsModel = Callable[..., Any]  # a UNet (or wrapper) returning an object with `.sample`
# Where the random draws of a batch come from: one generator for the whole batch, or one per pair. Per-pair
# generators (train.pair_generators) make a pair's draws independent of which process and which batch it lands in,
# so N processes of B pairs draw what one process of N*B pairs draws.
Draws = torch.Generator | Sequence[torch.Generator]


def draw_timesteps(high: int, b: int, draws: Draws) -> torch.Tensor:
    """(b,) timesteps uniform in [0, high), on the CPU."""
    if isinstance(draws, torch.Generator):
        return torch.randint(0, high, (b,), generator=draws, device=draws.device).cpu()
    assert len(draws) == b, f"{len(draws)} generators for {b} pairs"
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device).cpu() for g in draws])


def draw_normal(shape: torch.Size, draws: Draws, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal draws of `shape` (rows first), on the CPU."""
    if isinstance(draws, torch.Generator):
        return torch.randn(shape, generator=draws, device=draws.device, dtype=dtype).cpu()
    assert len(draws) == shape[0], f"{len(draws)} generators for {shape[0]} rows"
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).cpu() for g in draws])


def draw_uniform(shape: tuple[int, ...], draws: Draws) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape` (rows first), on the CPU."""
    if isinstance(draws, torch.Generator):
        return torch.rand(shape, generator=draws, device=draws.device).cpu()
    assert len(draws) == shape[0], f"{len(draws)} generators for {shape[0]} rows"
    return torch.stack([torch.rand(shape[1:], generator=g, device=g.device).cpu() for g in draws])


@dataclass
class TrainPoints:
    """B pairs with K points each, flattened pair-major to B*K rows."""

    xt_w: torch.Tensor  # (B*K, C, h, w)
    xt_l: torch.Tensor  # (B*K, C, h, w)
    timesteps: torch.Tensor  # (B*K,)
    target_w: torch.Tensor  # (B*K, C, h, w)
    target_l: torch.Tensor  # (B*K, C, h, w)
    ref_err_w: torch.Tensor  # (B*K,)
    ref_err_l: torch.Tensor  # (B*K,)
    weights: torch.Tensor  # (B*K,): per-point timestep weight
    cond: Conditioning  # B*K rows
    k: int


def timestep_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str) -> torch.Tensor:
    """uniform: 1. inverse_alpha: 1 / (2 abar_t), the released Inversion-DPO code's weight."""
    if weighting == "uniform":
        return torch.ones(timesteps.shape, device=timesteps.device)
    if weighting == "inverse_alpha":
        return 1.0 / (2.0 * alphas_cumprod.to(timesteps.device)[timesteps].float())
    raise ValueError(f"unknown timestep_weighting {weighting!r}; valid: uniform, inverse_alpha")


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def policy_errors(unet: EpsModel, points: TrainPoints) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point policy MSE for winners and losers, one UNet forward over (2*B*K) rows: winners then losers."""
    x = torch.cat([points.xt_w, points.xt_l])
    t = torch.cat([points.timesteps, points.timesteps])
    eps = unet(x, t, **points.cond.both().unet_kwargs()).sample
    eps_w, eps_l = eps.chunk(2)
    return _mse(eps_w, points.target_w), _mse(eps_l, points.target_l)


def per_pair(err: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted mean over each pair's K points: (B*K,) -> (B,)."""
    return (err * weights).view(-1, k).mean(dim=1)


def diffusion_dpo_points(
    ref_unet: EpsModel,
    scheduler,  # type: ignore[no-untyped-def]
    z_w: torch.Tensor,
    z_l: torch.Tensor,
    cond: Conditioning,
    *,
    generator: Draws,
) -> TrainPoints:
    """Diffusion-DPO: ONE timestep and ONE noise per pair, shared by winner and loser; reference under no_grad."""
    b = z_w.shape[0]
    t = draw_timesteps(scheduler.config.num_train_timesteps, b, generator).to(z_w.device)
    noise = draw_normal(z_w.shape, generator, z_w.dtype).to(z_w.device)
    # A v-prediction model (SD2.x 768, v-pred SDXL finetunes) is asked for v = sqrt(abar) eps - sqrt(1 - abar) z,
    # as in Diffusion-DPO's training script; the shared noise then gives each image its own target.
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    points = TrainPoints(
        xt_w=scheduler.add_noise(z_w, noise, t),
        xt_l=scheduler.add_noise(z_l, noise, t),
        timesteps=t,
        target_w=scheduler.get_velocity(z_w, noise, t) if v_prediction else noise,
        target_l=scheduler.get_velocity(z_l, noise, t) if v_prediction else noise,
        ref_err_w=torch.empty(0),
        ref_err_l=torch.empty(0),
        weights=torch.ones(b, device=z_w.device),
        cond=cond,
        k=1,
    )
    return with_reference_errors(ref_unet, points)


def with_reference_errors(ref_unet: EpsModel, points: TrainPoints) -> TrainPoints:
    """The points with the frozen reference's errors at their own (x_t, t) and targets, under no_grad."""
    with torch.no_grad():
        ref_err_w, ref_err_l = policy_errors(ref_unet, points)
    return replace(points, ref_err_w=ref_err_w, ref_err_l=ref_err_l)


def inpo_points(
    inverter: Any,  # a UNet2DConditionModel: the current policy (InPO), or the frozen reference
    scheduler,  # type: ignore[no-untyped-def]
    z_w: torch.Tensor,
    z_l: torch.Tensor,
    cond: Conditioning,
    *,
    inversion_steps: int,
    eta: float,
    generator: Draws,
) -> TrainPoints:
    """InPO's points, WITHOUT the reference errors (fill them with `with_reference_errors`).

    1. One timestep t ~ U{0..T-1} per pair, shared by winner and loser.
    2. Each image is inverted by `inverter` under no_grad through the steps of the `inversion_steps`-step inverse
       DDIM grid whose label is below t, with eta-scaled noise after each step (inversion.ddim_invert); it ends at
       x, the last grid level below t.
    3. Its target is its own inversion-implied noise n = (x - sqrt(abar_t) z0) / sqrt(1 - abar_t), so that
       x = sqrt(abar_t) z0 + sqrt(1 - abar_t) n exactly, and the policy is asked for n at (x, t) (a v-prediction
       model for v = sqrt(abar_t) n - sqrt(1 - abar_t) z0).
    The reference errors are a separate call because with LoRA the reference is the policy with its adapters off,
    which cannot run while the policy inverts. UNet calls per pair: 2m no-grad inversion forwards (m grid steps
    below t, about N/2 on average) here, then 2 reference forwards and 2 policy forwards with backward.
    """
    b = z_w.shape[0]
    t = draw_timesteps(scheduler.config.num_train_timesteps, b, generator).to(z_w.device)
    z0 = torch.cat([z_w, z_l])  # (2B, C, h, w): winners then losers
    # Per-pair generators: a pair's winner and loser rows draw from the pair's generator.
    row_draws = generator if isinstance(generator, torch.Generator) else [*generator, *generator]
    traj = ddim_invert(
        inverter, scheduler.config, z0, cond.both(), num_steps=inversion_steps,
        stop_before=torch.cat([t, t]), eta=eta, generator=row_draws,
    )  # fmt: skip
    # A copy made outside inference mode: the policy's forward with grad cannot save inference tensors.
    x = traj.latents[-1].clone()  # (2B, C, h, w): where each image's inversion ended
    abar = scheduler.alphas_cumprod.to(x.device)[torch.cat([t, t])].view(-1, 1, 1, 1)
    target = prediction_target(implied_noise(x, z0, abar), x, abar, scheduler.config.prediction_type)
    return TrainPoints(
        xt_w=x[:b],
        xt_l=x[b:],
        timesteps=t,
        target_w=target[:b],
        target_l=target[b:],
        ref_err_w=torch.empty(0),
        ref_err_l=torch.empty(0),
        weights=torch.ones(b, device=z_w.device),
        cond=cond,
        k=1,
    )


def inversion_dpo_points(
    pairs: InvertedPairs,
    cond: Conditioning,
    *,
    k: int,
    weights: torch.Tensor,
    generator: Draws,
) -> TrainPoints:
    """Sample K of the M points each pair keeps (without replacement). weights: (N,) timestep weights of the grid."""
    b, m = pairs.ref_err_w.shape
    assert 1 <= k <= m, f"k must be in [1, {m}], got {k}"
    # (B, K) point indices among the kept ones, independent per pair.
    idx = draw_uniform((b, m), generator).argsort(dim=1)[:, :k]
    idx = idx.to(pairs.xt_w.device)
    rows = torch.arange(b, device=idx.device).unsqueeze(1).expand(b, k)
    grid = pairs.points.to(idx.device)[rows, idx]  # (B, K): their places on the inversion grid

    def take(t: torch.Tensor) -> torch.Tensor:  # (B, M, ...) -> (B*K, ...)
        return t[rows, idx].flatten(0, 1)

    return TrainPoints(
        xt_w=take(pairs.xt_w),
        xt_l=take(pairs.xt_l),
        timesteps=pairs.timesteps.to(idx.device)[grid].flatten(),
        target_w=take(pairs.target_w),
        target_l=take(pairs.target_l),
        ref_err_w=take(pairs.ref_err_w),
        ref_err_l=take(pairs.ref_err_l),
        weights=weights.to(idx.device)[grid].flatten(),
        cond=cond.repeat(k),
        k=k,
    )


def points_loss(
    unet: EpsModel, points: TrainPoints, *, beta: float, loss_type: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a batch of points (diffusion_dpo, inpo, or inversion_dpo with K sampled points)."""
    err_w, err_l = policy_errors(unet, points)
    return dpo_loss(
        per_pair(err_w, points.weights, points.k),
        per_pair(err_l, points.weights, points.k),
        per_pair(points.ref_err_w, points.weights, points.k),
        per_pair(points.ref_err_l, points.weights, points.k),
        beta=beta,
        loss_type=loss_type,
    )


def all_points_backward(
    unet: EpsModel,
    pairs: InvertedPairs,
    cond: Conditioning,
    *,
    weights: torch.Tensor,
    beta: float,
    loss_type: str,
    points_per_forward: int = 1,
    loss_scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over ALL M points each pair keeps (all N of the grid by default), and its gradient, with memory flat in M.

    Pass 1 (no grad) computes every point's error, hence the loss and dL/dLp_w, dL/dLp_l per pair. Pass 2 recomputes
    `points_per_forward` points at a time with grad and backpropagates the surrogate sum_k dL/dLp * w_k/N * err_k,
    whose gradient equals the full loss's: d/dtheta L = sum_k dL/dLp * dLp/derr_k * derr_k/dtheta.
    `backward` lets a trainer route the call through accelerate (`accelerator.backward`).
    Returns the detached loss (times 1, not loss_scale) and the metrics.
    """
    b, n = pairs.ref_err_w.shape  # n: the M points each pair keeps
    point_weights = weights.to(pairs.xt_w.device)[pairs.points.to(pairs.xt_w.device)]  # (B, M)
    timesteps = pairs.timesteps.to(pairs.xt_w.device)[pairs.points.to(pairs.xt_w.device)]  # (B, M)
    chunks = [slice(s, min(s + points_per_forward, n)) for s in range(0, n, points_per_forward)]

    def chunk_points(c: slice) -> TrainPoints:
        m = c.stop - c.start

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[:, c].flatten(0, 1)

        return TrainPoints(
            xt_w=take(pairs.xt_w),
            xt_l=take(pairs.xt_l),
            timesteps=take(timesteps),
            target_w=take(pairs.target_w),
            target_l=take(pairs.target_l),
            ref_err_w=take(pairs.ref_err_w),
            ref_err_l=take(pairs.ref_err_l),
            weights=take(point_weights),
            cond=cond.repeat(m),
            k=m,
        )

    # Pass 1: every point's error without building a graph.
    with torch.no_grad():
        per_chunk = [policy_errors(unet, chunk_points(c)) for c in chunks]
    err_w = torch.cat([e.view(b, -1) for e, _ in per_chunk], dim=1)  # (B, N)
    err_l = torch.cat([e.view(b, -1) for _, e in per_chunk], dim=1)
    lp_w = (err_w * point_weights).mean(dim=1).requires_grad_()
    lp_l = (err_l * point_weights).mean(dim=1).requires_grad_()
    lr_w = (pairs.ref_err_w * point_weights).mean(dim=1)
    lr_l = (pairs.ref_err_l * point_weights).mean(dim=1)
    loss, metrics = dpo_loss(lp_w, lp_l, lr_w, lr_l, beta=beta, loss_type=loss_type)
    grad_w, grad_l = torch.autograd.grad(loss, [lp_w, lp_l])  # (B,) each

    # Pass 2: point by point, backward of the surrogate; only one chunk's activations live at a time.
    for c in chunks:
        points = chunk_points(c)
        ew, el = policy_errors(unet, points)
        m = c.stop - c.start
        coef = point_weights[:, c].flatten() / n
        surrogate = (grad_w.repeat_interleave(m) * coef * ew + grad_l.repeat_interleave(m) * coef * el).sum()
        backward(surrogate * loss_scale)
    return loss.detach(), metrics
