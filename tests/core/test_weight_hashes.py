"""Fixed-seed training runs pinned to a fingerprint of their weight updates: a change to the training loop that
changes what is computed (another random draw, another order of draws, another loss) moves the fingerprint by about
the size of the update; a refactor must not move it. A change that is meant to change the numbers re-pins these
and says why in its commit.

Why a fingerprint with a tolerance, not a hash: bit-identical weights hold on one machine, not across them. Even with
every dispatcher held at its baseline (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_CBWR, one thread), hashes pinned on
an Intel AVX-512 machine differed on an AMD EPYC one with the same code and wheels. The fingerprint is the update's
norm and its dot products with 16 fixed random sign vectors; rounding noise moves each by a small fraction of the
update's norm (measured: FINGERPRINT_TOLERANCE says how much), any change of the computation by about all of it.
What it cannot see is a change of numerics alone below that noise: storing the inversion cache in fp16 instead of
fp32 moved the inversion runs by 0.03-0.04.
For a refactor on one machine, run this file as a script before and after: it prints the exact sha256 of each run's
weights too, and those must be equal.
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
    "inversion_dpo_full": {"method": "inversion_dpo"},
    "inversion_dpo_lora": {"method": "inversion_dpo", "adapter": LORA},
    "diffusion_dpo_full": {"method": "diffusion_dpo"},
    "diffusion_dpo_lora": {"method": "diffusion_dpo", "adapter": LORA},
    # The two other inversion caches and all N points (the two-pass gradient).
    "inversion_dpo_disk_all_points": {"method": "inversion_dpo", "inversion_cache": "disk", "timesteps_per_step": 0},
    # No cache recomputes the same inversion every step: the same weights as the memory cache, bit for bit.
    "inversion_dpo_no_cache_lora": {"method": "inversion_dpo", "inversion_cache": "none", "adapter": LORA},
}
SAME_WEIGHTS = [("inversion_dpo_lora", "inversion_dpo_no_cache_lora")]

# [update norm, 16 projections], printed by `python tests/core/test_weight_hashes.py`.
PINNED: dict[str, list[float]] = {
    "inversion_dpo_full": [
        1.387686908, 0.572197678, -0.5456875098, -0.06759573445, -0.5646523388, -0.1229676215, -0.1466656143,
        0.07415645324, 1.948668474, 3.303872763, -0.06743202694, -0.5821770016, -2.005999344, 2.112956959,
        -0.7028131794, -1.346318755, -2.174363045
    ],
    "inversion_dpo_lora": [
        0.1068474752, -0.02641438047, -0.1930694321, 0.06240846642, -0.1497453889, -0.04295801831, -0.109834057,
        -0.05865351303, -0.02741876914, -0.03204580041, -0.1822626988, -0.1613307596, -0.1234236047,
        0.04667832184, -0.02523516439, 0.1076700775, 0.07896609354
    ],
    "diffusion_dpo_full": [
        1.39097516, 1.131335813, 1.93479337, 0.1290760797, -0.8281984764, 0.384456235, 1.170496871, 1.604160343,
        0.06823886052, -0.4356421893, -0.2887631915, -1.573089954, 1.553493087, 0.9922591276, 1.376223983,
        0.3619129842, -0.8940585992
    ],
    "diffusion_dpo_lora": [
        0.1067163317, -0.09933334071, -0.02360027452, -0.02565276279, 0.2519818222, 0.02813469194, 0.02353581443,
        -0.0264525917, -0.3326996257, 0.04200165492, 0.1163029364, -0.06960493553, -0.09151339013, -0.1123192238,
        0.0887784083, 0.1125395104, 0.03326535627
    ],
    "inversion_dpo_disk_all_points": [
        1.37858071, 0.7982896881, 3.030117508, 0.4121297111, -0.3848837868, 1.58832536, 0.1449213676,
        -0.8342154804, 3.671904316, -0.6049127011, -0.6587700255, 0.8762849431, -0.3781763286, -0.1227066246,
        -2.232924544, -0.2674410949, -0.5028272856
    ],
    "inversion_dpo_no_cache_lora": [
        0.1068474752, -0.02641438047, -0.1930694321, 0.06240846642, -0.1497453889, -0.04295801831, -0.109834057,
        -0.05865351303, -0.02741876914, -0.03204580041, -0.1822626988, -0.1613307596, -0.1234236047,
        0.04667832184, -0.02523516439, 0.1076700775, 0.07896609354
    ],
}  # fmt: skip

# Largest |fingerprint - pinned| / update norm allowed. Measured on an AMD EPYC machine (2026-11-30): the baseline
# kernels against the machine's own (AVX2, one and two threads) differ by at most 0.028 (Adam's first step is nearly a
# sign, so weights with ~0 gradient move by what rounding decides); another seed moves every run by 2.3-3.2, and two
# different runs here are at least 1.4 apart.
FINGERPRINT_TOLERANCE = 0.1
PROJECTIONS = 16

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


def fingerprint(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> list[float]:
    """[||update||, update . r_1, ..., update . r_16] with fixed random +-1 vectors r (float64). Of a LoRA adapter
    only the B factors count: they start at zero, so they are the update, while the A factors start random and would
    drown it."""
    names = [n for n in sorted(state) if n in base or "lora_B" in n]
    assert names, sorted(state)[:5]
    update = torch.cat([(state[n].double() - (base[n].double() if n in base else 0.0)).flatten() for n in names])
    signs = torch.randint(0, 2, (PROJECTIONS, update.numel()), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return [float(update.norm())] + [float(v) for v in signs.double() @ update]


def run_all() -> dict[str, dict[str, object]]:
    """Every run of RUNS in this process: the tiny SD1.5 model, 4 toy pairs, 2 steps each -> sha256 and fingerprint
    of the trained weights."""
    from invdpo_core.checkpoint import load_checkpoint
    from invdpo_core.config import parse_config
    from invdpo_core.testing import build_tiny_pipeline
    from invdpo_core.toy import make_toy_dataset
    from invdpo_core.train import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipeline = build_tiny_pipeline("sd15", seed=0)
        base = {k: v.detach().clone() for k, v in pipeline.unet.state_dict().items()}
        pipeline.save_pretrained(root / "model")
        dataset = make_toy_dataset(root / "data", 4, model_dir=root / "model")
        out: dict[str, dict[str, object]] = {}
        for name, settings in RUNS.items():
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
            weights = objects["model"]
            out[name] = {"sha256": weights_sha256(weights), "fingerprint": fingerprint(weights, base)}
    return out


def runs_in_child(env: dict[str, str]) -> dict[str, dict[str, object]]:
    # This checkout's code, not the installed one (a worktree sharing a venv would run another checkout's).
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, **env, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def distance(a: list[float], b: list[float]) -> float:
    """Largest difference of two fingerprints, as a share of the update's norm."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / b[0]


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    return runs_in_child({**BASELINE_ENV, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("run", list(RUNS))
def test_fixed_seed_run_gives_the_pinned_weights(results, run):
    got = results[run]["fingerprint"]
    assert distance(got, PINNED[run]) < FINGERPRINT_TOLERANCE, (run, got)


@pytest.mark.parametrize(("a", "b"), SAME_WEIGHTS)
def test_runs_that_compute_the_same_give_bit_identical_weights(results, a, b):
    assert results[a]["sha256"] == results[b]["sha256"]


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    print(json.dumps(run_all()))
