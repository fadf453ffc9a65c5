from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from invdpo_core.inversion import Conditioning, ddim_invert, ddim_move, ddim_sample, encode_prompts, inversion_grid
from invdpo_core.testing import build_tiny_pipeline


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return build_tiny_pipeline(kind=request.param, seed=0)


def _latents(seed=0, b=2):
    return torch.randn((b, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def changed(config, **changes):
    """The scheduler config with `changes`, as a checkpoint's scheduler_config.json would say them. An in-memory
    diffusers config lists the keys it took defaults for in `_use_default_values`, and from_config drops those keys
    again, so {**config, "timestep_spacing": "trailing"} alone silently stays leading."""
    from invdpo_core.config import scheduler_as_written

    return {**scheduler_as_written(config), **changes}


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_equals_diffusers_inverse_scheduler_loop(pipe, spacing):
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device=torch.device("cpu"), resolution=64)
    z0 = _latents()
    config = changed(pipe.scheduler.config, timestep_spacing=spacing)
    traj = ddim_invert(pipe.unet, config, z0, cond, num_steps=10)

    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(10)
    x = z0.clone()
    with torch.no_grad():
        for i, t in enumerate(inverse.timesteps):
            eps = pipe.unet(x, t, **cond.unet_kwargs()).sample
            torch.testing.assert_close(traj.query_eps[i], eps, atol=1e-5, rtol=0)
            x = inverse.step(eps, t, x).prev_sample
            torch.testing.assert_close(traj.latents[i + 1], x, atol=1e-5, rtol=0)
    assert (traj.latents[-1] - x).abs().max().item() <= 1e-5
    assert traj.latents.shape == (11, 2, 4, 8, 8) and traj.timesteps.tolist() == inverse.timesteps.tolist()
    assert traj.timesteps[-1].item() == (999 if spacing == "trailing" else 901)  # the spacing really changed


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_the_grid_is_diffusers_ddim_grid_ascending_for_every_spacing(spacing):
    config = changed(build_tiny_pipeline("sd15").scheduler.config, timestep_spacing=spacing)
    for steps in (10, 30, 999):
        sampling = DDIMScheduler.from_config(config)
        sampling.set_timesteps(steps)
        grid = inversion_grid(config, steps)
        assert grid.timesteps.tolist() == sampling.timesteps.tolist()[::-1]
        if spacing != "linspace":  # the inverse scheduler knows only these two
            inverse = DDIMInverseScheduler.from_config(config)
            inverse.set_timesteps(steps)
            assert grid.timesteps.tolist() == inverse.timesteps.tolist()
    assert (
        inversion_grid(config, 10).timesteps.tolist()[-1]
        == {"leading": 901, "trailing": 999, "linspace": 999}[spacing]
    )
    for steps in range(1, 1000):  # every N the config allows: N distinct points in [0, T)
        ts = inversion_grid(config, steps).timesteps
        assert len(ts) == steps and ts[0] >= 0 and ts[-1] <= 999 and bool((ts.diff() > 0).all()), steps


def test_a_trailing_grid_has_n_points_where_diffusers_float_arange_makes_n_plus_one():
    # np.arange(1000, 0, -1000 / 61) has 62 elements, the last rounding to timestep -1: diffusers' trailing grid
    # then starts at -1 (alphas_cumprod[-1] is the NOISIEST level) and has 62 points. Ours drops that one.
    config = changed(build_tiny_pipeline("sd15").scheduler.config, timestep_spacing="trailing")
    diffusers_grid = DDIMScheduler.from_config(config)
    diffusers_grid.set_timesteps(61)
    assert len(diffusers_grid.timesteps) == 62 and diffusers_grid.timesteps[-1] == -1
    grid = inversion_grid(config, 61)
    assert grid.timesteps.tolist() == diffusers_grid.timesteps.tolist()[::-1][1:]
    assert grid.timesteps[:3].tolist() == [15, 32, 48] and grid.timesteps[-1] == 999


def test_a_grid_starting_at_timestep_0_takes_the_clean_latent_at_abar_1():
    # SD checkpoints say set_alpha_to_one: false, so diffusers takes the clean latent at abar_0; a linspace grid
    # starts AT timestep 0, so its first step would not move and its point would carry no noise.
    config = changed(build_tiny_pipeline("sd15").scheduler.config, timestep_spacing="linspace")
    grid = inversion_grid(config, 10)
    assert grid.timesteps[0] == 0 and grid.level_before(0).item() == 1.0
    leading = inversion_grid(changed(config, timestep_spacing="leading"), 10)  # starts at 1: diffusers' abar_0
    assert leading.level_before(0).item() == pytest.approx(DDIMScheduler.from_config(config).alphas_cumprod[0].item())
    model = GaussianOptimalDenoiser(grid.alphas_cumprod, std=0.5)
    z0 = 0.5 * _latents(b=4)
    traj = ddim_invert(model, config, z0, Conditioning(torch.zeros(4, 2, 32)), num_steps=10)
    a0 = grid.alphas_cumprod[0]
    noise = (traj.latents[1] - a0**0.5 * z0) / (1 - a0) ** 0.5  # the first point's implied noise: the model's eps
    torch.testing.assert_close(noise, model(z0, torch.zeros(4, dtype=torch.long)).sample, atol=1e-4, rtol=0)


def test_inpos_noise_term_denoises_from_the_grid_point_above():
    config = changed(build_tiny_pipeline("sd15").scheduler.config, timestep_spacing="linspace")
    grid = inversion_grid(config, 10)  # 0, 111, ..., 999: not T // N = 100 apart
    assert grid.level_after(0) == grid.alphas_cumprod[111] and grid.level_after(9) == grid.alphas_cumprod[999]
    leading = inversion_grid(changed(config, timestep_spacing="leading"), 10)  # InPO's released t + T // N
    assert (
        leading.level_after(3) == leading.alphas_cumprod[401] and leading.level_after(9) == leading.alphas_cumprod[999]
    )


def test_a_linspace_step_starts_from_the_level_the_latent_sits_at(pipe):
    # linspace points are 999 / (N - 1) apart, not T // N: step k starts at the previous grid point's level, not
    # at t_k - T // N as diffusers' schedulers assume (a level no latent of the trajectory sits at).
    config = changed(pipe.scheduler.config, timestep_spacing="linspace")
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device=torch.device("cpu"), resolution=64)
    traj = ddim_invert(pipe.unet, config, _latents(), cond, num_steps=10)
    alphas = DDIMScheduler.from_config(config).alphas_cumprod
    assert traj.timesteps.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    for k in range(1, 10):
        t_prev, t = traj.timesteps[k - 1], traj.timesteps[k]
        x = traj.latents[k]
        with torch.inference_mode():
            eps = pipe.unet(x, t, **cond.unet_kwargs()).sample
        z = (x - (1 - alphas[t_prev]) ** 0.5 * eps) / alphas[t_prev] ** 0.5
        torch.testing.assert_close(traj.latents[k + 1], alphas[t] ** 0.5 * z + (1 - alphas[t]) ** 0.5 * eps)


def test_a_v_inversion_step_is_the_exact_inverse_of_a_ddim_sampling_step():
    # Sampling from level a_k to a_{k-1} with a v output, then inverting back with the same v, returns the latent
    # exactly. diffusers' inverse scheduler converts v at the level the latent sits at, which is not the inverse.
    a_k, a_prev = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_k, v = (
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    x_prev, _ = ddim_move(x_k, v, a_k, a_prev, "v_prediction", queried_at="from")
    back, eps = ddim_move(x_prev, v, a_prev, a_k, "v_prediction", queried_at="to")
    torch.testing.assert_close(back, x_k, atol=1e-12, rtol=0)
    torch.testing.assert_close(eps, a_k**0.5 * v + (1 - a_k) ** 0.5 * x_k, atol=1e-12, rtol=0)  # the step's noise
    diffusers_z = a_prev**0.5 * x_prev - (1 - a_prev) ** 0.5 * v
    diffusers_back = a_k**0.5 * diffusers_z + (1 - a_k) ** 0.5 * (a_prev**0.5 * v + (1 - a_prev) ** 0.5 * x_prev)
    assert (diffusers_back - x_k).abs().max() > 0.1


def test_ddim_sample_matches_diffusers_ddim_scheduler_for_a_v_prediction_model():
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = changed(pipe.scheduler.config, prediction_type="v_prediction", timestep_spacing="trailing")
    cond = encode_prompts(pipe, ["a red circle"], device=torch.device("cpu"), resolution=64)
    noise = _latents(b=1)
    ours = ddim_sample(pipe.unet, config, noise, cond, num_steps=10)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(10)
    assert sched.config.prediction_type == "v_prediction"
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t, **cond.unet_kwargs()).sample, t, x).prev_sample
    assert (ours - x).abs().max().item() <= 1e-5


def test_guided_inversion_uses_both_branches(pipe):
    dev = torch.device("cpu")
    cond = encode_prompts(pipe, ["a red circle"], device=dev, resolution=64)
    uncond = encode_prompts(pipe, [""], device=dev, resolution=64)
    z0 = _latents(b=1)
    plain = ddim_invert(pipe.unet, pipe.scheduler.config, z0, cond, num_steps=5)
    guided = ddim_invert(pipe.unet, pipe.scheduler.config, z0, cond, num_steps=5, guidance=2.0, uncond=uncond)
    assert not torch.allclose(plain.latents[-1], guided.latents[-1])
    with pytest.raises(ValueError, match="uncond"):
        ddim_invert(pipe.unet, pipe.scheduler.config, z0, cond, num_steps=5, guidance=2.0)


def test_ddim_sample_matches_diffusers_ddim_scheduler(pipe):
    cond = encode_prompts(pipe, ["a red circle"], device=torch.device("cpu"), resolution=64)
    noise = _latents(b=1)
    ours = ddim_sample(pipe.unet, pipe.scheduler.config, noise, cond, num_steps=10)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pipe.unet(x, t, **cond.unet_kwargs()).sample, t, x).prev_sample
    assert (ours - x).abs().max().item() <= 1e-5


class GaussianOptimalDenoiser:
    """The exact predictor for latents drawn from N(0, s^2 I): with d = a s^2 + 1 - a, the noise
    eps(x_t, t) = sqrt(1 - a) x_t / d, the clean latent z(x_t, t) = sqrt(a) s^2 x_t / d, and for a v-prediction
    model v = sqrt(a) eps - sqrt(1 - a) z.

    With the exact score, invert-then-sample differs from the identity only by the inversion's discretisation
    (x_{t-1} taken for x_t when querying the model), which must shrink as the number of steps grows. An untrained
    random UNet is no denoiser at all (errors above 1 at every N), so it cannot pin this.
    """

    def __init__(self, alphas_cumprod, std, prediction="epsilon"):
        self.alphas_cumprod, self.var, self.prediction = alphas_cumprod, std**2, prediction

    def __call__(self, x, t, **_):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        d = a * self.var + 1 - a
        eps, z = (1 - a).sqrt() * x / d, a.sqrt() * self.var * x / d
        return SimpleNamespace(sample=eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z)


# Max abs reconstruction error over 4 latents (latent units, data std 0.5), shrinking like 1/N as a first-order
# discretisation should. Measured, epsilon: 0.405 / 0.197 / 0.076; v-prediction: 0.212 / 0.094 / 0.033, where
# diffusers' DDIMInverseScheduler (v converted at the latent's own level) gives 0.606 / 0.327 / 0.137 (printed
# below). Reported in docs/method.md.
RECONSTRUCTION_BOUND = {
    ("epsilon", 10): 0.45, ("epsilon", 20): 0.22, ("epsilon", 50): 0.085,
    ("v_prediction", 10): 0.24, ("v_prediction", 20): 0.11, ("v_prediction", 50): 0.04,
}  # fmt: skip


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_invert_then_sample_reconstructs(steps, prediction):
    config = changed(build_tiny_pipeline("sd15").scheduler.config, prediction_type=prediction)
    alphas = DDIMScheduler.from_config(config).alphas_cumprod
    model = GaussianOptimalDenoiser(alphas, std=0.5, prediction=prediction)
    z0 = 0.5 * _latents(b=4)
    cond = Conditioning(torch.zeros(4, 2, 32))
    traj = ddim_invert(model, config, z0, cond, num_steps=steps)
    assert 0.8 < traj.latents[-1].std().item() < 1.2  # the endpoint looks like unit noise
    recon = ddim_sample(model, config, traj.latents[-1], cond, num_steps=steps)
    err = (recon - z0).abs().max().item()
    line = f"reconstruction max abs error, {prediction}, {steps} steps: {err:.3f}"
    if prediction == "v_prediction":
        inverse = DDIMInverseScheduler.from_config(config)
        inverse.set_timesteps(steps)
        x = z0.clone()
        for t in inverse.timesteps:
            x = inverse.step(model(x, t.view(1)).sample, t, x).prev_sample
        theirs = (ddim_sample(model, config, x, cond, num_steps=steps) - z0).abs().max().item()
        line += f" (diffusers' inverse scheduler: {theirs:.3f})"
        assert err < theirs / 2
    print(line)
    assert err < RECONSTRUCTION_BOUND[prediction, steps]


def _v_model_pair(spacing):
    """The tiny SD1.5 pipeline as a v-prediction model with `spacing`: (pipe, its scheduler config, the conditioning
    of two pairs, z_w, z_l)."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    config = changed(pipe.scheduler.config, prediction_type="v_prediction", timestep_spacing=spacing)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], device=torch.device("cpu"), resolution=64)
    return pipe, config, cond, _latents(1), _latents(2)


def test_a_v_prediction_model_is_asked_for_v_at_the_inverted_points_and_its_reference_errors_are_in_v():
    from diffusers import DDPMScheduler

    from invdpo_core.inversion import build_inverted_pairs, implied_noise

    pipe, config, cond, z_w, z_l = _v_model_pair("linspace")
    pairs = build_inverted_pairs(pipe.unet, config, z_w, z_l, cond, target="paired", num_steps=5)
    grid = inversion_grid(config, 5)
    abar = grid.alphas_cumprod[grid.timesteps]
    asked = pairs.for_prediction("paired", abar, "v_prediction")
    assert pairs.for_prediction("paired", abar, "epsilon") is pairs
    ddpm = DDPMScheduler.from_config(config)
    for k, t in enumerate(grid.timesteps.tolist()):
        a = abar[k]
        noise = implied_noise(pairs.xt_w[:, k], z_w, a)  # the shared noise, recovered from the winner's point
        torch.testing.assert_close(pairs.target_w[:, k], noise, atol=1e-4, rtol=0)  # stored as noise
        velocity = ddpm.get_velocity(z_w, noise, torch.full((2,), t))  # diffusers' v target
        torch.testing.assert_close(asked.target_w[:, k], velocity, atol=1e-4, rtol=0)
        with torch.inference_mode():
            v_ref = pipe.unet(pairs.xt_w[:, k], t, **cond.unet_kwargs()).sample
        err = (v_ref - velocity).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(pairs.ref_err_w[:, k], err, atol=1e-5, rtol=1e-4)


def test_a_v_models_step_target_is_its_own_query_and_survives_a_bf16_cache():
    # step keeps its target in the model's terms: for a v model the v that maps x_k to x_{k-1}, which is the
    # reference's query at (x_{k-1}, t_k). Stored as v, bf16 rounds it like any latent; derived from separately
    # rounded x_t and noise it would carry their rounding times 1 / sqrt(abar) (15x at t = 999).
    from invdpo_core.inversion import build_inverted_pairs

    pipe, config, cond, z_w, z_l = _v_model_pair("trailing")
    exact = build_inverted_pairs(pipe.unet, config, z_w, z_l, cond, target="step", num_steps=5)
    traj = ddim_invert(pipe.unet, config, z_w, cond, num_steps=5)
    for k, t in enumerate(traj.timesteps.tolist()):
        with torch.inference_mode():
            query = pipe.unet(traj.latents[k], t, **cond.unet_kwargs()).sample
        torch.testing.assert_close(exact.target_w[:, k], query, atol=1e-4, rtol=0)
    grid = inversion_grid(config, 5)
    assert exact.for_prediction("step", grid.alphas_cumprod[grid.timesteps], "v_prediction") is exact
    rounded = build_inverted_pairs(
        pipe.unet, config, z_w, z_l, cond, target="step", num_steps=5, storage_dtype=torch.bfloat16
    )
    scale = exact.target_w.abs().amax(dim=(0, 2, 3, 4))  # per point
    error = (rounded.target_w - exact.target_w).abs().amax(dim=(0, 2, 3, 4))
    assert (error <= scale * 2**-8).all(), (error / scale).tolist()  # bf16's own half-ulp, nothing amplified
