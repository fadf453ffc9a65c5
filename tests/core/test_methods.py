import copy

import pytest
import torch
from peft import LoraConfig

from invdpo_core.inversion import build_inverted_pairs, encode_prompts, pair_coin
from invdpo_core.methods import (
    all_points_backward,
    diffusion_dpo_points,
    inversion_dpo_points,
    points_loss,
    timestep_weights,
)
from invdpo_core.testing import build_tiny_pipeline

N_STEPS = 6


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_pipeline("sd15", seed=0)
    g = torch.Generator().manual_seed(1)
    z_w, z_l = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device=torch.device("cpu"), resolution=64)
    return pipe, z_w, z_l, cond


def _pairs(setup, target):
    pipe, z_w, z_l, cond = setup
    return build_inverted_pairs(
        pipe.unet, pipe.scheduler.config, z_w, z_l, cond, target=target, num_steps=N_STEPS,
        use_winner_noise=pair_coin(0, ["a", "b"]),
    )  # fmt: skip


def _policy(pipe, adapter):
    unet = copy.deepcopy(pipe.unet)
    if adapter == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _trainable(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("target", ["paired", "x0", "step"])
def test_gradient_is_nonzero_at_init_and_step_changes_weights(setup, target, adapter):
    pipe = setup[0]
    pairs = _pairs(setup, target)
    policy = _policy(pipe, adapter)
    points = inversion_dpo_points(
        pairs, setup[3], k=2, weights=torch.ones(N_STEPS), generator=torch.Generator().manual_seed(0)
    )
    loss, metrics = points_loss(policy, points, beta=1000.0, loss_type="sigmoid")
    # Policy bit-identical to the reference: the loss starts at ln 2 exactly when the reference errors are the
    # policy's own (they are for every cached target).
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)
    loss.backward()
    params = _trainable(policy)
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values() if p.grad is not None))
    assert grad_norm.item() > 1e-6
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(params.values(), lr=1e-2).step()
    changed = [n for n, p in params.items() if not torch.equal(before[n], p)]
    assert changed, "no weight moved"


def test_reference_target_has_exactly_zero_gradient_at_init(setup):
    pairs = _pairs(setup, "reference")
    assert torch.count_nonzero(pairs.ref_err_w) == 0
    policy = _policy(setup[0], "full")
    points = inversion_dpo_points(pairs, setup[3], k=2, weights=torch.ones(N_STEPS), generator=torch.Generator())
    loss, _ = points_loss(policy, points, beta=1000.0, loss_type="sigmoid")
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.parameters())


def test_paired_shares_one_noise_and_keeps_the_source_point(setup):
    pipe, z_w, z_l, cond = setup
    pairs = _pairs(setup, "paired")
    torch.testing.assert_close(pairs.target_w, pairs.target_l)
    abar = pipe.scheduler.alphas_cumprod[pairs.timesteps].view(1, -1, 1, 1, 1)
    # Both points are forward-noisings of their own clean latent with the shared noise.
    torch.testing.assert_close(pairs.xt_w, abar.sqrt() * z_w[:, None] + (1 - abar).sqrt() * pairs.target_w)
    torch.testing.assert_close(pairs.xt_l, abar.sqrt() * z_l[:, None] + (1 - abar).sqrt() * pairs.target_l)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("weighting", ["uniform", "inverse_alpha"])
def test_two_pass_all_points_gradient_equals_direct_autograd(setup, loss_type, weighting):
    pipe, _, _, cond = setup
    pairs = _pairs(setup, "x0")
    weights = timestep_weights(pairs.timesteps, pipe.scheduler.alphas_cumprod, weighting)
    a, b = _policy(pipe, "full"), _policy(pipe, "full")
    with torch.no_grad():  # move the policy off the reference so every loss type has a non-trivial gradient
        for p in list(a.parameters())[-4:]:
            p.add_(0.01 * torch.randn_like(p))
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pb.copy_(pa)
    loss_a, _ = all_points_backward(a, pairs, cond, weights=weights, beta=500.0, loss_type=loss_type)
    # Direct: every point in one graph.
    points = inversion_dpo_points(pairs, cond, k=N_STEPS, weights=weights, generator=torch.Generator())
    loss_b, _ = points_loss(b, points, beta=500.0, loss_type=loss_type)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        # Same maths, different float summation order: compare each tensor relative to its norm.
        assert (pa.grad - pb.grad).norm() <= 1e-4 * pb.grad.norm() + 1e-9, name


def _train_one_pair(policy, make_points, steps=8, lr=1e-3):
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, metrics = points_loss(policy, make_points(), beta=2000.0, loss_type="sigmoid")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return points_loss(policy, make_points(), beta=2000.0, loss_type="sigmoid")[1]


@pytest.mark.parametrize("method", ["diffusion_dpo", "paired", "x0", "step"])
def test_a_few_steps_on_one_pair_raise_implicit_accuracy(setup, method):
    pipe, z_w, z_l, cond = setup
    one = slice(0, 1)
    policy = _policy(pipe, "full")
    if method == "diffusion_dpo":
        g = torch.Generator().manual_seed(0)

        def make_points():
            return diffusion_dpo_points(pipe.unet, pipe.scheduler, z_w[one], z_l[one], cond.index(one), generator=g)

    else:
        pairs = _pairs(setup, method).select(one)
        g = torch.Generator().manual_seed(0)

        def make_points():
            return inversion_dpo_points(pairs, cond.index(one), k=N_STEPS, weights=torch.ones(N_STEPS), generator=g)

    metrics = _train_one_pair(policy, make_points)
    assert metrics["implicit_acc"].item() > 0.5
