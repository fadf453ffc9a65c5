"""The training loop: Diffusion-DPO and Inversion-DPO fine-tuning of a Stable Diffusion 1.x/2.x or XL pipeline.

`train(config, callbacks)` is what the CLI and the worker call. One run:
1. load the base pipeline (local dir, hub id or s3:// prefix, see storage.resolve_model); VAE and text encoders
   frozen; the policy UNet trained in full or through a LoRA adapter; the reference is a frozen copy (full) or the
   same UNet with its adapters disabled (LoRA);
2. resume from the newest complete checkpoint in output_dir/checkpoints (config.resume);
3. inversion_dpo with a memory or disk cache: invert the pairs the run will read, in training order, once, and
   release the reference as soon as the cache covers the whole dataset (the step then needs no reference);
4. optimise through accelerate: micro-batches of pairs, gradient accumulation, clipping, LR schedule, mixed
   precision. The forward goes through the prepared (DDP-wrapped) model, so gradients are synchronised;
5. write the model (a diffusers pipeline dir, or LoRA weights + base_model.json) and summary.json.

Exact resume: a checkpoint holds the trainable weights, the optimizer, the LR scheduler, every RNG (python, numpy,
torch, CUDA and `generator`, which draws noise, timesteps, points and Diffusion-DPO's empty captions), the step and
the position in the data (epoch, index). 2N steps straight equal N + resume + N (tests/core/test_train.py); with
a memory cache and batch_size > 1 across an epoch boundary the rebuilt cache may batch pairs differently, which
can change results at float rounding level.

Ties kept by tie_policy=keep train as ordinary pairs (jpg_0 as the chosen image). Models downloaded from s3:// are
cached under $INVDPO_CACHE_DIR (default ~/.cache/invdpo).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import gather_object, set_seed
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from transformers.optimization import Adafactor

from invdpo_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from invdpo_core.config import TrainingConfig
from invdpo_core.data import DatasetError, PreferencePair, iter_pairs, load_image
from invdpo_core.inversion import InvertedPairs, build_inverted_pairs, encode_prompts, inverse_scheduler, pair_coin
from invdpo_core.methods import (
    all_points_backward,
    diffusion_dpo_points,
    inversion_dpo_points,
    points_loss,
    timestep_weights,
)
from invdpo_core.storage import resolve_model

# Settings a resumed run may change: how long, how often, where. Any other difference from the checkpoint's config
# is an error, or the resumed run would not continue the run that wrote it.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "checkpoint_interval",
        "checkpoints_to_keep",
        "validation_prompts",
        "validation_interval",
        "validation_inference_steps",
        "output_dir",
        "resume",
        "inversion_cache",
    }
)
# Settings an inversion cache entry depends on; the disk cache directory is named by their hash.
CACHE_KEYS = (
    "base_model",
    "resolution",
    "inversion_target",
    "inversion_steps",
    "inversion_guidance",
    "empty_prompt_share",
    "seed",
    "mixed_precision",
)


class TrainError(RuntimeError):
    """The run cannot start or continue (model not loadable, checkpoint of another config...); one-line message."""


@dataclass
class TrainCallbacks:
    """Optional hooks, called on the main process (should_stop on every process; True on any stops them all)."""

    on_step: Callable[[int, int, dict[str, float]], None] | None = None  # (step, max_steps, metrics)
    should_stop: Callable[[], bool] | None = None  # polled before every step: True checkpoints and returns
    on_checkpoint: Callable[[Path, int], None] | None = None  # (checkpoint dir, step)
    on_validation: Callable[[int, list[Image.Image]], None] | None = None  # (step, one image per prompt)
    on_cache_progress: Callable[[int, int], None] | None = None  # (pairs walked, pairs planned), inversion cache


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


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _pair_uniform(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by the seed and the pair: inversion_dpo's empty-caption draw, fixed per pair so the
    cached inversion, the reference errors and the policy all see the same caption."""
    digest = hashlib.sha256(f"{seed}:empty:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pairs_from(config: TrainingConfig, epoch: int, index: int) -> Generator[tuple[int, int, PreferencePair]]:
    """Pairs in training order from position (epoch, index), epoch after epoch: yields (epoch, index, pair)."""
    while True:
        n = index
        for pair in iter_pairs(config.dataset, tie_policy=config.tie_policy, seed=config.seed + epoch, start=index):
            yield epoch, n, pair
            n += 1
        if n == 0:
            raise DatasetError("empty_dataset", f"{config.dataset}: no usable pairs")
        epoch, index = epoch + 1, 0


def _map_pairs(pairs: InvertedPairs, fn: Callable[[torch.Tensor], torch.Tensor]) -> InvertedPairs:
    return InvertedPairs(*(fn(getattr(pairs, f.name)) for f in fields(pairs)))


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    name, keys, pos, has_gauss, cached = np_state
    return {
        "python": random.getstate(),
        # As a tensor: checkpoints load with weights_only=True, which refuses numpy arrays.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def train(config: TrainingConfig, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """Fine-tune `config.base_model` on `config.dataset` with `config.method`; see the module docstring."""
    cb = callbacks or TrainCallbacks()
    started = time.perf_counter()
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    # cpu=True on a host without CUDA: else several torchrun processes there are each a lone main process.
    if not PartialState(cpu=not torch.cuda.is_available()).use_distributed:
        # accelerate keeps its precision in a process-wide singleton that refuses a second value, and a worker
        # process runs jobs of different precisions one after another. (A distributed launch runs one job.)
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision
    )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    set_seed(config.seed)  # python, numpy, torch: the LoRA initialisation draws from them
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    # Draws noise, timesteps, points and empty captions. On the CPU, so a seed gives the same numbers on any device.
    generator = torch.Generator().manual_seed(config.seed + rank)
    pairs_per_step = config.batch_size * world * config.gradient_accumulation_steps

    # --- 1. Models: frozen VAE and text encoders, the policy UNet, the reference ---------------------------------
    model_path = resolve_model(config.base_model, os.environ.get("INVDPO_CACHE_DIR") or Path.home() / ".cache/invdpo")
    try:
        pipe = DiffusionPipeline.from_pretrained(model_path)
    except Exception as exc:  # diffusers raises OSError, ValueError, KeyError...: all mean "cannot load this"
        raise TrainError(
            f"base model {config.base_model}: cannot load: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise TrainError(
            f"base model {config.base_model}: {type(pipe).__name__} is not supported "
            "(StableDiffusionPipeline or StableDiffusionXLPipeline)"
        )
    pipe.set_progress_bar_config(disable=True)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if isinstance(pipe, StableDiffusionXLPipeline) else [])
    for encoder in encoders:
        encoder.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    pipe.vae.requires_grad_(False).eval().to(device)
    base = pipe.unet  # the policy; `unet` below is its accelerate-prepared (possibly DDP-wrapped) form
    base.to(device)
    # Frozen weights in the training precision. (Cast only when it changes something: diffusers warns on any cast.)
    if weight_dtype != torch.float32 and not pipe.vae.config.force_upcast:  # SD VAEs overflow in fp16: they say so
        pipe.vae.to(dtype=weight_dtype)
    ref_unet = None
    if config.adapter.type == "full":
        ref_unet = copy.deepcopy(base).requires_grad_(False).eval()
        if weight_dtype != torch.float32:
            ref_unet.to(dtype=weight_dtype)
        base.requires_grad_(True)
    else:
        base.requires_grad_(False)
        if weight_dtype != torch.float32:
            base.to(dtype=weight_dtype)
        lora = LoraConfig(
            r=config.adapter.rank, lora_alpha=config.adapter.alpha, target_modules=list(config.adapter.target_modules)
        )
        try:
            base.add_adapter(lora)
        except ValueError as exc:  # no layer matches target_modules
            raise TrainError(f"adapter.target_modules: {_one_line(exc)}") from None
        cast_training_params(base, torch.float32)  # the adapter trains in fp32 whatever the base's dtype
    if config.gradient_checkpointing:
        base.enable_gradient_checkpointing()
    base.train()
    reference_released = False

    @contextmanager
    def reference() -> Iterator[Any]:
        """The frozen reference: the copy (full), or the policy with its adapters switched off (LoRA)."""
        assert not reference_released, "the reference was released; every pair should be in the inversion cache"
        if ref_unet is not None:
            yield ref_unet
            return
        base.disable_adapters()
        try:
            yield base
        finally:
            base.enable_adapters()

    params = [p for p in base.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
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
    # The scheduler is stepped here once per optimizer step, so it is not handed to accelerate (which would step
    # it once per process).
    unet, optimizer = accelerator.prepare(base, optimizer)

    # --- 2. Resume ---------------------------------------------------------------------------------------------
    config_json = config.model_dump(mode="json")
    fixed = {k: v for k, v in config_json.items() if k not in RESUMABLE_CHANGES}
    config_hash = _hash(fixed)
    step = epoch = index = pairs_seen = 0
    latest = latest_checkpoint(checkpoints) if config.resume else None
    if not config.resume and main and checkpoints.exists():
        shutil.rmtree(checkpoints)  # documented: resume=false starts over
    if latest is not None:
        objects, manifest = load_checkpoint(latest)
        if manifest["config_hash"] != config_hash:
            old = manifest["meta"].get("config", {})
            changed = sorted(k for k in fixed if old.get(k) != fixed[k])
            raise TrainError(
                f"{latest}: written with different settings ({', '.join(changed) or 'unknown'}); use the same "
                "config, another output_dir, or resume: false"
            )
        if config.adapter.type == "full":
            base.load_state_dict(objects["model"])
        else:
            set_peft_model_state_dict(base, objects["model"])
        optimizer.load_state_dict(objects["optimizer"])
        lr_scheduler.load_state_dict(objects["lr_scheduler"])
        if len(objects["rng"]) == world:  # a different process count cannot continue the same random stream
            _set_rng_state(objects["rng"][rank], generator)
        trainer = objects["trainer"]
        step, epoch, index, pairs_seen = trainer["step"], trainer["epoch"], trainer["index"], trainer["pairs_seen"]
        del objects
    resumed_from = step

    # --- 3. Data to tensors, and the inversion cache -------------------------------------------------------------
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    inv_timesteps = inverse_scheduler(pipe.scheduler.config, config.inversion_steps).timesteps
    point_weights = timestep_weights(inv_timesteps, noise_scheduler.alphas_cumprod, config.timestep_weighting)  # (N,)

    def latents(batch: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [load_image(im, config.resolution, source=p.source) for p in batch for im in (p.chosen, p.rejected)]
        pixels = torch.stack(images).to(device, dtype=pipe.vae.dtype)  # (2B, 3, R, R): chosen, rejected, ...
        with torch.no_grad():
            # The posterior mean, not a sample: deterministic, so a cached inversion stays valid.
            z = pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor
        return z[0::2], z[1::2]  # (B, 4, h, w) winners, losers

    def captions(batch: list[PreferencePair]) -> list[str]:
        if config.method == "inversion_dpo":
            empty = [_pair_uniform(config.seed, p.key) < config.empty_prompt_share for p in batch]
        else:  # drawn afresh every step, as in Diffusion-DPO's training script
            empty = (torch.rand(len(batch), generator=generator) < config.empty_prompt_share).tolist()
        return ["" if e else p.prompt for p, e in zip(batch, empty, strict=True)]

    cache: dict[str, InvertedPairs] = {}  # inversion_cache == "memory": pair key -> entry (1, N, ...) on the CPU
    cache_dir = out / "cache" / _hash({k: config_json[k] for k in CACHE_KEYS})

    def cache_file(key: str) -> Path:
        return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def has(key: str) -> bool:
        return key in cache if config.inversion_cache == "memory" else cache_file(key).is_file()

    def cached(key: str) -> InvertedPairs | None:
        if config.inversion_cache == "memory":
            return cache.get(key)
        if config.inversion_cache == "disk" and cache_file(key).is_file():
            try:
                return InvertedPairs(**torch.load(cache_file(key), map_location="cpu", weights_only=True))
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # a torn file: recompute it
                return None
        return None

    def invert(batch: list[PreferencePair], caps: list[str]) -> list[InvertedPairs]:
        """Invert pairs with the reference; one entry (1, N, ...) per pair, stored in the cache when there is one."""
        z_w, z_l = latents(batch)
        cond = encode_prompts(pipe, caps, device=device, resolution=config.resolution)
        uncond = None
        if config.inversion_guidance != 1.0:
            uncond = encode_prompts(pipe, [""] * len(batch), device=device, resolution=config.resolution)
        with reference() as ref, accelerator.autocast():
            inv = build_inverted_pairs(
                ref, pipe.scheduler.config, z_w, z_l, cond,
                target=config.inversion_target, num_steps=config.inversion_steps,
                guidance=config.inversion_guidance, uncond=uncond,
                use_winner_noise=pair_coin(config.seed, [p.key for p in batch]),
            )  # fmt: skip
        entries = []
        keep_on = torch.device("cpu") if config.inversion_cache != "none" else device
        for i, pair in enumerate(batch):
            # A copy, not a view: a view would keep (and torch.save would write) the whole batch's storage.
            entry = _map_pairs(inv.select(slice(i, i + 1)), lambda t: t.to(keep_on, copy=True))
            if config.inversion_cache == "memory":
                cache[pair.key] = entry
            elif config.inversion_cache == "disk":
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cache_file(pair.key).with_suffix(f".tmp{rank}")
                torch.save({f.name: getattr(entry, f.name) for f in fields(entry)}, tmp)
                os.replace(tmp, cache_file(pair.key))  # atomic: a reader sees a whole entry or none
            entries.append(entry)
        return entries

    def inverted(batch: list[PreferencePair], caps: list[str]) -> InvertedPairs:
        """The batch's inverted pairs (B, N, ...) on the device, from the cache or inverted now."""
        entries = [cached(p.key) for p in batch]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            for i, entry in zip(missing, invert([batch[i] for i in missing], [caps[i] for i in missing]), strict=True):
                entries[i] = entry
        return _map_pairs(InvertedPairs.cat([e for e in entries if e is not None]), lambda t: t.to(device, copy=True))

    cache_build_s = 0.0
    if config.method == "inversion_dpo" and config.inversion_cache != "none" and step < config.max_steps:
        # Walk the pairs this run will read, in its micro-batches, and invert those not cached yet. Stop after the
        # run's pairs or one full pass over the data, whichever comes first.
        t0 = time.perf_counter()
        planned, walked, covers, held = (config.max_steps - step) * pairs_per_step, 0, False, 0
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        walk = _pairs_from(config, epoch, index)
        while walked < planned and not covers:
            group: list[PreferencePair] = []  # one micro-batch of every process
            for e, _i, pair in walk:
                # A full pass: a whole epoch walked. Resumed mid-epoch (index > 0), the next epoch's first `index`
                # pairs are other pairs (each epoch has its own order), so only the end of the next epoch is one.
                if e > epoch + 1 or (e == epoch + 1 and index == 0):
                    covers = True
                    break
                group.append(pair)
                if len(group) == config.batch_size * world:
                    break
            mine = group[rank * config.batch_size : (rank + 1) * config.batch_size]
            todo = [p for p in mine if not has(p.key)]
            if todo:
                for entry in invert(todo, captions(todo)):
                    held += sum(t.numel() * t.element_size() for t in (getattr(entry, f.name) for f in fields(entry)))
            walked += len(group)
            if config.inversion_cache == "memory" and held > budget:
                raise TrainError(
                    f"inversion_cache: memory: the cache passed {held / 2**30:.1f} GiB (half the RAM) after {walked} "
                    "pairs; use inversion_cache: disk or none"
                )
            if main and cb.on_cache_progress:
                cb.on_cache_progress(walked, walked if covers else planned)
        walk.close()
        accelerator.wait_for_everyone()
        # With several processes each holds only its own pairs in memory; a shared disk cache holds them all.
        if covers and (world == 1 or config.inversion_cache == "disk"):
            reference_released = True
            ref_unet = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cache_build_s = time.perf_counter() - t0

    # --- 4. Optimise ---------------------------------------------------------------------------------------------
    def micro_step(batch: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and backward of one micro-batch; returns the detached loss and the metrics."""
        caps = captions(batch)
        cond = encode_prompts(pipe, caps, device=device, resolution=config.resolution)
        if config.method == "diffusion_dpo":
            z_w, z_l = latents(batch)
            with reference() as ref, accelerator.autocast():
                points = diffusion_dpo_points(ref, noise_scheduler, z_w, z_l, cond, generator=generator)
        else:
            pairs = inverted(batch, caps)
            if config.timesteps_per_step == 0:
                # All N points in two passes: memory flat in N (methods.all_points_backward).
                return all_points_backward(
                    unet, pairs, cond, weights=point_weights, beta=config.beta, loss_type=config.loss_type,
                    backward=accelerator.backward,
                )  # fmt: skip
            points = inversion_dpo_points(
                pairs, cond, k=config.timesteps_per_step, weights=point_weights, generator=generator
            )
        loss, metrics = points_loss(unet, points, beta=config.beta, loss_type=config.loss_type)
        accelerator.backward(loss)
        return loss.detach(), metrics

    def checkpoint() -> Path | None:
        rng = gather_object([_rng_state(generator)])  # every process's, in rank order
        path = None
        if main:
            model = base.state_dict() if config.adapter.type == "full" else get_peft_model_state_dict(base)
            objects = {
                "model": model,
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "rng": rng,
                "trainer": {"step": step, "epoch": epoch, "index": index, "pairs_seen": pairs_seen},
            }
            path = save_checkpoint(
                checkpoints, step, objects, config_hash=config_hash, meta={"config": config_json},
                keep=config.checkpoints_to_keep,
            )  # fmt: skip
            if cb.on_checkpoint:
                cb.on_checkpoint(path, step)
        accelerator.wait_for_everyone()
        return path

    sampler = None

    def validate() -> list[Image.Image]:
        nonlocal sampler
        if sampler is None:  # the same components; no safety checker (its output is for the operator)
            has_checker = isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is not None
            sampler = DiffusionPipeline.from_pipe(pipe, safety_checker=None) if has_checker else pipe
        base.eval()
        generators = [torch.Generator().manual_seed(config.seed + i) for i in range(len(config.validation_prompts))]
        with torch.no_grad(), accelerator.autocast():
            images = sampler(
                list(config.validation_prompts),
                generator=generators,
                num_inference_steps=config.validation_inference_steps,
                height=config.resolution,
                width=config.resolution,
            ).images
        base.train()
        return images

    validate_every = config.validation_interval if config.validation_prompts else 0
    stream = _pairs_from(config, epoch, index)
    metrics: dict[str, float] = {}
    stopped, last_checkpoint, saved_step, train_s = False, None, step, 0.0
    while step < config.max_steps:
        stop = bool(cb.should_stop and cb.should_stop())
        if world > 1:
            stop = accelerator.reduce(torch.tensor(float(stop), device=device), "sum").item() > 0
        if stop:
            stopped = True
            break
        t0 = time.perf_counter()
        micro: list[dict[str, torch.Tensor]] = []
        grad_norm = None
        for _ in range(config.gradient_accumulation_steps):
            chunk = [next(stream) for _ in range(config.batch_size * world)]
            epoch, index = chunk[-1][0], chunk[-1][1] + 1  # the position of the next pair to read
            batch = [pair for _, _, pair in chunk[rank * config.batch_size : (rank + 1) * config.batch_size]]
            with accelerator.accumulate(unet):
                loss, batch_metrics = micro_step(batch)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                optimizer.step()  # accelerate steps only after the last micro-batch
                optimizer.zero_grad(set_to_none=True)
            micro.append({"loss": loss, **batch_metrics})
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow skips a step
            lr_scheduler.step()
        step += 1
        pairs_seen += pairs_per_step
        train_s += time.perf_counter() - t0

        names = list(micro[0])
        values = torch.stack([torch.stack([m[n].float() for n in names]) for m in micro]).mean(0).to(device)
        values = accelerator.reduce(values, "mean") if world > 1 else values
        metrics = {n: v.item() for n, v in zip(names, values, strict=True)}
        metrics["lr"] = lr_scheduler.get_last_lr()[0]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if main and cb.on_step:
            cb.on_step(step, config.max_steps, metrics)
        if main and validate_every and step % validate_every == 0:
            images = validate()
            if cb.on_validation:
                cb.on_validation(step, images)
        if step % config.checkpoint_interval == 0 or step == config.max_steps:
            last_checkpoint, saved_step = checkpoint(), step
    stream.close()
    if stopped and step > saved_step:
        last_checkpoint = checkpoint()

    # --- 5. Output -----------------------------------------------------------------------------------------------
    model_out = None if stopped else out / "model"
    if main and model_out is not None:
        tmp = out / ".model-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if config.adapter.type == "lora":
            lora_weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(base))
            type(pipe).save_lora_weights(
                tmp, unet_lora_layers=lora_weights, unet_lora_adapter_metadata=base.peft_config["default"].to_dict()
            )
            (tmp / "base_model.json").write_text(
                json.dumps({"base_model": config.base_model, "adapter": config.adapter.model_dump()}, indent=2)
            )
        elif weight_dtype == torch.float32:
            pipe.save_pretrained(tmp)  # pipe.unet is the trained policy
        else:  # the frozen parts were cast down for training: save them as loaded
            DiffusionPipeline.from_pretrained(model_path, unet=base).save_pretrained(tmp)
        shutil.rmtree(model_out, ignore_errors=True)
        tmp.rename(model_out)

    wall = time.perf_counter() - started
    result = TrainResult(
        steps=step,
        stopped_early=stopped,
        metrics=metrics,
        wall_time_s=wall,
        pairs_per_s=(step - resumed_from) * pairs_per_step / train_s if train_s > 0 else 0.0,
        output_dir=out,
        model_path=model_out,
        resumed_from=resumed_from,
        checkpoint=last_checkpoint,
    )
    if main:
        summary = {
            "method": config.method,
            "inversion_target": config.inversion_target if config.method == "inversion_dpo" else None,
            "adapter": config.adapter.type,
            "steps": step,
            "max_steps": config.max_steps,
            "stopped_early": stopped,
            "resumed_from": resumed_from,
            "metrics": metrics,
            "wall_time_s": round(wall, 3),
            "train_time_s": round(train_s, 3),
            "cache_build_s": round(cache_build_s, 3),
            "pairs_per_s": round(result.pairs_per_s, 3),
            "pairs_seen": pairs_seen,
            "model_path": str(model_out) if model_out else None,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json.part").write_text(json.dumps(summary, indent=2))
        os.replace(out / "summary.json.part", out / "summary.json")
    accelerator.wait_for_everyone()
    return result
