"""Tiny diffusion pipelines built from configs, with no download, for tests, the demo and the benchmarks.

Shaped like diffusers' `get_dummy_components`: real classes, tiny sizes. 64 px images, 8x8x4 latents.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN = 32
MAX_TOKENS = 16


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    bs = list(printable)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose vocab.json / merges.txt are written locally (byte alphabet, a few merges)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = ["r e", "e d</w>", "b l", "u e</w>", "g r", "e e", "c i", "r c", "l e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=MAX_TOKENS
    )
    tokenizer.save_pretrained(directory)  # so the directory alone reloads it offline
    return tokenizer


def _text_config(vocab_size: int, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _vae() -> AutoencoderKL:
    # Four blocks = three 2x downsamples = the 8x factor of the real SD VAEs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )


def _scheduler() -> DDIMScheduler:
    # SD1.5 / SDXL training schedule.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def build_tiny_pipeline(
    kind: Literal["sd15", "sdxl"] = "sd15", seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A seeded tiny SD1.5- or SDXL-shaped pipeline (UNet ~1-2 M params) that generates 64 px images offline."""
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind must be one of 'sd15', 'sdxl', got {kind!r}")
    torch.manual_seed(seed)
    tmp = Path(tempfile.mkdtemp(prefix="invdpo-tok-"))
    tokenizer = write_tiny_tokenizer(tmp / "tokenizer")
    vocab = len(tokenizer)
    unet_common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    if kind == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=TEXT_HIDDEN, **unet_common)
        text_encoder = CLIPTextModel(_text_config(vocab))
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # SDXL: two text encoders (hidden states concatenated), pooled embeddings and added time ids.
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        transformer_layers_per_block=1,
        **unet_common,
    )
    tokenizer_2 = write_tiny_tokenizer(tmp / "tokenizer_2")
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def with_scheduler(model_dir: Path, into: Path, **changes: object) -> Path:
    """A copy of the saved pipeline at `model_dir`, in `into`, whose scheduler_config.json says `changes` (as a
    checkpoint a user brings would: spacing, prediction type, number of timesteps)."""
    import shutil

    shutil.copytree(model_dir, into)
    config = into / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return into
