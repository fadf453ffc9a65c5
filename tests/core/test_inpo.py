"""InPO (method: inpo): its points, its loss against a hand-written computation, its partial stochastic inversion.

The trainer runs of InPO (full, LoRA, SDXL, exact resume) are parametrised into tests/core/test_train.py.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from invdpo_core.config import ConfigError, parse_config
from invdpo_core.inversion import ddim_invert, encode_prompts
from invdpo_core.methods import inpo_points, points_loss, with_reference_errors
from invdpo_core.testing import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request):
    pipe = build_tiny_pipeline(request.param, seed=0)
    g = torch.Generator().manual_seed(1)
    z_w, z_l = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device=CPU, resolution=64)
    return pipe, z_w, z_l, cond


def _policy(pipe, adapter):
    unet = copy.deepcopy(pipe.unet)
    if adapter == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _nudged(pipe):
    """A policy a little off the reference, so every term of the loss is non-trivial."""
    policy = _policy(pipe, "full")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in list(policy.parameters())[-6:]:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return policy


def _inpo(policy, ref, pipe, z_w, z_l, cond, generator, steps=10, eta=0.1):
    points = inpo_points(policy, pipe.scheduler, z_w, z_l, cond, inversion_steps=steps, eta=eta, generator=generator)
    return with_reference_errors(ref, points)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_inpo_gradient_is_nonzero_at_init_and_a_step_changes_weights(setup, adapter):
    pipe, z_w, z_l, cond = setup
    policy = _policy(pipe, adapter)
    points = _inpo(policy, pipe.unet, pipe, z_w, z_l, cond, torch.Generator().manual_seed(0))
    loss, _ = points_loss(policy, points, beta=1000.0, loss_type="sigmoid")
    assert loss.item() == pytest.approx(np.log(2), abs=1e-5)  # the policy is the reference: inside == 0
    loss.backward()
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values() if p.grad is not None))
    assert grad_norm.item() > 1e-6
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(params.values(), lr=1e-2).step()
    assert any(not torch.equal(before[n], p) for n, p in params.items()), "no weight moved"


def test_inpo_a_few_steps_on_one_pair_raise_implicit_accuracy(setup):
    pipe, z_w, z_l, cond = setup
    # One pair, repeated: every row draws its own timestep and inversion noise, so a step sees 8 draws of it.
    rows = torch.zeros(8, dtype=torch.long)
    zw, zl, c = z_w[rows], z_l[rows], cond.index(rows)
    policy = _policy(pipe, "full")
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        loss, _ = points_loss(policy, _inpo(policy, pipe.unet, pipe, zw, zl, c, g), beta=2000.0, loss_type="sigmoid")
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Fresh draws (new timesteps and inversion noise), the inversion by the trained policy, as in training.
    _, metrics = points_loss(policy, _inpo(policy, pipe.unet, pipe, zw, zl, c, g), beta=2000.0, loss_type="sigmoid")
    assert metrics["implicit_acc"].item() > 0.5


def _hand_written_inpo_loss(policy, ref, pipe, z_w, z_l, cond, seed, steps, eta, beta):
    """InPO's step for ONE pair, written out: explicit inverse DDIM loop, eta noise, implied noise, DPO loss.

    Draws from a generator seeded like the one handed to inpo_points, in its order: the timestep, then one
    (2, C, h, w) normal per inversion step (winner and loser rows).
    """
    cfg = pipe.scheduler.config
    abar = pipe.scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(seed)
    t = int(torch.randint(0, cfg.num_train_timesteps, (1,), generator=g))
    ratio = cfg.num_train_timesteps // steps
    grid = [k * ratio + cfg.steps_offset for k in range(steps)]  # the inverse DDIM grid, ascending ("leading")
    abar_start = 1.0 if cfg.set_alpha_to_one else abar[0]
    z0 = torch.cat([z_w, z_l]).double()  # (2, C, h, w): winner, loser
    c2 = cond.map(lambda x: torch.cat([x, x]))
    x = z0.clone()
    taken = 0
    with torch.no_grad():
        for tk in grid:
            if tk >= t:  # only the grid steps below the pair's timestep
                break
            prev = tk - ratio
            a_prev = abar[prev] if prev >= 0 else abar_start
            a_k = abar[tk]
            eps = policy(x.float(), torch.tensor([tk, tk]), **c2.unet_kwargs()).sample.double()
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_k.sqrt() * x0 + (1 - a_k).sqrt() * eps
            a_up = abar[min(tk + ratio, cfg.num_train_timesteps - 1)]
            var = (1 - a_k) / (1 - a_up) * (1 - a_up / a_k)
            x = x + eta * var.sqrt() * torch.randn((2, 4, 8, 8), generator=g).double()
            taken += 1
    target = (x - abar[t].sqrt() * z0) / (1 - abar[t]).sqrt()
    at = torch.tensor([t, t])
    pred = policy(x.float(), at, **c2.unet_kwargs()).sample
    with torch.no_grad():
        ref_pred = ref(x.float(), at, **c2.unet_kwargs()).sample
    err = ((pred.double() - target) ** 2).mean(dim=(1, 2, 3))
    ref_err = ((ref_pred.double() - target) ** 2).mean(dim=(1, 2, 3))
    inside = -0.5 * beta * ((err[0] - err[1]) - (ref_err[0] - ref_err[1]))
    return -F.logsigmoid(inside), taken


def test_inpo_one_step_loss_equals_a_hand_written_computation(setup):
    pipe, z_w, z_l, cond = setup
    one = slice(0, 1)
    policy = _nudged(pipe)
    # A seed whose timestep leaves several inversion steps below it (and one not on the grid's last step).
    seed = next(
        s
        for s in range(100)
        if 350 < int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(s))) < 880
    )
    expected, taken = _hand_written_inpo_loss(
        policy, pipe.unet, pipe, z_w[one], z_l[one], cond.index(one), seed, steps=10, eta=0.1, beta=1500.0
    )
    assert taken >= 3
    points = _inpo(policy, pipe.unet, pipe, z_w[one], z_l[one], cond.index(one), torch.Generator().manual_seed(seed))
    loss, _ = points_loss(policy, points, beta=1500.0, loss_type="sigmoid")
    assert abs(loss.item() - np.log(2)) > 1e-3  # the nudge made it non-trivial
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)

    # The gradient too: the hand-written loss backpropagates through the same policy forward.
    loss.backward()
    ours = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    _hand_written_inpo_loss(
        policy, pipe.unet, pipe, z_w[one], z_l[one], cond.index(one), seed, steps=10, eta=0.1, beta=1500.0
    )[0].backward()
    for a, b in zip(ours, (p.grad for p in policy.parameters()), strict=True):
        assert (a - b).norm() <= 1e-3 * b.norm() + 1e-9


def test_partial_inversion_stops_each_row_at_its_own_timestep(setup):
    pipe, z_w, _, cond = setup
    z = torch.cat([z_w, z_w[:1]])  # (3, C, h, w)
    c = cond.index(torch.tensor([0, 1, 0]))
    full = ddim_invert(pipe.unet, pipe.scheduler.config, z, c, num_steps=10)
    stop = torch.tensor([0, 250, 1000])  # no step, the steps at 1 / 101 / 201, all ten
    part = ddim_invert(pipe.unet, pipe.scheduler.config, z, c, num_steps=10, stop_before=stop)
    torch.testing.assert_close(part.latents[-1][0], z[0])
    torch.testing.assert_close(part.latents[-1][1], full.latents[3][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(part.latents[-1][2], full.latents[10][2], atol=1e-5, rtol=0)
    assert part.timesteps.tolist() == full.timesteps.tolist()  # row 2 took every step
    assert torch.count_nonzero(part.query_eps[5][1]) == 0  # rows that stopped took no step there

    # eta adds a random term; eta 0 with stop_before at the end is the plain inversion.
    g = torch.Generator().manual_seed(0)
    noisy = ddim_invert(
        pipe.unet, pipe.scheduler.config, z, c, num_steps=10, stop_before=stop, eta=0.1,
        generator=g,
    )  # fmt: skip
    moved = (noisy.latents[-1] - part.latents[-1]).abs().amax(dim=(1, 2, 3))
    assert moved[0] == 0 and moved[1] > 0 and moved[2] > 0
    with pytest.raises(ValueError, match="generator"):
        ddim_invert(pipe.unet, pipe.scheduler.config, z, c, num_steps=10, eta=0.1)


def test_inpo_settings_have_bounds_and_released_defaults():
    cfg = parse_config({"base_model": "m", "dataset": "d", "method": "inpo"})
    assert (cfg.inpo_inversion_steps, cfg.inpo_eta, cfg.inpo_inverter) == (10, 0.1, "policy")
    for field, bad in [("inpo_eta", 1.5), ("inpo_inversion_steps", 0), ("inpo_inverter", "teacher")]:
        with pytest.raises(ConfigError, match=field):
            parse_config({"base_model": "m", "dataset": "d", "method": "inpo", field: bad})
