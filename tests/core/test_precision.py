"""What real checkpoints need: bf16 at the reference, the SD-family schedules (spacings, v-prediction), the model's
own resolution, fp16 scaler state in checkpoints, EMA, the 8-bit optimizer's refusal, cached text embeddings."""

import numpy as np
import pytest

from invdpo_core.config import parse_config
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model_dir):
    return make_toy_dataset(tmp_path_factory.mktemp("data"), 8, model_dir=model_dir)


@pytest.fixture
def config(tmp_path, model_dir, dataset):
    def make(**overrides):
        base = {
            "base_model": str(model_dir),
            "dataset": str(dataset),
            "resolution": 64,
            "inversion_steps": 4,
            "batch_size": 2,
            "max_steps": 1,
            "learning_rate": 1e-3,
            "beta": 5000.0,
            "checkpoint_interval": 100,
            "output_dir": str(tmp_path / "run"),
        }
        return parse_config({**base, **overrides})

    return make


AT_REFERENCE = {
    "diffusion_dpo": {"method": "diffusion_dpo"},
    "inpo": {"method": "inpo"},
    **{
        f"inversion_{t}": {"method": "inversion_dpo", "inversion_target": t}
        for t in ("paired", "x0", "step", "reference")
    },
}


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("run", list(AT_REFERENCE))
def test_bf16_at_the_reference_gives_ln2(config, run, adapter):
    # On the CPU the VAE returns channels-last latents; bf16 kernels differ by memory format, so a reference run on
    # them and a policy run on contiguous copies disagree and the first loss is not ln 2.
    steps = []
    train(config(**AT_REFERENCE[run], mixed_precision="bf16", adapter={"type": adapter}), _on_step(steps))
    assert steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)


def _on_step(into):
    from invdpo_core.train import TrainCallbacks

    return TrainCallbacks(on_step=lambda s, total, m: into.append(m))


def _with_scheduler(model_dir, tmp_path, **changes):
    """A copy of the tiny pipeline whose scheduler config says `changes` (as a checkpoint a user brings would)."""
    import json
    import shutil

    path = tmp_path / "changed"
    shutil.copytree(model_dir, path)
    scheduler = path / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), **changes}))
    return path


SCHEDULES = {
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "v_prediction": {"prediction_type": "v_prediction"},
}
# What each method trains; the rest is refused naming the field.
TRAINS = {
    ("diffusion_dpo", "linspace"), ("diffusion_dpo", "trailing"), ("diffusion_dpo", "v_prediction"),
    ("inversion_dpo", "trailing"), ("inpo", "trailing"),
}  # fmt: skip


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("method", ["diffusion_dpo", "inversion_dpo", "inpo"])
def test_sd_family_schedules_train_or_are_refused_before_training(config, model_dir, tmp_path, method, schedule):
    from invdpo_core.train import TrainError
    from services.jobs.file_checks import check_files

    model = _with_scheduler(model_dir, tmp_path, **SCHEDULES[schedule])
    cfg = config(method=method, base_model=str(model))
    error = check_files(str(model), cfg.dataset, None, 2, method=method)
    if (method, schedule) in TRAINS:
        assert error is None
        steps = []
        train(cfg, _on_step(steps))
        assert steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    else:
        field = next(iter(SCHEDULES[schedule]))
        assert error is not None and error["param"] == "model" and f"scheduler.{field}" in error["message"]
        with pytest.raises(TrainError, match=f"scheduler.{field}"):
            train(cfg)


def test_diffusion_dpo_asks_a_v_prediction_model_for_v():
    import torch
    from diffusers import DDPMScheduler

    from invdpo_core.inversion import Conditioning
    from invdpo_core.methods import diffusion_dpo_points

    scheduler = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    z_w, z_l = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def zero_unet(x, t, **_):
        return type("Out", (), {"sample": torch.zeros_like(x)})

    points = diffusion_dpo_points(
        zero_unet, scheduler, z_w, z_l, Conditioning(torch.zeros(2, 1, 1)), generator=torch.Generator().manual_seed(0)
    )
    abar = scheduler.alphas_cumprod[points.timesteps].view(-1, 1, 1, 1)
    noise = (points.xt_w - abar**0.5 * z_w) / (1 - abar) ** 0.5  # the shared noise, recovered from x_t
    torch.testing.assert_close(points.target_w, abar**0.5 * noise - (1 - abar) ** 0.5 * z_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(points.target_l, abar**0.5 * noise - (1 - abar) ** 0.5 * z_l, atol=1e-4, rtol=0)


def test_fp16_checkpoint_holds_the_grad_scaler_state_and_resume_restores_it(config, tmp_path):
    # accelerate makes no GradScaler on the CPU (and fp16 does not train there), so the scaler a GPU run would have
    # is put in place by hand: what is tested is that save() writes its state and resume() restores it.
    import torch

    from invdpo_core.checkpoint import latest_checkpoint, load_checkpoint
    from invdpo_core.train import Position, make_accelerator, make_optimizer, resume, save

    cfg = config(mixed_precision="fp16")
    accelerator = make_accelerator(cfg)
    policy = torch.nn.Linear(2, 2)
    optimizer, lr_scheduler = make_optimizer(policy, cfg)  # type: ignore[arg-type]
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    accelerator.scaler.scale(torch.ones(()))  # the lazy state a run's first backward creates
    accelerator.scaler.update(new_scale=256.0)  # a state a run reaches after overflows
    checkpoints = tmp_path / "checkpoints"
    save(checkpoints, Position(step=5), cfg, policy, optimizer, lr_scheduler, torch.Generator(), accelerator, None)
    objects, _ = load_checkpoint(latest_checkpoint(checkpoints))
    assert objects["scaler"]["scale"] == 256.0 and objects["scaler"]["growth_interval"] == 3

    accelerator.scaler = torch.amp.GradScaler("cpu")  # a fresh process: the default scale 65536
    position = resume(checkpoints, cfg, policy, optimizer, lr_scheduler, torch.Generator(), accelerator)
    assert position.step == 5 and accelerator.scaler.get_scale() == 256.0
    assert accelerator.scaler.state_dict() == objects["scaler"]
