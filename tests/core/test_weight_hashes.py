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
        "6ca413ab047563dd21de2b82a19ec9c921f439fe031d00106e7b95c90fb6fd68",
    ),
    "inversion_dpo_lora": (
        {"method": "inversion_dpo", "adapter": LORA},
        "7320a6baf0dd21a932f5af1722fde2010e003d023c170a9a0efb570cbfab3179",
    ),
    "diffusion_dpo_full": (
        {"method": "diffusion_dpo"},
        "dfbe808d9a3946203d4b0fd08083802448b0cc0b3488697c61e10df22c1fca65",
    ),
    "diffusion_dpo_lora": (
        {"method": "diffusion_dpo", "adapter": LORA},
        "771e202856c6b6d9419f73a38d7e34ad3f42b00a5091de2d9fe699d34eb5be5d",
    ),
    # The two other inversion caches and all N points (the two-pass gradient).
    "inversion_dpo_disk_all_points": (
        {"method": "inversion_dpo", "inversion_cache": "disk", "timesteps_per_step": 0},
        "4433f729dd67df9c4640ab38ecb6d2b7406c890ad69124838cc51c44e2cfe33f",
    ),
    # No cache recomputes the same inversion every step: the same weights as the memory cache.
    "inversion_dpo_no_cache_lora": (
        {"method": "inversion_dpo", "inversion_cache": "none", "adapter": LORA},
        "7320a6baf0dd21a932f5af1722fde2010e003d023c170a9a0efb570cbfab3179",
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
    assert weights_sha256(objects["model"]) == expected, weights_sha256(objects["model"])
