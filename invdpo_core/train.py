"""The training loop: Diffusion-DPO, Inversion-DPO and InPO fine-tuning of a Stable Diffusion 1.x/2.x or XL pipeline.

`train(config, callbacks)` is what the CLI and the worker call. One run:
1. load the base pipeline (pipeline.load_pipeline: local dir, hub id or s3:// prefix); VAE and text encoders
   frozen; the policy UNet trained in full or through a LoRA adapter; the reference is a frozen copy (full) or the
   same UNet with its adapters disabled (LoRA); the resolution is the model's own unless config.resolution says;
2. resume from the newest complete checkpoint in output_dir/checkpoints (config.resume);
3. inversion_dpo with a memory or disk cache (inversion_cache.py): invert the pairs the run will read, in training
   order, once, and release the reference as soon as the cache covers the whole dataset (the step then needs no
   reference);
4. optimise through accelerate: micro-batches of pairs, gradient accumulation, clipping, LR schedule, mixed
   precision, the EMA of the weights (ema_decay). The forward goes through the prepared (DDP-wrapped) model, so
   gradients are synchronised;
5. write the model (a diffusers pipeline dir, or LoRA weights + base_model.json; the EMA weights with ema_decay)
   and summary.json.

Exact resume: a checkpoint holds the trainable weights, the optimizer, the LR scheduler, the fp16 loss scaler, the
EMA, the global RNGs (python, numpy, torch, CUDA), the step and the position in the data (epoch, index). Noise,
timesteps, points and empty captions are drawn from per-visit generators (`pair_generators`), so they follow from
the position alone, and N processes draw what one process draws on the same global batch. 2N steps straight equal
N + resume + N (tests/core/test_train.py); with a memory cache and batch_size > 1 across an epoch boundary the
rebuilt cache may batch pairs differently, which can change results at float rounding level.

Ties kept by tie_policy=keep train as ordinary pairs (jpg_0 as the chosen image). Models downloaded from s3:// are
cached under `model_cache_dir` (default ~/.cache/invdpo).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import gather_object, set_seed
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from transformers.optimization import Adafactor

from invdpo_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from invdpo_core.config import (
    CACHE_KEY_FIELDS,
    RESUMABLE_FIELDS,
    ConfigError,
    TrainingConfig,
    schedule_problem,
    scheduler_as_written,
)
from invdpo_core.data import DatasetError, PreferencePair, iter_pairs
from invdpo_core.inversion import InvertedPairs, build_inverted_pairs, encode_prompts, inversion_grid, pair_coin
from invdpo_core.inversion_cache import InversionCache, entry_bytes, kept_points, model_digest
from invdpo_core.methods import (
    all_points_backward,
    diffusion_dpo_points,
    draw_uniform,
    inpo_points,
    inversion_dpo_points,
    points_loss,
    timestep_weights,
    with_reference_errors,
)
from invdpo_core.pipeline import (
    LatentCache,
    PipelineLoadError,
    encode_latents,
    load_pipeline,
    one_line,
    pair_time_ids,
)

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # inversion_cache_dtype


class TrainError(RuntimeError):
    """The run cannot start or continue (model not loadable, checkpoint of another config...); one-line message."""


@dataclass
class TrainCallbacks:
    """Optional hooks, called on the main process (should_stop on every process; True on any stops them all)."""

    on_step: Callable[[int, int, dict[str, float]], None] | None = None  # (step, max_steps, metrics)
    # Polled before every step and between micro-batches: True checkpoints and returns (a step cut short is undone).
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path, int], None] | None = None  # (checkpoint dir, step)
    on_validation: Callable[[int, list[Image.Image]], None] | None = None  # (step, one image per prompt)
    on_cache_progress: Callable[[int, int], None] | None = None  # (pairs walked, pairs planned), inversion cache
    # (pairs skipped so far, why this one) for each pair skipped for an unreadable image, once per pair
    on_skipped_pair: Callable[[int, str], None] | None = None
    # (phase) as each starts: loading_model, building_cache, training, sampling (validation images), saving_model
    on_phase: Callable[[str], None] | None = None


@dataclass
class TrainResult:
    steps: int  # optimizer steps done, counting those before a resume
    stopped_early: bool  # should_stop ended the run before max_steps
    metrics: dict[str, float]  # the last step's
    wall_time_s: float  # this call, model loading and cache build included
    pairs_per_s: float  # pairs optimised per second of training steps, all processes
    output_dir: Path
    model_path: Path | None  # diffusers pipeline dir (full) or LoRA weights dir; None when stopped early
    resumed_from: int  # the checkpoint step this call started from; 0 from the base model
    checkpoint: Path | None  # the last checkpoint written by this call


@dataclass
class Position:
    """Where a run is: optimizer steps done, the next pair to read (epoch, index), pairs optimised so far."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    pairs_seen: int = 0


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _fixed_settings(config: TrainingConfig) -> dict[str, Any]:
    """The settings a checkpoint is bound to: all but the resumable ones (config.py's field roles)."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUMABLE_FIELDS}


def _pair_uniform(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by the seed and the pair: inversion_dpo's empty-caption draw, fixed per pair so the
    cached inversion, the reference errors and the policy all see the same caption."""
    digest = hashlib.sha256(f"{seed}:empty:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pairs_from(
    config: TrainingConfig, epoch: int, index: int, on_skip: Callable[[str, str], None] | None = None
) -> Generator[tuple[int, int, PreferencePair]]:
    """Pairs in training order from position (epoch, index), epoch after epoch: yields (epoch, index, pair). Pairs
    with an unreadable image are skipped (told to `on_skip(source, reason)`) up to config.max_bad_share."""
    while True:
        n = index
        pairs = iter_pairs(
            config.dataset, tie_policy=config.tie_policy, seed=config.seed + epoch, start=index,
            max_bad_share=config.max_bad_share, on_skip=on_skip,
        )  # fmt: skip
        for pair in pairs:
            yield epoch, n, pair
            n += 1
        if n == 0:
            raise DatasetError("empty_dataset", f"{config.dataset}: no usable pairs")
        epoch, index = epoch + 1, 0


def pair_generators(seed: int, visits: list[tuple[int, int, PreferencePair]]) -> list[torch.Generator]:
    """One generator per visit (epoch, index, pair), seeded by the seed and that visit alone: every random draw of a
    pair (empty caption, timestep, noise, points) is then the same whichever process and micro-batch it lands in,
    so N processes train what one process trains on the same global batch, and a resumed run draws what the
    uninterrupted one drew. On the CPU, so a seed gives the same numbers on any device."""
    generators = []
    for epoch, index, pair in visits:
        digest = hashlib.sha256(f"{seed}:{epoch}:{index}:{pair.key}".encode()).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "big")))
    return generators


def captions(batch: list[PreferencePair], config: TrainingConfig, draws: list[torch.Generator] | None) -> list[str]:
    """The batch's prompts, some replaced by '' (config.empty_prompt_share). inversion_dpo's choice is fixed per
    pair (no draws needed); the other methods draw afresh every visit, as Diffusion-DPO's training script does."""
    if config.method == "inversion_dpo":
        empty = [_pair_uniform(config.seed, p.key) < config.empty_prompt_share for p in batch]
    else:
        assert draws is not None, "diffusion_dpo and inpo draw their empty captions per visit"
        empty = (draw_uniform((len(batch),), draws) < config.empty_prompt_share).tolist()
    return ["" if e else p.prompt for p, e in zip(batch, empty, strict=True)]


# --- models ------------------------------------------------------------------------------------------------------
def stop_requested(callbacks: TrainCallbacks, accelerator: Accelerator) -> bool:
    """should_stop's answer, the same on every process (True on any stops them all at the same point)."""
    stop = bool(callbacks.should_stop and callbacks.should_stop())
    if accelerator.num_processes > 1:
        stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum").item() > 0
    return stop


def make_accelerator(config: TrainingConfig) -> Accelerator:
    # cpu=True on a host without CUDA: otherwise several processes there each run as their own main process.
    cpu = not torch.cuda.is_available()
    if not PartialState(cpu=cpu).use_distributed:
        # accelerate keeps its precision in a process-wide singleton that refuses a second value, and a worker
        # process runs jobs of different precisions one after another. (A distributed launch runs one job.)
        AcceleratorState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision, cpu=cpu
    )


class Reference:
    """The frozen reference: a frozen copy of the UNet (full fine-tune), or the policy with its adapters switched off
    (LoRA). Released once the inversion cache holds every pair."""

    def __init__(self, policy: UNet2DConditionModel, frozen_copy: UNet2DConditionModel | None):
        self.policy, self.frozen_copy, self.released = policy, frozen_copy, False

    @contextmanager
    def use(self) -> Iterator[UNet2DConditionModel]:
        assert not self.released, "the reference was released; every pair should be in the inversion cache"
        if self.frozen_copy is not None:
            yield self.frozen_copy
            return
        self.policy.disable_adapters()
        try:
            yield self.policy
        finally:
            self.policy.enable_adapters()

    def release(self) -> None:
        self.released, self.frozen_copy = True, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def prepare_models(
    pipe: Any, config: TrainingConfig, device: torch.device, weight_dtype: torch.dtype
) -> tuple[UNet2DConditionModel, Reference]:
    """Frozen VAE and text encoders on the device; the policy (pipe.unet) trainable in full or through a new LoRA
    adapter, in training mode; and its reference."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if isinstance(pipe, StableDiffusionXLPipeline) else [])
    for encoder in encoders:
        encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    pipe.vae.requires_grad_(False).eval().to(device)
    policy = pipe.unet
    policy.to(device)
    # Frozen weights in the training precision. (Cast only when it changes something: diffusers warns on any cast.)
    if weight_dtype != torch.float32 and not pipe.vae.config.force_upcast:  # SD VAEs overflow in fp16: they say so
        pipe.vae.to(dtype=weight_dtype)
    frozen_copy = None
    if config.adapter.type == "full":
        frozen_copy = copy.deepcopy(policy).requires_grad_(False).eval()
        if weight_dtype != torch.float32:
            frozen_copy.to(dtype=weight_dtype)
        policy.requires_grad_(True)
    else:
        policy.requires_grad_(False)
        if policy.dtype != weight_dtype:  # loaded in it already when low precision (train's load_pipeline call)
            policy.to(dtype=weight_dtype)
        lora = LoraConfig(
            r=config.adapter.rank, lora_alpha=config.adapter.alpha, target_modules=list(config.adapter.target_modules)
        )
        try:
            policy.add_adapter(lora)
        except ValueError as exc:  # no layer matches target_modules
            raise TrainError(f"adapter.target_modules: {one_line(exc)}") from None
        cast_training_params(policy, torch.float32)  # the adapter trains in fp32 whatever the base's dtype
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    return policy, Reference(policy, frozen_copy)


def make_optimizer(policy: UNet2DConditionModel, config: TrainingConfig) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the trainable parameters, and its LR scheduler."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adamw" and config.use_8bit_adam:
        import bitsandbytes  # train() checked it imports

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:  # the Diffusion-DPO SDXL recipe: a fixed learning rate, no parameter-scale adaptation
        optimizer = Adafactor(
            params,
            lr=config.learning_rate,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
    )
    return optimizer, lr_scheduler


# --- checkpoints -------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    name, keys, pos, has_gauss, cached = np_state
    return {
        "python": random.getstate(),
        # As a tensor: checkpoints load with weights_only=True, which refuses numpy arrays.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume(
    checkpoints: Path,
    config: TrainingConfig,
    policy: UNet2DConditionModel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    accelerator: Accelerator,
    ema: EMAModel | None = None,
) -> Position:
    """Load the newest complete checkpoint into the policy, optimizer, LR scheduler, EMA and RNGs, and return where
    it stopped; Position() when there is none. A checkpoint written with other fixed settings is a TrainError."""
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return Position()
    objects, manifest = load_checkpoint(latest)
    fixed = _fixed_settings(config)
    if manifest["config_hash"] != _hash(fixed):
        old = manifest["meta"].get("config", {})
        changed = sorted(k for k in fixed if old.get(k) != fixed[k])
        raise TrainError(
            f"{latest}: written with different settings ({', '.join(changed) or 'unknown'}); use the same "
            "config, another output_dir, or resume: false"
        )
    if config.adapter.type == "full":
        policy.load_state_dict(objects["model"])
    else:
        set_peft_model_state_dict(policy, objects["model"])
    optimizer.load_state_dict(objects["optimizer"])
    lr_scheduler.load_state_dict(objects["lr_scheduler"])
    if accelerator.scaler is not None and objects.get("scaler"):  # fp16: the loss scale and its growth tracker
        accelerator.scaler.load_state_dict(objects["scaler"])
    if ema is not None:  # ema_decay is a fixed setting: a checkpoint of this config has the EMA
        ema.load_state_dict(objects["ema"])
        ema.to(accelerator.device)
    if len(objects["rng"]) == accelerator.num_processes:  # another process count cannot continue the same stream
        _set_rng_state(objects["rng"][accelerator.process_index])
    return Position(**objects["trainer"])


def save(
    checkpoints: Path,
    position: Position,
    config: TrainingConfig,
    policy: UNet2DConditionModel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    accelerator: Accelerator,
    on_checkpoint: Callable[[Path, int], None] | None,
    ema: EMAModel | None = None,
) -> Path | None:
    """Write a checkpoint of the run at `position` (main process); returns its directory there, None elsewhere."""
    rng = gather_object([_rng_state()])  # every process's, in rank order
    path = None
    if accelerator.is_main_process:
        model = policy.state_dict() if config.adapter.type == "full" else get_peft_model_state_dict(policy)
        objects = {
            "model": model,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng,
            "trainer": asdict(position),
        }
        path = save_checkpoint(
            checkpoints, position.step, objects, config_hash=_hash(_fixed_settings(config)),
            meta={"config": config.model_dump(mode="json")}, keep=config.checkpoints_to_keep,
        )  # fmt: skip
        if on_checkpoint:
            on_checkpoint(path, position.step)
    accelerator.wait_for_everyone()
    return path


# --- the inversion cache -----------------------------------------------------------------------------------------
def invert_pairs(
    pipe: Any,
    reference: Reference,
    config: TrainingConfig,
    accelerator: Accelerator,
    text_cache: dict[str, Any] | None,
    batch: list[PreferencePair],
    caps: list[str],
) -> tuple[InvertedPairs, torch.Tensor, torch.Tensor]:
    """DDIM-invert the pairs with the reference under the given captions: (B, N, ...) on the device, and the clean
    latents z_w, z_l (B, C, h, w)."""
    device = accelerator.device
    assert config.resolution is not None
    z_w, z_l = encode_latents(pipe.vae, batch, config.resolution, device)
    time_ids = pair_time_ids(batch, config.resolution)
    cond = encode_prompts(pipe, caps, device=device, resolution=config.resolution, time_ids=time_ids, cache=text_cache)
    uncond = None
    if config.inversion_guidance != 1.0:
        uncond = encode_prompts(
            pipe, [""] * len(batch), device=device, resolution=config.resolution, time_ids=time_ids, cache=text_cache
        )
    with reference.use() as ref, accelerator.autocast():
        inverted = build_inverted_pairs(
            ref, pipe.scheduler.config, z_w, z_l, cond,
            target=config.inversion_target, num_steps=config.inversion_steps,
            guidance=config.inversion_guidance, uncond=uncond,
            use_winner_noise=pair_coin(config.seed, [p.key for p in batch]),
            keep=torch.stack([
                kept_points(config.seed, p.key, config.inversion_steps, config.inversion_points_per_pair)
                for p in batch
            ]),
            storage_dtype=STORAGE_DTYPES[config.inversion_cache_dtype],
        )  # fmt: skip
    return inverted, z_w, z_l


def local_processes(accelerator: Accelerator) -> int:
    """Training processes on this machine: LOCAL_WORLD_SIZE (torchrun and accelerate launch set it), else all of
    them (one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def memory_budget(local: int) -> int:
    """Bytes one process's memory cache may hold: half the machine's RAM, shared by its `local` processes (each holds
    the pairs it inverted), so together they stay within half the RAM instead of being OOM-killed."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 // max(1, local)


def fill_inversion_cache(
    cache: InversionCache,
    config: TrainingConfig,
    position: Position,
    accelerator: Accelerator,
    on_progress: Callable[[int, int], None] | None,
    on_skip: Callable[[str, str], None] | None = None,
) -> bool:
    """Walk the pairs this run will read, in its micro-batches, and invert those not cached yet. Stop after the
    run's pairs or one full pass over the data, whichever comes first; True after a full pass."""
    world, rank = accelerator.num_processes, accelerator.process_index
    pairs_per_step = config.batch_size * world * config.gradient_accumulation_steps
    planned, walked, covers, held = (config.max_steps - position.step) * pairs_per_step, 0, False, 0
    local = local_processes(accelerator)
    budget = memory_budget(local)
    walk = _pairs_from(config, position.epoch, position.index, on_skip)
    while walked < planned and not covers:
        group: list[PreferencePair] = []  # one micro-batch of every process
        for e, _i, pair in walk:
            # A full pass: a whole epoch walked. Resumed mid-epoch (index > 0), the next epoch's first `index`
            # pairs are other pairs (each epoch has its own order), so only the end of the next epoch is one.
            if e > position.epoch + 1 or (e == position.epoch + 1 and position.index == 0):
                covers = True
                break
            group.append(pair)
            if len(group) == config.batch_size * world:
                break
        mine = group[rank * config.batch_size : (rank + 1) * config.batch_size]
        todo = [(p, c) for p, c in zip(mine, captions(mine, config, None), strict=True) if not cache.has(p, c)]
        if todo:
            held += sum(entry_bytes(entry) for entry in cache.invert([p for p, _ in todo], [c for _, c in todo]))
        walked += len(group)
        if config.inversion_cache == "memory" and held > budget:
            raise TrainError(
                f"inversion_cache: memory: this process's cache passed {held / 2**30:.1f} GiB (half the RAM shared "
                f"by {local} processes on this machine) after {walked} pairs; use inversion_cache: disk or none"
            )
        if on_progress:
            on_progress(walked, walked if covers else planned)
    walk.close()
    accelerator.wait_for_everyone()
    return covers


# --- validation and output ---------------------------------------------------------------------------------------
def validation_images(sampler: Any, config: TrainingConfig, accelerator: Accelerator) -> list[Image.Image]:
    """One image per validation prompt, prompt i from seed + i, with the policy in eval mode meanwhile."""
    sampler.unet.eval()
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(len(config.validation_prompts))]
    with torch.no_grad(), accelerator.autocast():
        images = sampler(
            list(config.validation_prompts),
            generator=generators,
            num_inference_steps=config.validation_inference_steps,
            height=config.resolution,
            width=config.resolution,
        ).images
    sampler.unet.train()
    return images


def save_model(pipe: Any, config: TrainingConfig, out: Path, weight_dtype: torch.dtype) -> Path:
    """Write out/model: a diffusers pipeline (full) or LoRA weights + base_model.json, renamed into place."""
    policy, model_out, tmp = pipe.unet, out / "model", out / ".model-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if config.adapter.type == "lora":
        lora_weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy))
        type(pipe).save_lora_weights(
            tmp, unet_lora_layers=lora_weights, unet_lora_adapter_metadata=policy.peft_config["default"].to_dict()
        )
        (tmp / "base_model.json").write_text(
            json.dumps({"base_model": config.base_model, "adapter": config.adapter.model_dump()}, indent=2)
        )
    elif weight_dtype == torch.float32:
        pipe.save_pretrained(tmp)  # pipe.unet is the trained policy
    else:  # the frozen parts were cast down for training: save them as loaded
        DiffusionPipeline.from_pretrained(pipe.name_or_path, unet=policy).save_pretrained(tmp)
    shutil.rmtree(model_out, ignore_errors=True)
    tmp.rename(model_out)
    return model_out


def step_metrics(
    micro: list[dict[str, torch.Tensor]], accelerator: Accelerator, *, lr: float, grad_norm: Any
) -> dict[str, float]:
    """One optimizer step's metrics: each micro-batch's averaged, then averaged over the processes."""
    names = list(micro[0])
    values = torch.stack([torch.stack([m[n].float() for n in names]) for m in micro]).mean(0).to(accelerator.device)
    values = accelerator.reduce(values, "mean") if accelerator.num_processes > 1 else values
    metrics = {n: v.item() for n, v in zip(names, values, strict=True)}
    metrics["lr"] = lr
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def write_summary(
    result: TrainResult, config: TrainingConfig, position: Position, *, train_s: float, cache_build_s: float
) -> None:
    """output_dir/summary.json: what ran, for how long, and the last metrics (written atomically)."""
    summary = {
        "method": config.method,
        "inversion_target": config.inversion_target if config.method == "inversion_dpo" else None,
        "adapter": config.adapter.type,
        "resolution": config.resolution,
        "steps": result.steps,
        "max_steps": config.max_steps,
        "stopped_early": result.stopped_early,
        "resumed_from": result.resumed_from,
        "metrics": result.metrics,
        "wall_time_s": round(result.wall_time_s, 3),
        "train_time_s": round(train_s, 3),
        "cache_build_s": round(cache_build_s, 3),
        "pairs_per_s": round(result.pairs_per_s, 3),
        "pairs_seen": position.pairs_seen,
        "model_path": str(result.model_path) if result.model_path else None,
    }
    out = result.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json.part").write_text(json.dumps(summary, indent=2))
    os.replace(out / "summary.json.part", out / "summary.json")


# --- the loop ----------------------------------------------------------------------------------------------------
def train(
    config: TrainingConfig, callbacks: TrainCallbacks | None = None, *, model_cache_dir: str | Path | None = None
) -> TrainResult:
    """Fine-tune `config.base_model` on `config.dataset` with `config.method`; see the module docstring.
    model_cache_dir: where base models from s3:// are downloaded (default ~/.cache/invdpo)."""
    cb = callbacks or TrainCallbacks()
    started = time.perf_counter()
    if config.use_8bit_adam:  # before anything is loaded: a worker image without it fails the job at once
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # not installed, or its native library does not load on this machine
            reason = f"bitsandbytes cannot be imported on this machine ({type(exc).__name__}); set it to false"
            raise ConfigError([{"field": "use_8bit_adam", "message": reason, "value": True}]) from None
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    accelerator = make_accelerator(config)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    set_seed(config.seed)  # python, numpy, torch: the LoRA initialisation draws from them
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    pairs_per_step = config.batch_size * world * config.gradient_accumulation_steps

    def phase(name: str) -> None:
        if main and cb.on_phase:
            cb.on_phase(name)

    skipped: set[str] = set()  # the records skipped for an unreadable image (each epoch reads them again)

    def skip(source: str, reason: str) -> None:
        if source not in skipped:
            skipped.add(source)
            if main and cb.on_skipped_pair:
                cb.on_skipped_pair(len(skipped), reason)

    # --- 1. Models: frozen VAE and text encoders, the policy UNet, the reference ---------------------------------
    phase("loading_model")
    try:
        # LoRA keeps the base UNet frozen in the training precision: load it so, not in float32 first.
        lora_low_precision = config.adapter.type == "lora" and weight_dtype != torch.float32
        unet_dtype = weight_dtype if lora_low_precision else None
        pipe = load_pipeline(config.base_model, model_cache_dir=model_cache_dir, unet_dtype=unet_dtype)
    except PipelineLoadError as exc:
        raise TrainError(str(exc)) from None
    written = scheduler_as_written(pipe.scheduler.config, type(pipe.scheduler).__name__)
    problem = schedule_problem(written, config.method, config.inversion_grid_steps)
    if problem is not None:
        raise TrainError(f"base model {config.base_model}: {problem}")
    # The model's own resolution when none is set: from here on the run, its checkpoints and its cache use it.
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    config = config.model_copy(update={"resolution": resolution})
    model_id = ""  # a disk inversion cache outlives the run: its entries name the weights that made them
    if config.method == "inversion_dpo" and config.inversion_cache == "disk":
        # UNet, VAE and text encoders as loaded (before any adapter or cast), and the scheduler.
        sdxl = isinstance(pipe, StableDiffusionXLPipeline)
        encoders = [pipe.text_encoder, *([pipe.text_encoder_2] if sdxl else [])]
        model_id = model_digest([pipe.unet, pipe.vae, *encoders], dict(pipe.scheduler.config))
    latent_cache = None  # image -> VAE latent (config.cache_latents), for the methods that encode images every step
    if config.cache_latents and config.method in ("diffusion_dpo", "inpo"):
        latent_cache = LatentCache(model_digest([pipe.vae], {}), memory_budget(local_processes(accelerator)))
    policy, reference = prepare_models(pipe, config, device, weight_dtype)
    optimizer, lr_scheduler = make_optimizer(policy, config)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # diffusers' EMAModel, as the peers' scripts use it: stepped after every optimizer step, saved as the model.
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay is not None else None
    # The scheduler is stepped here once per optimizer step, so it is not handed to accelerate (which would step
    # it once per process). `unet` is the policy as prepared (possibly DDP-wrapped): the forward goes through it.
    unet, optimizer = accelerator.prepare(policy, optimizer)

    # --- 2. Resume -----------------------------------------------------------------------------------------------
    if config.resume:
        position = resume(checkpoints, config, policy, optimizer, lr_scheduler, accelerator, ema)
    else:
        position = Position()
        if main and checkpoints.exists():
            shutil.rmtree(checkpoints)  # documented: resume=false starts over
    resumed_from = position.step

    # --- 3. The inversion cache ----------------------------------------------------------------------------------
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    point_weights, inv_timesteps, inv_abar = torch.ones(0), torch.zeros(0, dtype=torch.long), torch.ones(0)
    if config.method == "inversion_dpo":  # the other methods have no inversion grid (and any spacing works for them)
        grid = inversion_grid(pipe.scheduler.config, config.inversion_steps)
        inv_timesteps, inv_abar = grid.timesteps, grid.alphas_cumprod[grid.timesteps]
        point_weights = timestep_weights(inv_timesteps, noise_scheduler.alphas_cumprod, config.timestep_weighting)

    config_json = config.model_dump(mode="json")
    settings = {k: config_json[k] for k in CACHE_KEY_FIELDS}
    cache_dir = f"{(config.inversion_cache_dir or str(out / 'cache')).rstrip('/')}/{_hash(settings)}"
    # The identity of every entry (inversion_cache.py): the settings, and for a disk cache the model (model_id).
    identity = json.dumps(settings, sort_keys=True) + model_id
    # caption -> text embeddings (config.cache_text_embeddings): the text encoders run once per caption.
    text_cache: dict[str, Any] | None = {} if config.cache_text_embeddings else None
    invert = partial(invert_pairs, pipe, reference, config, accelerator, text_cache)
    cache = InversionCache(
        config.inversion_cache, cache_dir, invert, identity=identity, target=config.inversion_target,
        dtype=STORAGE_DTYPES[config.inversion_cache_dtype],
        points_per_pair=config.inversion_points_per_pair, seed=config.seed, grid=inv_timesteps, abar=inv_abar,
        device=device,
    )  # fmt: skip

    def cached_pairs(batch: list[PreferencePair], caps: list[str]) -> InvertedPairs:
        # paired and x0 keep noise; a v-prediction policy is asked for v (InvertedPairs.for_prediction).
        pairs = cache.batch(batch, caps)
        return pairs.for_prediction(config.inversion_target, inv_abar, noise_scheduler.config.prediction_type)

    cache_build_s = 0.0
    if config.method == "inversion_dpo" and config.inversion_cache != "none" and position.step < config.max_steps:
        t0 = time.perf_counter()
        phase("building_cache")
        covers = fill_inversion_cache(
            cache, config, position, accelerator, cb.on_cache_progress if main else None, skip
        )
        # With several processes each holds only its own pairs in memory; a shared disk cache holds them all.
        if covers and (world == 1 or config.inversion_cache == "disk"):
            reference.release()
        cache_build_s = time.perf_counter() - t0

    # --- 4. Optimise ---------------------------------------------------------------------------------------------
    # Saves `position` as it is when called (the loop advances it in place).
    checkpoint = partial(
        save, checkpoints, position, config, policy, optimizer, lr_scheduler, accelerator, cb.on_checkpoint, ema
    )
    validate_every = config.validation_interval if config.validation_prompts else 0
    sampler = None
    stream = _pairs_from(config, position.epoch, position.index, skip)
    metrics: dict[str, float] = {}
    stopped, last_checkpoint, saved_step, train_s = False, None, position.step, 0.0
    phase("training")
    while position.step < config.max_steps:
        if stop_requested(cb, accelerator):
            stopped = True
            break
        t0 = time.perf_counter()
        micro: list[dict[str, torch.Tensor]] = []
        grad_norm = None
        step_start = (position.epoch, position.index)
        for micro_step in range(config.gradient_accumulation_steps):
            # A huge step (many micro-batches) honours a stop too: it is undone, the checkpoint is of the step before.
            if micro_step > 0 and stop_requested(cb, accelerator):
                position.epoch, position.index = step_start
                optimizer.zero_grad(set_to_none=True)
                stopped = True
                break
            chunk = [next(stream) for _ in range(config.batch_size * world)]
            position.epoch, position.index = chunk[-1][0], chunk[-1][1] + 1  # the position of the next pair to read
            mine = chunk[rank * config.batch_size : (rank + 1) * config.batch_size]
            batch = [pair for _, _, pair in mine]
            draws = pair_generators(config.seed, mine)
            with accelerator.accumulate(unet):
                # Forward and backward of one micro-batch.
                caps = captions(batch, config, draws)
                cond = encode_prompts(
                    pipe, caps, device=device, resolution=resolution, time_ids=pair_time_ids(batch, resolution),
                    cache=text_cache,
                )  # fmt: skip
                if config.method == "inversion_dpo" and config.timesteps_per_step == 0:
                    # All N points in two passes: memory flat in N (methods.all_points_backward).
                    loss, batch_metrics = all_points_backward(
                        unet, cached_pairs(batch, caps), cond, weights=point_weights, beta=config.beta,
                        loss_type=config.loss_type, backward=accelerator.backward,
                    )  # fmt: skip
                else:
                    if config.method == "diffusion_dpo":
                        z_w, z_l = encode_latents(pipe.vae, batch, resolution, device, latent_cache)
                        with reference.use() as ref, accelerator.autocast():
                            points = diffusion_dpo_points(ref, noise_scheduler, z_w, z_l, cond, generator=draws)
                    elif config.method == "inpo":
                        # InPO: both images inverted every step by the current policy (or the reference), nothing
                        # cached; the reference errors after, since with LoRA the reference is the policy with its
                        # adapters off.
                        z_w, z_l = encode_latents(pipe.vae, batch, resolution, device, latent_cache)
                        inverter = reference.use() if config.inpo_inverter == "reference" else nullcontext(policy)
                        with inverter as unet_inverting, accelerator.autocast():
                            points = inpo_points(
                                unet_inverting, noise_scheduler, z_w, z_l, cond,
                                inversion_steps=config.inpo_inversion_steps, eta=config.inpo_eta, generator=draws,
                            )  # fmt: skip
                        with reference.use() as ref, accelerator.autocast():
                            points = with_reference_errors(ref, points)
                    else:
                        points = inversion_dpo_points(
                            cached_pairs(batch, caps), cond, k=config.timesteps_per_step, weights=point_weights,
                            generator=draws,
                        )  # fmt: skip
                    loss, batch_metrics = points_loss(unet, points, beta=config.beta, loss_type=config.loss_type)
                    accelerator.backward(loss)
                    loss = loss.detach()
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()  # accelerate steps only after the last micro-batch
                optimizer.zero_grad(set_to_none=True)
            micro.append({"loss": loss, **batch_metrics})
        if stopped:
            break
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow skips a step
            lr_scheduler.step()
        if ema is not None:
            ema.step(trainable)
        position.step += 1
        position.pairs_seen += pairs_per_step
        train_s += time.perf_counter() - t0

        metrics = step_metrics(micro, accelerator, lr=lr_scheduler.get_last_lr()[0], grad_norm=grad_norm)
        if skipped:
            metrics["skipped_pairs"] = float(len(skipped))
        if main and cb.on_step:
            cb.on_step(position.step, config.max_steps, metrics)
        if main and validate_every and position.step % validate_every == 0:
            if sampler is None:  # the same components; no safety checker (its output is for the operator)
                has_checker = isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is not None
                sampler = DiffusionPipeline.from_pipe(pipe, safety_checker=None) if has_checker else pipe
            phase("sampling")
            images = validation_images(sampler, config, accelerator)
            if cb.on_validation:
                cb.on_validation(position.step, images)
            phase("training")
        if position.step % config.checkpoint_interval == 0 or position.step == config.max_steps:
            last_checkpoint, saved_step = checkpoint(), position.step
    stream.close()
    if stopped and position.step > saved_step:
        last_checkpoint = checkpoint()

    # --- 5. Output -----------------------------------------------------------------------------------------------
    model_out = None if stopped else out / "model"
    if main and not stopped:
        phase("saving_model")
        if (
            ema is not None
        ):  # the averaged weights are the model (training is over: the raw ones are in the checkpoint)
            ema.copy_to(trainable)
        save_model(pipe, config, out, weight_dtype)
    wall = time.perf_counter() - started
    result = TrainResult(
        steps=position.step,
        stopped_early=stopped,
        metrics=metrics,
        wall_time_s=wall,
        pairs_per_s=(position.step - resumed_from) * pairs_per_step / train_s if train_s > 0 else 0.0,
        output_dir=out,
        model_path=model_out,
        resumed_from=resumed_from,
        checkpoint=last_checkpoint,
    )
    if main:
        write_summary(result, config, position, train_s=train_s, cache_build_s=cache_build_s)
    accelerator.wait_for_everyone()
    return result
