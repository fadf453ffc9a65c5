"""Fixed-seed training runs pinned to the sha256 of their trained weights: a refactor of the training loop must give
bit-identical weights (every random draw in the same order, every operation the same). A change that is meant to
change the numbers updates these hashes and says why in its commit.

Bit-identical across machines too: torch, oneDNN and MKL pick kernels by the CPU's instruction set (AVX-512 and AVX2
round differently), so the runs are made in a child process with every dispatcher held at its baseline
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR) and one thread; the tiny model and its data are made there too.
Run as a script it prints the hashes: `python tests/core/test_weight_hashes.py`.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

LORA = {"type": "lora", "rank": 4, "alpha": 8.0}
RUNS = {
    "inversion_dpo_full": (
        {"method": "inversion_dpo"},
        "2ec684d792cfe597bdc1d6da6f420cc1343535f8463e2adf37a5f5c098356798",
    ),
    "inversion_dpo_lora": (
        {"method": "inversion_dpo", "adapter": LORA},
        "651f98b1c4811430050ecc78cfce7a785df1895c30923f8e77edbbf84d6fcebb",
    ),
    "diffusion_dpo_full": (
        {"method": "diffusion_dpo"},
        "e424c05ccd3e4c6b129457303925680cbea2881b8bdba0838c0e46f770905d22",
    ),
    "diffusion_dpo_lora": (
        {"method": "diffusion_dpo", "adapter": LORA},
        "346113062eb99d8276634424e1b1921087e442ca63af4915762ce549930f9b6d",
    ),
    # The two other inversion caches and all N points (the two-pass gradient).
    "inversion_dpo_disk_all_points": (
        {"method": "inversion_dpo", "inversion_cache": "disk", "timesteps_per_step": 0},
        "b83fe9753c6dd4827b060f7d70fed80c26f8de8d7e9c5c4db99c77e4435428c8",
    ),
    # No cache recomputes the same inversion every step: the same weights as the memory cache.
    "inversion_dpo_no_cache_lora": (
        {"method": "inversion_dpo", "inversion_cache": "none", "adapter": LORA},
        "651f98b1c4811430050ecc78cfce7a785df1895c30923f8e77edbbf84d6fcebb",
    ),
}


# The dispatchers' baseline: SSE4.1-era kernels every x86-64 server has, MKL's reproducible code path.
BASELINE_ENV = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def run_all() -> dict[str, str]:
    """Every run of RUNS in this process: the tiny SD1.5 model, 4 toy pairs, 2 steps each -> weight hashes."""
    from invdpo_core.checkpoint import load_checkpoint
    from invdpo_core.config import parse_config
    from invdpo_core.testing import build_tiny_pipeline
    from invdpo_core.toy import make_toy_dataset
    from invdpo_core.train import train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_pipeline("sd15", seed=0).save_pretrained(root / "model")
        dataset = make_toy_dataset(root / "data", 4, model_dir=root / "model")
        hashes = {}
        for name, (settings, _) in RUNS.items():
            config = parse_config(
                {
                    "base_model": str(root / "model"),
                    "dataset": str(dataset),
                    "resolution": 64,
                    "inversion_steps": 4,
                    "batch_size": 2,
                    "max_steps": 2,
                    "learning_rate": 1e-3,
                    "beta": 500.0,
                    "empty_prompt_share": 0.5,
                    "checkpoint_interval": 100,
                    "output_dir": str(root / name),
                    **settings,
                }
            )
            objects, _ = load_checkpoint(train(config).checkpoint)
            hashes[name] = weights_sha256(objects["model"])
    return hashes


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    # The child imports this checkout's invdpo_core, not whichever one the environment has installed (a worktree).
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **BASELINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("run", list(RUNS))
def test_fixed_seed_run_gives_the_pinned_weights(hashes, run):
    assert hashes[run] == RUNS[run][1], hashes[run]


if __name__ == "__main__":
    print(json.dumps(run_all()))
