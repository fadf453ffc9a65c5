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
    **{f"inversion_{t}": {"method": "inversion_dpo", "inversion_target": t} for t in ("paired", "x0", "step", "reference")},
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
