"""The trainer end to end on the tiny pipeline and a toy dataset: smoke runs, exact resume, cancel, SIGKILL during a
checkpoint, outputs that load offline, the CLI. Each run is a few steps on 8 pairs of 64 px images."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

from invdpo_core.checkpoint import latest_checkpoint, load_checkpoint
from invdpo_core.cli import main as cli_main
from invdpo_core.config import parse_config
from invdpo_core.data import iter_pairs
from invdpo_core.pipeline import LatentCache, encode_latents
from invdpo_core.testing import build_tiny_pipeline
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import TrainCallbacks, TrainError, train

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
            "max_steps": 3,
            "learning_rate": 1e-3,
            "beta": 500.0,
            "checkpoint_interval": 100,
            "output_dir": str(tmp_path / "run"),
        }
        return parse_config({**base, **overrides})

    return make


RUNS = {
    "diffusion_dpo": {"method": "diffusion_dpo"},
    "inversion_k1": {"method": "inversion_dpo", "timesteps_per_step": 1},
    "inversion_all": {"method": "inversion_dpo", "timesteps_per_step": 0},
    "inpo": {"method": "inpo"},
}


@pytest.mark.parametrize("run", list(RUNS))
def test_full_fine_tune_changes_every_weight_and_loads_as_a_pipeline(config, model_dir, run):
    cfg = config(**RUNS[run], validation_prompts=["a red circle"], validation_interval=3, validation_inference_steps=2)
    steps, validations, cache = [], [], []
    result = train(
        cfg,
        TrainCallbacks(
            on_step=lambda s, total, m: steps.append((s, total, m)),
            on_validation=lambda s, images: validations.append((s, images)),
            on_cache_progress=lambda done, total: cache.append((done, total)),
        ),
    )
    assert [s for s, _, _ in steps] == [1, 2, 3] and all(total == 3 for _, total, _ in steps)
    assert result.steps == 3 and not result.stopped_early and result.pairs_per_s > 0
    # At step 1 the policy is the reference: the loss is ln 2.
    assert steps[0][2]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert {"loss", "implicit_acc", "lr", "grad_norm"} <= set(result.metrics)
    assert all(np.isfinite(v) for v in result.metrics.values())
    if run.startswith("inversion"):  # the cache was built once, for the 6 pairs the run reads, before step 1
        assert cache[-1] == (6, 6)
    assert [(s, len(images), images[0].size) for s, images in validations] == [(3, 1, (64, 64))]

    base = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    trained = UNet2DConditionModel.from_pretrained(result.model_path / "unet")
    before = dict(base.named_parameters())
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"{len(unchanged)} weights did not move, e.g. {unchanged[:3]}"

    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == cfg.method and summary["metrics"] == result.metrics
    pipe = DiffusionPipeline.from_pretrained(result.model_path)  # HF_HUB_OFFLINE=1 (conftest)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("run", ["diffusion_dpo", "inversion_all", "inpo"])
def test_lora_changes_every_adapter_weight_and_loads_with_load_lora_weights(config, model_dir, run):
    adapter = {"type": "lora", "rank": 4, "alpha": 8.0}
    result = train(config(**RUNS[run], adapter=adapter, checkpoint_interval=1, checkpoints_to_keep=3))
    after, _ = load_checkpoint(result.checkpoint)
    step1, _ = load_checkpoint(result.checkpoint.parent / "checkpoint-1")
    lora_a = [n for n in after["model"] if "lora_A" in n]
    lora_b = [n for n in after["model"] if "lora_B" in n]
    assert lora_a and len(lora_a) == len(lora_b) == len(after["model"]) // 2
    # B starts at zero; A gets no gradient until B has moved (step 1), so it must have moved after step 1.
    assert all(after["model"][n].abs().sum() > 0 for n in lora_b)
    assert all(not torch.equal(after["model"][n], step1["model"][n]) for n in lora_a)

    assert json.loads((result.model_path / "base_model.json").read_text())["base_model"] == str(model_dir)
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")

    plain = sample().images
    pipe.load_lora_weights(result.model_path)
    (adapter_name,) = pipe.unet.peft_config
    assert pipe.unet.peft_config[adapter_name].lora_alpha == 8.0 and pipe.unet.peft_config[adapter_name].r == 4
    adapted = sample().images
    assert adapted.shape == (1, 64, 64, 3) and not np.array_equal(plain, adapted)


@pytest.mark.parametrize("method", ["inversion_dpo", "inpo"])
def test_sdxl_lora_with_gradient_checkpointing(config, tmp_path_factory, dataset, method):
    model = tmp_path_factory.mktemp("sdxl")
    build_tiny_pipeline("sdxl", seed=0).save_pretrained(model)
    cfg = config(
        base_model=str(model),
        method=method,
        adapter={"type": "lora"},
        gradient_checkpointing=True,
        max_steps=2,
    )
    result = train(cfg)
    assert result.steps == 2 and np.isfinite(result.metrics["loss"])
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(result.model_path)
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_bf16_full_fine_tune_saves_the_frozen_parts_in_full_precision(config):
    # Also a second precision in one process: the worker runs jobs one after another.
    result = train(config(method="diffusion_dpo", mixed_precision="bf16", max_steps=2))
    assert np.isfinite(result.metrics["loss"])
    pipe = DiffusionPipeline.from_pretrained(result.model_path)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}


RESUME_RUNS = {
    # Crosses an epoch boundary at the resume point (4 pairs a step, 8 pairs), accumulation, warmup + cosine.
    "diffusion_dpo_full": {
        "method": "diffusion_dpo",
        "gradient_accumulation_steps": 2,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "empty_prompt_share": 0.5,
    },
    # The memory cache is rebuilt after the resume; Adafactor state; the LoRA reference (adapters off).
    "inversion_k2_lora_memory": {
        "method": "inversion_dpo",
        "timesteps_per_step": 2,
        "adapter": {"type": "lora"},
        "optimizer": "adafactor",
        "lr_scheduler": "linear",
    },
    # Disk cache, all N points, inverse_alpha weights, x0 target, guided inversion.
    "inversion_all_full_disk": {
        "method": "inversion_dpo",
        "timesteps_per_step": 0,
        "inversion_cache": "disk",
        "inversion_target": "x0",
        "timestep_weighting": "inverse_alpha",
        "inversion_guidance": 2.0,
        "lr_scheduler": "constant",
    },
    # InPO: the inversion's noise and timesteps come from the checkpointed generator; LoRA policy as inverter.
    "inpo_lora": {
        "method": "inpo",
        "adapter": {"type": "lora"},
        "inpo_eta": 0.2,
        "lr_scheduler": "constant",
    },
}


@pytest.mark.parametrize("run", list(RESUME_RUNS))
def test_n_steps_resume_n_steps_equals_2n_steps(config, tmp_path, run):
    settings = dict(RESUME_RUNS[run], max_steps=4)
    straight = train(config(**settings, output_dir=str(tmp_path / "straight")))
    # Interrupted after 2 steps (the LR schedules depend on max_steps, so the first half must plan 4 as well)...
    if settings["lr_scheduler"] == "constant":  # ...or, where nothing depends on it, a 2-step run extended to 4
        first = train(config(**{**settings, "max_steps": 2}, output_dir=str(tmp_path / "resumed")))
    else:
        steps: list[int] = []
        first = train(
            config(**settings, output_dir=str(tmp_path / "resumed")),
            TrainCallbacks(on_step=lambda s, total, m: steps.append(s), should_stop=lambda: len(steps) == 2),
        )
    assert first.steps == 2 and first.checkpoint.name == "checkpoint-2"
    resumed = train(config(**settings, output_dir=str(tmp_path / "resumed")))
    assert resumed.resumed_from == 2 and resumed.steps == 4

    a, _ = load_checkpoint(straight.checkpoint)
    b, _ = load_checkpoint(resumed.checkpoint)
    assert a["trainer"] == b["trainer"]  # same step and position in the data
    worst = max((a["model"][n] - b["model"][n]).abs().max().item() for n in a["model"])
    assert worst <= 1e-6
    assert resumed.metrics == pytest.approx(straight.metrics, rel=1e-5, abs=1e-6)


def test_a_run_resumed_mid_epoch_releases_the_reference_only_once_every_pair_is_cached(config):
    # Resumed at pair 2 of epoch 0, the rest of epoch 0 plus pairs 0-1 of epoch 1 are not the whole dataset (each
    # epoch has its own order): the cache walk must go on to the end of epoch 1 before the reference is dropped.
    cfg = config(method="inversion_dpo", max_steps=10)
    steps: list[int] = []
    train(cfg, TrainCallbacks(on_step=lambda s, total, m: steps.append(s), should_stop=lambda: len(steps) == 1))
    cache: list[tuple[int, int]] = []
    result = train(cfg, TrainCallbacks(on_cache_progress=lambda done, total: cache.append((done, total))))
    assert result.resumed_from == 1 and result.steps == 10
    assert cache[-1] == (14, 14)  # 6 pairs left in epoch 0, then all 8 of epoch 1


def test_should_stop_checkpoints_and_stops_within_one_step(config):
    calls = []

    def should_stop():
        calls.append(len(steps))
        return len(steps) >= 2

    steps: list[int] = []
    result = train(
        config(method="diffusion_dpo", max_steps=50),
        TrainCallbacks(on_step=lambda s, total, m: steps.append(s), should_stop=should_stop),
    )
    assert steps == [1, 2] and calls == [0, 1, 2]  # polled before every step
    assert result.stopped_early and result.steps == 2 and result.model_path is None
    assert result.checkpoint == latest_checkpoint(result.output_dir / "checkpoints")
    assert result.checkpoint.name == "checkpoint-2"
    assert json.loads((result.output_dir / "summary.json").read_text())["stopped_early"] is True


def test_resume_with_changed_settings_names_them(config):
    train(config(method="diffusion_dpo", max_steps=1))
    with pytest.raises(TrainError, match=r"different settings \(beta, learning_rate\)"):
        train(config(method="diffusion_dpo", max_steps=2, beta=1.0, learning_rate=1e-4))
    # resume: false starts over instead.
    result = train(config(method="diffusion_dpo", max_steps=1, beta=1.0, resume=False))
    assert result.resumed_from == 0 and result.steps == 1


_TRAINER = textwrap.dedent(
    """
    import json, sys, torch
    from invdpo_core.config import parse_config
    from invdpo_core.train import train
    torch.set_num_threads(1)
    train(parse_config(json.loads(sys.argv[1])))
    """
)


def test_sigkill_during_a_checkpoint_leaves_the_previous_one_to_resume_from(config):
    cfg = config(method="inversion_dpo", max_steps=3, checkpoint_interval=1)
    env = {**os.environ, "INVDPO_TEST_CHECKPOINT_PAUSE": "2:files"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, cfg.model_dump_json()], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # blocks until the trainer is paused inside the save of checkpoint 2
        assert line.startswith("checkpoint paused at step 2 files"), line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    checkpoints = cfg.output_dir + "/checkpoints"
    assert os.path.isdir(checkpoints + "/.tmp-step-2")
    assert latest_checkpoint(checkpoints).name == "checkpoint-1"
    result = train(cfg.model_copy(update={"max_steps": 2}))
    assert result.resumed_from == 1 and result.steps == 2


def test_cli_bad_set_value_is_one_line_naming_the_field(capsys, dataset):
    code = cli_main(["train", "--set", f"dataset={dataset}", "--set", "base_model=x/y", "--set", "beta=-3"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and err.startswith("error: beta:") and "-3" in err


def test_cli_missing_model_is_one_line(capsys, dataset, tmp_path):
    code = cli_main(
        [
            "train",
            "--set",
            f"dataset={dataset}",
            "--set",
            f"base_model={tmp_path / 'nope'}",
            "--set",
            f"output_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and err.startswith("error: base model") and "Traceback" not in err


def test_cli_json_lines(capsys, config, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(config(method="diffusion_dpo").model_dump_json())  # JSON is YAML
    assert cli_main(["train", "--config", str(path), "--set", "max_steps=2", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "checkpoint", "done"]
    assert events[1]["step"] == 2 and "loss" in events[1] and "implicit_acc" in events[1]
    assert events[-1]["model_path"].endswith("model")


def test_the_same_data_in_another_place_trains_the_same_model(config, dataset, tmp_path):
    """Per-pair coins (paired noise source, dropped captions) and cache keys use a location-free pair key, so a
    copy of the dataset elsewhere (or on S3) gives the same run, not one that depends on the directory name."""
    copy = tmp_path / "elsewhere" / "copied-data"
    shutil.copytree(dataset.parent, copy)
    settings = {"method": "inversion_dpo", "empty_prompt_share": 0.5, "max_steps": 2, "checkpoint_interval": 2}
    a = train(config(**settings, output_dir=str(tmp_path / "a")))
    b = train(config(**settings, dataset=str(copy / dataset.name), output_dir=str(tmp_path / "b")))
    wa, _ = load_checkpoint(a.checkpoint)
    wb, _ = load_checkpoint(b.checkpoint)
    assert max((wa["model"][n] - wb["model"][n]).abs().max().item() for n in wa["model"]) == 0.0


@pytest.mark.parametrize("method", ["diffusion_dpo", "inpo"])
def test_cache_latents_encodes_each_image_once_and_trains_the_same_weights(
    config, dataset, tmp_path, method, monkeypatch
):
    # 8 steps of 2 pairs: two epochs of the 8 pairs. The VAE spy counts the images it encodes.
    encoded: list[int] = []
    encode = AutoencoderKL.encode

    def spy(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    images = {hashlib.sha256(im).digest() for p in iter_pairs(str(dataset)) for im in (p.chosen, p.rejected)}
    weights, counts = {}, {}
    for cached in (False, True):
        encoded.clear()
        cfg = config(method=method, cache_latents=cached, max_steps=8, output_dir=str(tmp_path / str(cached)))
        train(cfg)
        counts[cached] = sum(encoded)
        weights[cached] = UNet2DConditionModel.from_pretrained(tmp_path / str(cached) / "model", subfolder="unet")
    # Without the cache, every visit's 2 images; with it, each distinct image once.
    assert len(images) == 16 and counts == {False: 32, True: 16}
    plain, cached_unet = weights[False].state_dict(), weights[True].state_dict()
    assert all(torch.equal(plain[n], cached_unet[n]) for n in plain)  # the same latents: the same weights


def test_latent_cache_keys_and_budget(dataset):
    pipe = build_tiny_pipeline("sd15", seed=0)
    pairs = list(iter_pairs(str(dataset)))[:2]
    cpu = torch.device("cpu")
    plain = encode_latents(pipe.vae, pairs, 64, cpu)
    cache = LatentCache("vae-a", budget=1 << 30)
    for _ in range(2):  # encoded, then read back: the same tensors
        z_w, z_l = encode_latents(pipe.vae, pairs, 64, cpu, cache)
        assert torch.equal(z_w, plain[0]) and torch.equal(z_l, plain[1])
    assert len(cache.entries) == 4 and not cache.full
    image = pairs[0].chosen
    # Another VAE, dtype or resolution is another entry.
    keys = {cache.key(image, torch.float32, 64), LatentCache("vae-b", 0).key(image, torch.float32, 64)}
    keys |= {cache.key(image, torch.float16, 64), cache.key(image, torch.float32, 128)}
    assert len(keys) == 4
    # Past the budget, latents are still right but not kept.
    small = LatentCache("vae-a", budget=0)
    z_w, z_l = encode_latents(pipe.vae, pairs, 64, cpu, small)
    assert torch.equal(z_w, plain[0]) and torch.equal(z_l, plain[1])
    assert small.entries == {} and small.full
