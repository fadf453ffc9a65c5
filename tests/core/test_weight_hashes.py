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
        "7b75868e2256a0d1290f8ea48becec787048c8db93502f7ed589cd0ff7af645b",
    ),
    "inversion_dpo_lora": (
        {"method": "inversion_dpo", "adapter": LORA},
        "47c9d1c4e9fd0a3e236265a8593e4b21cae39b6f29f195d55a4213b6bb847384",
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
        "98986dcc9a296b45b81422a3813ae552e895153f4cd6c0e64db50c7a5cf92391",
    ),
    # No cache recomputes the same inversion every step: the same weights as the memory cache.
    "inversion_dpo_no_cache_lora": (
        {"method": "inversion_dpo", "inversion_cache": "none", "adapter": LORA},
        "47c9d1c4e9fd0a3e236265a8593e4b21cae39b6f29f195d55a4213b6bb847384",
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
