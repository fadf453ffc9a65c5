"""Two processes on one CPU host (gloo) train the same weights as one process on the same global batch."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import UNet2DConditionModel

from invdpo_core.config import parse_config
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

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
    # Deterministic given the pairs (the inversion, the per-pair coin and caption): every rank's share of the global
    # batch is the same computation as in one process, so only the gradient all-reduce differs.
    "inversion_all_full": {"method": "inversion_dpo", "timesteps_per_step": 0},
    "inversion_all_lora_checkpointing": {
        "method": "inversion_dpo",
        "timesteps_per_step": 0,
        "inversion_target": "x0",
        "adapter": {"type": "lora"},
        "gradient_checkpointing": True,
    },
}


@pytest.mark.slow  # about 3 minutes each on a shared 2-core machine
@pytest.mark.parametrize("run", list(RUNS))
def test_two_cpu_processes_train_what_one_process_trains(tmp_path, model_dir, run):
    dataset = make_toy_dataset(tmp_path / "data", 8, model_dir=model_dir)
    settings = {
        "base_model": str(model_dir),
        "dataset": str(dataset),
        "resolution": 64,
        "inversion_steps": 3,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "beta": 500.0,
        "empty_prompt_share": 0.0,
        "checkpoint_interval": 100,
        **RUNS[run],
    }
    one = train(parse_config({**settings, "batch_size": 4, "output_dir": str(tmp_path / "one")}))
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({**settings, "batch_size": 2, "output_dir": str(tmp_path / "two")}))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*launch, str(script), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["pairs_seen"] == 8  # 2 processes x 2 pairs x 2 steps
    if settings.get("adapter"):
        from safetensors.torch import load_file

        a = load_file(one.model_path / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "two" / "model" / "pytorch_lora_weights.safetensors")
    else:
        a = UNet2DConditionModel.from_pretrained(one.model_path, subfolder="unet").state_dict()
        b = UNet2DConditionModel.from_pretrained(tmp_path / "two" / "model", subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").state_dict()
    assert a.keys() == b.keys()
    moved = max((a[k] - base[k]).abs().max().item() for k in a if k in base) if not settings.get("adapter") else 1.0
    assert moved > 1e-4  # the runs trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
