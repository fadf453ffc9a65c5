"""The Stable Diffusion pipeline: loading one (train, evaluate and the worker's LoRA merge) and encoding preference
pairs to latents with its VAE (train and evaluate)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from invdpo_core.data import PreferencePair, image_time_ids, load_image
from invdpo_core.storage import resolve_model

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

# Where base models downloaded from s3:// are kept when the caller names no directory.
DEFAULT_MODEL_CACHE_DIR = Path.home() / ".cache/invdpo"


class PipelineLoadError(RuntimeError):
    """The model cannot be loaded as a Stable Diffusion 1.x/2.x or XL pipeline; one-line message naming it."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line, at most 200 characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def load_pipeline(
    uri: str,
    *,
    model_cache_dir: str | Path | None = None,
    what: str = "base model",
    unet_dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The pipeline at `uri` (a local directory, a hub id or an s3:// prefix, downloaded once into `model_cache_dir`,
    see storage.resolve_model), on the CPU, progress bars off. `what` names the model in errors. unet_dtype: load
    the UNet in it (diffusers otherwise loads float32 whatever the files hold: 10 GB for an SDXL UNet)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    path = resolve_model(uri, model_cache_dir or DEFAULT_MODEL_CACHE_DIR)
    try:
        parts = {}
        if unet_dtype is not None:
            parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=unet_dtype)
        pipe = DiffusionPipeline.from_pretrained(path, **parts)
    except Exception as exc:  # diffusers raises OSError, ValueError, KeyError...: all mean "cannot load this"
        raise PipelineLoadError(f"{what} {uri}: cannot load: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(pipe, StableDiffusionPipeline | StableDiffusionXLPipeline):
        raise PipelineLoadError(
            f"{what} {uri}: {type(pipe).__name__} is not supported "
            "(StableDiffusionPipeline or StableDiffusionXLPipeline)"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LatentCache:
    """image -> its VAE latent (config.cache_latents), so a VAE encodes each image once per run, not once per visit.

    An entry's key is the sha256 of the image's bytes, the VAE's `identity` (inversion_cache.model_digest of its
    weights as loaded), its dtype and the resolution. Entries are (C, h, w) float32 on the CPU, exactly the tensors
    encode_latents returns, so a cached run trains on the same latents. At most `budget` bytes are held; past it new
    images are encoded every visit and not kept (`full` says so)."""

    identity: str
    budget: int
    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    held: int = 0  # bytes in entries
    full: bool = False

    def key(self, image: bytes, vae_dtype: torch.dtype, resolution: int) -> str:
        parts = [self.identity, str(vae_dtype), str(resolution), hashlib.sha256(image).hexdigest()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def encode_latents(
    vae: AutoencoderKL,
    batch: list[PreferencePair],
    resolution: int,
    device: torch.device,
    cache: LatentCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' images as scaled VAE latents: (B, 4, h, w) winners, (B, 4, h, w) losers, in float32.
    cache: only images not in it go through the VAE (in one batch, chosen then rejected of each pair), and are kept
    while it has room."""
    images = [(p, im) for p in batch for im in (p.chosen, p.rejected)]  # chosen, rejected, ...
    if cache is None:
        z = _encode(vae, images, resolution, device)
        return z[0::2].contiguous(), z[1::2].contiguous()
    keys = [cache.key(im, vae.dtype, resolution) for _, im in images]
    found = {k: cache.entries[k] for k in keys if k in cache.entries}
    todo = list({k: i for i, k in enumerate(keys) if k not in found}.values())  # the first image of each new key
    if todo:
        for i, latent in zip(todo, _encode(vae, [images[i] for i in todo], resolution, device), strict=True):
            entry = latent.cpu().clone()
            found[keys[i]] = entry
            if cache.held + entry.nbytes > cache.budget:
                cache.full = True
            else:
                cache.entries[keys[i]] = entry
                cache.held += entry.nbytes
    z = torch.stack([found[k] for k in keys]).to(device)  # (2B, 4, h, w): chosen, rejected, ...
    # Contiguous: on the CPU the VAE returns channels-last, and bf16 UNet kernels give other numbers on it than on
    # the contiguous copies other code paths make, which puts offsets between the policy and the reference.
    return z[0::2].contiguous(), z[1::2].contiguous()


def _encode(
    vae: AutoencoderKL, images: list[tuple[PreferencePair, bytes]], resolution: int, device: torch.device
) -> torch.Tensor:
    """(pair, image bytes) -> the images' scaled latents (n, 4, h, w) in float32, in that order."""
    pixels = torch.stack([load_image(im, resolution, source=p.source) for p, im in images])
    pixels = pixels.to(device, dtype=vae.dtype)  # (2B, 3, R, R): chosen, rejected, ...
    with torch.no_grad():
        # The posterior mean, not a sample: deterministic, so a cached inversion stays valid.
        return vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor


def pair_time_ids(batch: list[PreferencePair], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's time ids of the crops encode_latents takes: (B, 6) winners', (B, 6) losers' (for encode_prompts)."""
    winners = [image_time_ids(p.chosen, resolution, source=p.source) for p in batch]
    losers = [image_time_ids(p.rejected, resolution, source=p.source) for p in batch]
    return torch.tensor(winners, dtype=torch.float32), torch.tensor(losers, dtype=torch.float32)
