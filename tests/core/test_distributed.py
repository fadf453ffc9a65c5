"""Two processes on one CPU host (gloo) train what one process trains on the same global batch.

Compared: the losses and the optimizer's gradient moments in the last checkpoint (AdamW's exp_avg and exp_avg_sq
are 0.1 g and 0.001 g^2 after one step: the all-reduced gradient itself). Not the weights at a tight tolerance:
one process and two run the UNet on batches of other sizes, whose kernels round differently (1e-6), and AdamW's
first update is lr * g / (|g| + eps), a sign for every element whose gradient is above eps=1e-8. An element whose
gradient is rounding noise therefore moves by up to a whole step (lr) one way in one run and the other way in the
other, which no tolerance that still catches a missing all-reduce accepts. The learning rate is small so those few
flipped elements do not change the second step's gradient beyond rounding either.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from invdpo_core.checkpoint import latest_checkpoint, load_checkpoint
from invdpo_core.config import parse_config
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import TrainCallbacks, train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from invdpo_core.config import parse_config
    from invdpo_core.train import train
    train(parse_config(json.loads(open(sys.argv[1]).read())))
    """
)

RUNS = {
    # Every random draw comes from the pair's visit (train.pair_generators) and the inversion is deterministic, so
    # every rank's share of the global batch is the same computation as in one process: only the all-reduce differs.
    "diffusion_dpo_full": {"method": "diffusion_dpo", "empty_prompt_share": 0.5},
    "inversion_all_full": {"method": "inversion_dpo", "timesteps_per_step": 0},
    "inversion_all_lora_checkpointing": {
        "method": "inversion_dpo",
        "timesteps_per_step": 0,
        "inversion_target": "x0",
        "adapter": {"type": "lora"},
        "gradient_checkpointing": True,
    },
}


@pytest.mark.slow  # 30 s to 2 min each on a shared 2-core machine
@pytest.mark.parametrize("run", list(RUNS))
def test_two_cpu_processes_train_what_one_process_trains(tmp_path, model_dir, run):
    dataset = make_toy_dataset(tmp_path / "data", 8, model_dir=model_dir)
    settings = {
        "base_model": str(model_dir),
        "dataset": str(dataset),
        "resolution": 64,
        "inversion_steps": 3,
        "max_steps": 2,
        "learning_rate": 1e-6,
        "beta": 500.0,
        "empty_prompt_share": 0.0,
        "checkpoint_interval": 1,
        "checkpoints_to_keep": 2,
        **RUNS[run],
    }
    losses: list[float] = []
    train(
        parse_config({**settings, "batch_size": 4, "output_dir": str(tmp_path / "one")}),
        TrainCallbacks(on_step=lambda step, total, m: losses.append(m["loss"])),
    )
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({**settings, "batch_size": 2, "output_dir": str(tmp_path / "two")}))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # The ranks import this tree's invdpo_core (the script lives in tmp_path, so the current directory is not on
    # their path, and the venv's editable install may point at another checkout).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*launch, str(script), str(spec)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["pairs_seen"] == 8  # 2 processes x 2 pairs x 2 steps
    # beta (500) scales the rounding of the errors into the loss: 1e-5 apart here.
    assert summary["metrics"]["loss"] == pytest.approx(losses[-1], rel=1e-4)

    one, _ = load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints"))
    two, _ = load_checkpoint(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    assert one["trainer"] == two["trainer"]  # the same step and position in the data
    state_one, state_two = one["optimizer"]["state"], two["optimizer"]["state"]
    assert state_one.keys() == state_two.keys() and len(state_one) > 0
    for name in ("exp_avg", "exp_avg_sq"):
        a = torch.cat([state_one[i][name].flatten() for i in state_one])
        b = torch.cat([state_two[i][name].flatten() for i in state_one])
        assert a.abs().max() > 0  # the runs had gradients
        # Rounding, scaled by beta: 2e-5 apart (relative norm) for diffusion_dpo, less for the others. A gradient
        # that is not all-reduced, or pairs on the wrong rank, is O(1) apart.
        assert (a - b).norm() <= 1e-3 * a.norm(), f"{name}: {((a - b).norm() / a.norm()).item():.2e} apart"
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-4 * a.abs().max().item(), msg=name)
    # The weights: at most a step apart per element (see the docstring).
    for k, w in one["model"].items():
        torch.testing.assert_close(two["model"][k], w, rtol=0, atol=2.5 * settings["learning_rate"], msg=k)
