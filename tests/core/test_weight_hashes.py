"""Fixed-seed training runs pinned to the sha256 of their trained weights: a refactor of the training loop must give
bit-identical weights (every random draw in the same order, every operation the same). A change that is meant to
change the numbers updates these hashes and says why in its commit."""

import hashlib

import pytest
import torch

from invdpo_core.checkpoint import load_checkpoint
from invdpo_core.config import parse_config
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"type": "lora", "rank": 4, "alpha": 8.0}
RUNS = {
    "inversion_dpo_full": (
        {"method": "inversion_dpo"},
        "dba5b6d4005daa825be147673821b89035f62a5a5e56cf90b41fa77f48f398e3",
    ),
    "inversion_dpo_lora": (
        {"method": "inversion_dpo", "adapter": LORA},
        "9bf4ef27679d2d3de618f964d980457f48be14e91d92c70412403ac82e9c7d19",
    ),
    "diffusion_dpo_full": (
        {"method": "diffusion_dpo"},
        "74479a96a05c808914253b0a852c54cb77b224832915b69c9c6f6c5a5d1d8a2f",
    ),
    "diffusion_dpo_lora": (
        {"method": "diffusion_dpo", "adapter": LORA},
        "17f496f1987ab73ec431e95af36efab5189f1da84bd7455b873a267998e7a828",
    ),
    # The two other inversion caches and all N points (the two-pass gradient).
    "inversion_dpo_disk_all_points": (
        {"method": "inversion_dpo", "inversion_cache": "disk", "timesteps_per_step": 0},
        "86579d6408279c09d610f9e4cfcb7d3c6414c7fed95b9784334429c853a7d9b7",
    ),
    # No cache recomputes the same inversion every step: the same weights as the memory cache.
    "inversion_dpo_no_cache_lora": (
        {"method": "inversion_dpo", "inversion_cache": "none", "adapter": LORA},
        "9bf4ef27679d2d3de618f964d980457f48be14e91d92c70412403ac82e9c7d19",
    ),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model_dir):
    return make_toy_dataset(tmp_path_factory.mktemp("data"), 4, model_dir=model_dir)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("run", list(RUNS))
def test_fixed_seed_run_gives_the_pinned_weights(tmp_path, model_dir, dataset, run):
    settings, expected = RUNS[run]
    config = parse_config(
        {
            "base_model": str(model_dir),
            "dataset": str(dataset),
            "resolution": 64,
            "inversion_steps": 4,
            "batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1e-3,
            "beta": 500.0,
            "empty_prompt_share": 0.5,
            "checkpoint_interval": 100,
            "output_dir": str(tmp_path / "run"),
            **settings,
        }
    )
    result = train(config)
    objects, _ = load_checkpoint(result.checkpoint)
    assert weights_sha256(objects["model"]) == expected
