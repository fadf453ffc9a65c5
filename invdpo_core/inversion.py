"""Deterministic DDIM inversion with the frozen reference UNet, and the Inversion-DPO targets built on it.

Inversion mirrors diffusers' `DDIMInverseScheduler` (tests/core/test_inversion.py checks it against that loop):
the UNet is queried at the previous latent with the next timestep label, then the latent is advanced with the
DDIM update run backwards. Everything here runs once per pair under inference mode; the training step reads only
the resulting `InvertedPairs` (the reference side is cached, so training needs no reference forward).
See docs/method.md for the derivation of the targets.

Schedules: the grid is diffusers' DDIMScheduler grid for the model's own `timestep_spacing` (leading, trailing or
linspace), ascending; a step starts from the grid's previous level. v-prediction models: the inversion solves the
model's v and the current latent for the clean latent and the noise they both describe (`ddim_move`), which makes
each inversion step the exact inverse of a DDIM sampling step; targets are kept as noise and handed to the
policy in the model's own terms (`InvertedPairs.for_prediction`, `prediction_target`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from invdpo_core.config import PREDICTIONS


@dataclass
class Conditioning:
    """What the UNet is conditioned on: text hidden states, plus SDXL's pooled embeddings and time ids.

    A row is one image, or one pair (encode_prompts with time_ids): its two images share the text but, in SDXL,
    each has its own time ids, the winner's in `time_ids` and the loser's in `time_ids_l`. `both()` and `pick()`
    turn rows of pairs into rows of images before a UNet call."""

    hidden_states: torch.Tensor  # (B, L, D)
    text_embeds: torch.Tensor | None = None  # (B, D_pooled), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only: (orig_h, orig_w, crop_top, crop_left, h, w)
    time_ids_l: torch.Tensor | None = None  # (B, 6), SDXL rows of pairs only: the losers' time ids

    def unet_kwargs(self) -> dict[str, Any]:
        assert self.time_ids_l is None, "rows of pairs: call both() or pick() for rows of images first"
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs

    def map(self, fn) -> Conditioning:  # type: ignore[no-untyped-def]
        return replace(self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None})

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        return self.map(lambda t: t[idx])

    def both(self) -> Conditioning:
        """Rows of pairs -> rows of images, (2B, ...): the winners, then the losers."""
        doubled = Conditioning.cat([self, self])
        if self.time_ids_l is None:
            return doubled
        assert self.time_ids is not None
        return replace(doubled, time_ids=torch.cat([self.time_ids, self.time_ids_l]), time_ids_l=None)

    def pick(self, winner: torch.Tensor) -> Conditioning:
        """Rows of pairs -> one image per pair, (B, ...): the winner where `winner` (B,) is true, else the loser."""
        if self.time_ids_l is None:
            return self
        assert self.time_ids is not None
        take_w = winner.to(self.time_ids.device).view(-1, 1)
        return replace(self, time_ids=torch.where(take_w, self.time_ids, self.time_ids_l), time_ids_l=None)

    def repeat(self, k: int) -> Conditioning:
        """Each row repeated k times in place: (B, ...) -> (B*k, ...)."""
        return self.map(lambda t: t.repeat_interleave(k, dim=0))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        first = parts[0]
        return replace(
            first,
            **{
                f.name: torch.cat([getattr(p, f.name) for p in parts])
                for f in fields(first)
                if getattr(first, f.name) is not None
            },
        )


@torch.no_grad()
def encode_prompts(
    pipe: Any,
    prompts: Sequence[str],
    *,
    device: torch.device,
    resolution: int,
    time_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> Conditioning:
    """Encode prompts with the pipeline's own text encoder(s); SDXL also gets pooled embeddings and time ids.

    time_ids: (B, 6) each, the winners' and the losers' (pipeline.pair_time_ids: the size and crop each image
    really had), making the rows pairs (see Conditioning); None: images of `resolution`, uncropped.
    cache: caption -> (hidden states (L, D), pooled (D_pooled,) or None), kept on the CPU; only captions not in it
    go through the text encoders (once each), and are added."""
    sdxl = hasattr(pipe, "text_encoder_2")

    def run(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = pipe.encode_prompt(texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return out[0], out[2] if sdxl else None  # SDXL: (embeds, negative, pooled, negative pooled)

    if cache is None:
        embeds, pooled = run(list(prompts))
    else:
        todo = list(dict.fromkeys(p for p in prompts if p not in cache))
        if todo:
            new, new_pooled = run(todo)
            for i, text in enumerate(todo):
                cache[text] = (new[i].cpu(), None if new_pooled is None else new_pooled[i].cpu())
        embeds = torch.stack([cache[p][0] for p in prompts]).to(device)
        pooled = torch.stack([cache[p][1] for p in prompts]).to(device) if sdxl else None  # type: ignore[misc]
    if not sdxl:
        return Conditioning(embeds)
    # In float32: the UNet embeds them in float32 anyway, and a bf16 1023 would be 1024.
    if time_ids is None:
        side = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return Conditioning(embeds, pooled, side.to(device).expand(len(prompts), 6).clone())
    ids_w, ids_l = (ids.to(device, torch.float32) for ids in time_ids)
    return Conditioning(embeds, pooled, ids_w, ids_l)


@dataclass
class Trajectory:
    """A batch of DDIM inversions: x_0 (the clean latent) to x_N."""

    timesteps: torch.Tensor  # (N,) ascending; x_k sits at noise level timesteps[k-1]
    latents: torch.Tensor  # (N+1, B, C, h, w): x_0 ... x_N
    query_eps: torch.Tensor  # (N, B, C, h, w): the noise step k used (eps_ref(x_{k-1}, t_k) for an epsilon model)


@dataclass
class InversionGrid:
    """The N-step DDIM grid of a model's scheduler, ascending, and its noise levels."""

    timesteps: torch.Tensor  # (N,) long, ascending, distinct, in [0, T)
    alphas_cumprod: torch.Tensor  # (T,): abar of every training timestep
    initial_alpha_cumprod: torch.Tensor  # abar of the level the clean latent is taken at
    prediction_type: str  # epsilon or v_prediction
    num_train_timesteps: int

    def level_before(self, k: int) -> torch.Tensor:
        """abar of the level step k (0-based) starts from: the previous grid point, the clean latent's for k = 0. For
        leading spacing (and trailing when N divides T) this is diffusers' t_k - T // N; for linspace, whose points
        are not T // N apart, it is the level the latent really sits at."""
        return self.initial_alpha_cumprod if k == 0 else self.alphas_cumprod[self.timesteps[k - 1]]

    def level_after(self, k: int) -> torch.Tensor:
        """abar of the grid point above step k's, the level InPO's noise term denoises from (t_k + T // N above the
        top), clamped at the last training timestep. For leading spacing: InPO's released t_k + T // N."""
        n, total = len(self.timesteps), self.num_train_timesteps
        above = int(self.timesteps[k + 1]) if k + 1 < n else int(self.timesteps[k]) + total // n
        return self.alphas_cumprod[min(above, total - 1)]


def inversion_grid(scheduler_config: Any, num_steps: int) -> InversionGrid:
    """The model's DDIM grid of `num_steps` steps under its own timestep_spacing (diffusers' DDIMScheduler's
    timesteps, reversed), for an epsilon or v-prediction model."""
    grid = DDIMScheduler.from_config(scheduler_config)
    if grid.config.prediction_type not in PREDICTIONS:
        raise ValueError(f"scheduler.prediction_type {grid.config.prediction_type!r} is not supported")
    grid.set_timesteps(num_steps)
    timesteps = grid.timesteps.flip(0).long()
    if len(timesteps) == num_steps + 1 and timesteps[0] == -1:
        # diffusers' trailing spacing, np.arange(T, 0, -T / N), yields one point too many for some N (61, 103, ...):
        # the float arange's last element rounds to 0, i.e. timestep -1. The other N are the grid.
        timesteps = timesteps[1:]
    total = grid.config.num_train_timesteps
    # The top may be T itself (leading, steps_offset 1, N = T): a label only InPO's partial inversion is given,
    # which never takes it; config.schedule_problem refuses such a grid for a whole inversion.
    if len(timesteps) != num_steps or timesteps[0] < 0 or timesteps[-1] > total or (timesteps.diff() <= 0).any():
        raise ValueError(f"inversion_steps: {num_steps} steps make no grid of distinct timesteps in [0, {total}]")
    initial = grid.final_alpha_cumprod  # DDIMInverseScheduler's initial_alpha_cumprod: 1, or abar_0
    if torch.equal(grid.alphas_cumprod[timesteps[0]], initial):
        # A grid that starts at timestep 0 (linspace; trailing when N >= 2T/3) with set_alpha_to_one false, as SD
        # checkpoints ship: the first step would go from abar_0 to abar_0 and its point carry no noise. The clean
        # latent is then taken at abar = 1, where it is.
        initial = torch.tensor(1.0)
    return InversionGrid(
        timesteps=timesteps,
        alphas_cumprod=grid.alphas_cumprod,
        initial_alpha_cumprod=initial,
        prediction_type=grid.config.prediction_type,
        num_train_timesteps=total,
    )


def ddim_move(
    x: torch.Tensor,
    output: torch.Tensor,
    abar_from: torch.Tensor,
    abar_to: torch.Tensor,
    prediction_type: str,
    *,
    queried_at: Literal["from", "to"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step: x at noise level abar_from, the model's `output` for the label of level
    `queried_at`, to level abar_to. Returns (x at abar_to, the noise eps the step used).

    Both directions share the one assumption of DDIM: the clean latent z and the noise eps stay fixed, x = sqrt(a) z
    + sqrt(1 - a) eps. Sampling queries the model at its own level (from); inversion at the level it goes to (to).
    An epsilon output is eps itself. A v output, v = sqrt(a_q) eps - sqrt(1 - a_q) z, is solved together with x for
    (z, eps); queried at `from` that is diffusers' conversion, and queried at `to` it makes the inversion step the
    exact inverse of the sampling step given the same v (diffusers' inverse scheduler converts at the level x sits
    at instead, which is not).
    """
    if prediction_type == "epsilon":
        eps = output
        # DDIM eq. 12 of arXiv 2010.02502: z = (x - sqrt(1 - abar) eps) / sqrt(abar).
        z = (x - (1 - abar_from) ** 0.5 * eps) / abar_from**0.5
    elif queried_at == "from":
        eps = abar_from**0.5 * output + (1 - abar_from) ** 0.5 * x
        z = abar_from**0.5 * x - (1 - abar_from) ** 0.5 * output
    else:
        c_from, s_from, c_q, s_q = abar_from**0.5, (1 - abar_from) ** 0.5, abar_to**0.5, (1 - abar_to) ** 0.5
        det = c_q * c_from + s_q * s_from  # cos of the angle between the two levels: near 1
        eps = (c_from * output + s_q * x) / det
        z = (c_q * x - s_from * output) / det
    # Re-noise to the target level with the same eps: x' = sqrt(abar_to) z + sqrt(1 - abar_to) eps.
    return abar_to**0.5 * z + (1 - abar_to) ** 0.5 * eps, eps


def prediction_target(eps: torch.Tensor, xt: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the model should output at x_t (level abar) for the noise `eps`: eps for an epsilon model; for a
    v-prediction model v = sqrt(abar) eps - sqrt(1 - abar) z with z the clean latent x_t and eps imply, which is
    (eps - sqrt(1 - abar) x_t) / sqrt(abar). The loss is then the model's own (v) error, as Diffusion-DPO's is."""
    if prediction_type == "epsilon":
        return eps
    return (eps - (1 - abar) ** 0.5 * xt) / abar**0.5


def _guided_eps(
    unet: UNet2DConditionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance: float,
) -> torch.Tensor:
    if uncond is None or guidance == 1.0:
        return unet(x, t, **cond.unet_kwargs()).sample
    # (2B, ...): unconditional then conditional; the timestep labels too, or B > 1 fails to broadcast.
    both = unet(torch.cat([x, x]), torch.cat([t, t]), **Conditioning.cat([uncond, cond]).unet_kwargs()).sample
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.inference_mode()
def ddim_invert(
    unet: UNet2DConditionModel,
    scheduler_config: Any,
    latents: torch.Tensor,
    cond: Conditioning,
    *,
    num_steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    stop_before: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Trajectory:
    """Invert clean latents (B, C, h, w) to noise in `num_steps` DDIM steps with the frozen `unet`.

    guidance: classifier-free guidance scale during inversion. 1.0 (the default) is plain conditional inversion,
    which is what reconstructs best; the released code uses 2 with an all-zero unconditional embedding.
    stop_before: (B,) timesteps, InPO's partial inversion: row b takes only the steps whose label t_k is below
    stop_before[b], then stays where it is. The loop ends when no row takes a step, so `latents` has one entry per
    step taken (its last entry is every row's end point) and `query_eps` is 0 where a row took no step.
    eta: InPO's stochastic inversion: after each step add eta * sigma_k * N(0, I) drawn from `generator` (one for
    the batch, or one per row so that a row's draws do not depend on the other rows), with
    sigma_k the DDIM standard deviation (arXiv 2010.02502 eq. 16 at eta 1) of the denoising transition from
    the grid point above t_k down to t_k, the transition InPO's released code takes (there t_k + T // N, clamped at
    the last training timestep, where that code would index past the schedule).
    """
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1.0 needs an unconditional embedding (uncond)")
    if eta > 0 and generator is None:
        raise ValueError("eta > 0 needs a generator")
    grid = inversion_grid(scheduler_config, num_steps)
    alphas = grid.alphas_cumprod.to(latents.device)
    x = latents
    xs, query_eps, taken = [x], [], []
    for k, t in enumerate(grid.timesteps.tolist()):
        # Rows that take this step: all, or (InPO) those whose stop lies above t. None means all, without indexing.
        rows = None if stop_before is None else (stop_before > t).nonzero().squeeze(1)
        if rows is not None and rows.numel() == 0:
            break
        x_in = x if rows is None else x[rows]
        t_tensor = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.long)
        # 1. Query the model at the previous latent with the next timestep label.
        out = _guided_eps(
            unet, x_in, t_tensor, cond if rows is None else cond.index(rows),
            uncond if rows is None or uncond is None else uncond.index(rows), guidance,
        )  # fmt: skip
        # 2. From the level x sits at (the previous grid point, or the clean latent) to level t.
        abar_t = alphas[t]
        x_next, eps = ddim_move(
            x_in, out, grid.level_before(k).to(x.device), abar_t, grid.prediction_type, queried_at="to"
        )
        if eta > 0:
            # 3. InPO's random term: sigma^2 = (1 - abar_t) / (1 - abar_up) * (1 - abar_up / abar_t), DDIM eq. 16
            #    for the transition from the grid point above t (t + T // N for leading spacing) down to t.
            assert generator is not None
            abar_up = grid.level_after(k).to(x.device)
            sigma = ((1 - abar_t) / (1 - abar_up) * (1 - abar_up / abar_t)) ** 0.5
            if isinstance(generator, torch.Generator):
                draw = torch.randn(x_next.shape, generator=generator, device=generator.device, dtype=x_next.dtype)
            else:
                taking = range(x.shape[0]) if rows is None else rows.tolist()
                draw = torch.stack(
                    [torch.randn(x_next.shape[1:], generator=generator[r], dtype=x_next.dtype) for r in taking]
                )
            x_next = x_next + eta * sigma * draw.to(x.device)
        if rows is None:
            x = x_next
        else:
            x = x.index_copy(0, rows, x_next.to(x.dtype))
            eps = torch.zeros_like(x).index_copy(0, rows, eps.to(x.dtype))
        xs.append(x)
        query_eps.append(eps)
        taken.append(t)
    timesteps = torch.tensor(taken, dtype=torch.long, device=latents.device)
    eps_stack = torch.stack(query_eps) if query_eps else latents.new_zeros((0, *latents.shape))
    return Trajectory(timesteps, torch.stack(xs), eps_stack)


def eps_at_points(
    unet: UNet2DConditionModel,
    points: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    max_rows: int = 64,
) -> torch.Tensor:
    """eps(x_k, t_k) at N points of B latents each, (N, B, C, h, w), in forwards of up to `max_rows` rows.
    timesteps: (N,), or (N, B) when each row has its own.

    Unlike the inversion loop these points are all known in advance, so several go in one forward: fewer, larger
    UNet calls (what a GPU wants) while memory stays bounded by max_rows, not N.
    """
    n, b = points.shape[:2]
    per_forward = max(1, max_rows // b)
    out = []
    for s in range(0, n, per_forward):
        m = min(per_forward, n - s)
        x = points[s : s + m].flatten(0, 1)  # (m*B, C, h, w), point-major
        # timesteps (N,): one per point; (N, B): one per point and row (each pair's own kept points).
        t = timesteps[s : s + m].repeat_interleave(b) if timesteps.dim() == 1 else timesteps[s : s + m].flatten()
        out.append(unet(x, t, **Conditioning.cat([cond] * m).unet_kwargs()).sample.view(m, b, *points.shape[2:]))
    return torch.cat(out)


@torch.inference_mode()
def ddim_sample(
    unet: UNet2DConditionModel, scheduler_config: Any, noise: torch.Tensor, cond: Conditioning, *, num_steps: int
) -> torch.Tensor:
    """Deterministic DDIM sampling (eta 0) from x_N back to x_0 on the inversion's grid, the inverse of `ddim_invert`
    (guidance 1). Equal to diffusers' DDIMScheduler for leading spacing (and trailing when N divides T)."""
    grid = inversion_grid(scheduler_config, num_steps)
    alphas = grid.alphas_cumprod.to(noise.device)
    x = noise
    for k in reversed(range(num_steps)):
        t = int(grid.timesteps[k])
        out = unet(x, torch.full((x.shape[0],), t, device=x.device), **cond.unet_kwargs()).sample
        abar_t = alphas[t]
        x, _ = ddim_move(x, out, abar_t, grid.level_before(k).to(x.device), grid.prediction_type, queried_at="from")
    return x


# ----------------------------------------------------------------------------------------------------------------
# Inversion-DPO targets (docs/method.md, "Targets"). All live on the inverted points (x_k, t_k), k = 1..N.
# ----------------------------------------------------------------------------------------------------------------

TARGETS = ("paired", "x0", "step", "reference")
NOISE_TARGETS = ("paired", "x0")  # kept as noise (with the clean latents), whatever the model predicts


@dataclass
class InvertedPairs:
    """Everything the training step needs for B pairs at M points each; the reference side is reduced to scalars.

    Tensors are (B, M, ...) so a pair's points stay together (and can be cached per pair). A pair keeps all N points
    of the grid (M = N, as built) or M of them (the cache's `inversion_points_per_pair`): `points` says which.
    """

    timesteps: torch.Tensor  # (N,): the inversion grid
    xt_w: torch.Tensor  # (B, M, C, h, w): where the policy is evaluated for the winner
    xt_l: torch.Tensor  # (B, M, C, h, w): ... and for the loser
    # (B, M, C, h, w): what the policy should output for the winner: noise for paired and x0 (NOISE_TARGETS; a
    # v-prediction policy is asked for the v it implies, for_prediction), the model's own terms for step, reference
    target_w: torch.Tensor
    target_l: torch.Tensor  # (B, M, C, h, w)
    ref_err_w: torch.Tensor  # (B, M): mean squared error of the frozen reference at the winner's points
    ref_err_l: torch.Tensor  # (B, M)
    points: torch.Tensor  # (B, M) long: each point's index in the grid `timesteps`

    def select(self, pair_idx: torch.Tensor | slice) -> InvertedPairs:
        return InvertedPairs(
            self.timesteps,
            *(getattr(self, f.name)[pair_idx] for f in fields(self) if f.name != "timesteps"),  # type: ignore[arg-type]
        )

    @staticmethod
    def cat(parts: Sequence[InvertedPairs]) -> InvertedPairs:
        names = [f.name for f in fields(InvertedPairs) if f.name != "timesteps"]
        return InvertedPairs(parts[0].timesteps, *(torch.cat([getattr(p, n) for p in parts]) for n in names))

    def for_prediction(self, target: str, abar_grid: torch.Tensor, prediction_type: str) -> InvertedPairs:
        """The pairs with their targets in the model's own terms (prediction_target). `paired` and `x0` keep noise
        (for a v-prediction model it becomes v here); `step` and `reference` are built in the model's terms and
        returned as they are, as is everything for an epsilon model. abar_grid: (N,) abar of the grid's points."""
        if prediction_type == "epsilon" or target not in NOISE_TARGETS:
            return self
        abar = abar_grid.to(self.xt_w.device)[self.points.to(self.xt_w.device)][..., None, None, None]  # (B, M, 1..)

        def asked(eps: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
            return prediction_target(eps.float(), xt.float(), abar.float(), prediction_type).to(eps.dtype)

        return replace(self, target_w=asked(self.target_w, self.xt_w), target_l=asked(self.target_l, self.xt_l))


def noised(z0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) z0 + sqrt(1 - abar) n (DDPM forward noising); abar broadcasts. The one formula the cache
    build and the cache read use, so a rebuilt point is bit for bit the one the reference errors were computed at."""
    return abar**0.5 * z0 + (1 - abar) ** 0.5 * noise


def implied_noise(xt: torch.Tensor, z0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The noise n with x_t = sqrt(abar) z0 + sqrt(1 - abar) n; abar broadcasts over (N, 1, 1, 1)."""
    return (xt - abar**0.5 * z0) / (1 - abar) ** 0.5


def pair_coin(seed: int, pair_ids: Sequence[str]) -> torch.Tensor:
    """A per-pair fair coin that depends only on the seed and the pair's id, so the cache is reproducible."""
    bits = [hashlib.sha256(f"{seed}:{pid}".encode()).digest()[0] & 1 for pid in pair_ids]
    return torch.tensor(bits, dtype=torch.bool)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Per-point mean over (C, h, w): (B, N, C, h, w) -> (B, N).
    return (a.float() - b.float()).pow(2).mean(dim=(-3, -2, -1))


@torch.inference_mode()
def build_inverted_pairs(
    unet: UNet2DConditionModel,
    scheduler_config: Any,
    z_w: torch.Tensor,
    z_l: torch.Tensor,
    cond: Conditioning,
    *,
    target: str,
    num_steps: int,
    guidance: float = 1.0,
    uncond: Conditioning | None = None,
    use_winner_noise: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    storage_dtype: torch.dtype = torch.float32,
) -> InvertedPairs:
    """Invert B pairs of clean latents (B, C, h, w) and build the `target`'s points, targets and reference errors.

    use_winner_noise (B,) bool, `paired` only: whose inversion provides the shared noise. Draw it with
    `pair_coin` so no label leaks (the default, a coin per pair from seed 0 and the pair index).
    keep: (B, M) ascending grid indices, the points each pair keeps (inversion_cache.kept_points); None: all N.
    The inversion walks each pair only up to its deepest kept point (the later steps feed none of them); the
    reference is evaluated only at the kept points.
    storage_dtype: what the cache stores latents in (inversion_cache_dtype). Points and targets are rounded to it
    first and the reference errors computed at the rounded points, so the policy sees exactly the points its
    reference errors belong to (at policy == reference the loss is ln 2 whatever the storage). For `paired` and
    `x0` a point is rebuilt from the rounded clean latent z and noise n as `noised(z, n, abar)`, as the cache does.
    Cost in reference UNet calls per pair, with D the deepest kept point (1-based; D = N with all points kept, on
    average M (N + 1) / (M + 1) for M drawn ones, 16.8 of N = 20 at M = 4): paired D + 2M (invert one image,
    reference at both points), x0/step/reference 2D + 2M (invert both, reference at every point); with
    guidance != 1 the inversion calls double.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown inversion target {target!r}; valid: {', '.join(TARGETS)}")
    b = z_w.shape[0]
    grid = inversion_grid(scheduler_config, num_steps)
    prediction = grid.prediction_type
    timesteps = grid.timesteps.to(z_w.device)
    if keep is None:
        keep = torch.arange(num_steps).expand(b, num_steps)  # (B, N): every grid point
    keep = keep.to(z_w.device)
    t_kept = timesteps[keep.T]  # (M, B): each pair's kept timesteps
    abar = grid.alphas_cumprod.to(z_w.device)[t_kept][..., None, None, None]  # (M, B, 1, 1, 1)

    def kept(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # (N, R, ...), idx (M, R) -> (M, R, ...)
        return t[idx, torch.arange(idx.shape[1], device=t.device)]

    def bn(t: torch.Tensor) -> torch.Tensor:  # (M, B, ...) -> (B, M, ...)
        return t.transpose(0, 1).contiguous()

    def stored(t: torch.Tensor) -> torch.Tensor:  # what the cache will hold, back in float32
        return t.to(storage_dtype).float()

    # Each pair's inversion stops after its deepest kept point (InPO's partial inversion, ddim_invert stop_before):
    # the steps above it feed no kept point. None: every pair walks the whole grid.
    deepest = keep.max(dim=1).values  # (B,)
    stop = None if bool((deepest == num_steps - 1).all()) else timesteps[deepest] + 1

    if target == "paired":
        # Winner and loser share one deterministic noise: the inversion-implied noise of one image of the pair.
        if use_winner_noise is None:
            use_winner_noise = pair_coin(0, [str(i) for i in range(b)])
        pick = use_winner_noise.to(z_w.device).view(b, 1, 1, 1)
        z_src, z_other = torch.where(pick, z_w, z_l), torch.where(pick, z_l, z_w)
        src_cond, src_uncond = cond.pick(use_winner_noise), None if uncond is None else uncond.pick(use_winner_noise)
        traj = ddim_invert(
            unet, scheduler_config, z_src, src_cond, num_steps=num_steps, guidance=guidance, uncond=src_uncond,
            stop_before=stop,
        )  # fmt: skip
        # The source image's own inverted points (M, B, C, h, w) and their implied noise, as stored.
        noise = stored(implied_noise(kept(traj.latents[1:], keep.T), z_src, abar))
        xt_src = noised(stored(z_src), noise, abar)  # the inverted points, up to the storage's rounding
        xt_other = noised(stored(z_other), noise, abar)  # the other image, forward-noised with the same noise
        out_src = eps_at_points(unet, xt_src, t_kept, src_cond)
        out_other = eps_at_points(unet, xt_other, t_kept, cond.pick(~use_winner_noise))
        # The reference's errors in the model's own terms (noise, or v), as the policy's will be.
        err_src = _mse(bn(prediction_target(noise, xt_src, abar, prediction)), bn(out_src))
        err_other = _mse(bn(prediction_target(noise, xt_other, abar, prediction)), bn(out_other))
        p5 = pick.view(b, 1, 1, 1, 1)
        p2 = pick.view(b, 1)
        return InvertedPairs(
            timesteps,
            xt_w=torch.where(p5, bn(xt_src), bn(xt_other)),
            xt_l=torch.where(p5, bn(xt_other), bn(xt_src)),
            target_w=bn(noise),
            target_l=bn(noise),
            ref_err_w=torch.where(p2, err_src, err_other),
            ref_err_l=torch.where(p2, err_other, err_src),
            points=keep,
        )

    # Unpaired targets: each image on its own inverted points.
    traj = ddim_invert(
        unet, scheduler_config, torch.cat([z_w, z_l]), cond.both(),
        num_steps=num_steps, guidance=guidance, uncond=None if uncond is None else uncond.both(),
        stop_before=None if stop is None else torch.cat([stop, stop]),
    )  # fmt: skip
    keep_images = torch.cat([keep, keep]).T  # (M, 2B): winners then losers
    inverted = kept(traj.latents[1:], keep_images)  # (M, 2B, C, h, w), as inverted (before the storage's rounding)
    abar2 = torch.cat([abar, abar], dim=1)
    if target == "x0":
        # The noise that maps x_t back to the TRUE clean latent: the role eps plays in Diffusion-DPO. Stored as
        # (z, n), x_t rebuilt from them.
        tgt = stored(implied_noise(inverted, torch.cat([z_w, z_l]), abar2))
        xt = noised(stored(torch.cat([z_w, z_l])), tgt, abar2)
    else:  # step, reference: x_t stored as it is
        xt = stored(inverted)
    if target == "step":
        # The noise that maps x_k exactly to x_{k-1} under the DDIM update; on the reference's own inversion this is
        # the noise the inversion step used (the DDIM update is invertible with the same eps). For a v model, the v
        # that does (the step's own query, ddim_move), taken before rounding: a v derived from separately rounded
        # x_t and noise would scale their rounding by 1 / sqrt(abar) (15x at t = 999).
        tgt = stored(prediction_target(kept(traj.query_eps, keep_images), inverted, abar2, prediction))
    point_out = eps_at_points(unet, xt, torch.cat([t_kept, t_kept], dim=1), cond.both())
    if target == "reference":  # the released code's objective, the reference's own output at x_t (zero gradient
        tgt = stored(point_out)  # at init when stored in float32; rounded to fp16/bf16, not exactly zero)
    # x0 keeps noise (NOISE_TARGETS); step and reference are in the model's own terms already.
    asked = prediction_target(tgt, xt, abar2, prediction) if target == "x0" else tgt
    err = _mse(bn(asked), bn(point_out))  # (2B, M)
    xt_bn, tgt_bn = bn(xt), bn(tgt)
    return InvertedPairs(
        timesteps,
        xt_w=xt_bn[:b],
        xt_l=xt_bn[b:],
        target_w=tgt_bn[:b],
        target_l=tgt_bn[b:],
        ref_err_w=err[:b],
        ref_err_l=err[b:],
        points=keep,
    )
