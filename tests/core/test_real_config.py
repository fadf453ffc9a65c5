"""The real SD1.5, SD2.1 and SDXL architectures (the UNet, VAE, text-encoder and scheduler configs of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0, written
out below; random weights, nothing downloaded) train one step of each method on the CPU, so real shapes, attention
heads, SD2.1's v-prediction and SDXL's added conditioning are exercised.

Memory: weights are built and kept in bf16 and the runs are LoRA with mixed_precision bf16, so the base UNet is
loaded in bf16 (pipeline.load_pipeline unet_dtype): the SDXL UNet is 5 GB instead of 10, about 8 GB at the peak.
Images are 64 px (8x8 latents) instead of 512 / 1024. The tokenizer is the tiny test one (its ids fit the real
vocabulary; bos/eos/pad ids are set to its own, the one change to the text-encoder configs), with the real 77-token
length. Run alone: `nice -n 10 .venv/bin/python -m pytest -q -m slow -k real_config -s` (prints each step's time).
"""

import json
import time

import pytest
import torch

from invdpo_core.config import parse_config
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# --- runwayml/stable-diffusion-v1-5 ----------------------------------------------------------------------------------
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = {  # openai/clip-vit-large-patch14's text tower: SD1.5's encoder and SDXL's first
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_SCHEDULER = {  # a PNDMScheduler
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

# --- stabilityai/stable-diffusion-2-1 (768 px, v-prediction) --------------------------------------------------------
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
OPENCLIP_H = {  # laion CLIP-ViT-H-14's text tower, as SD2.x ships it (23 of its 24 layers)
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
}
SD21_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}  # a DDIMScheduler

# --- stabilityai/stable-diffusion-xl-base-1.0 ------------------------------------------------------------------------
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_SCHEDULER = {  # an EulerDiscreteScheduler, the same betas
    **SD15_SCHEDULER,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_VAE = {**SD_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}
OPENCLIP_BIGG = {  # laion CLIP-ViT-bigG-14's text tower: SDXL's second encoder
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}


def build_real(kind: str, out):
    """The pipeline of `kind` with its real configs and random bf16 weights, saved to `out` and freed."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from invdpo_core.testing import write_tiny_tokenizer

    def tokenizer(name: str) -> CLIPTokenizer:
        files = out.parent / f"{out.name}-{name}"
        write_tiny_tokenizer(files)
        return CLIPTokenizer(vocab=str(files / "vocab.json"), merges=str(files / "merges.txt"), model_max_length=77)

    def text(config: dict, tok: CLIPTokenizer) -> CLIPTextConfig:
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        return CLIPTextConfig(**config, **ids)

    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the SDXL UNet never exists in float32 here
    try:
        tok = tokenizer("tokenizer")
        if kind == "sd15":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**SD_VAE),
                text_encoder=CLIPTextModel(text(CLIP_L, tok)),
                tokenizer=tok,
                unet=UNet2DConditionModel(**SD15_UNET),
                scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif kind == "sd21":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**{**SD_VAE, "sample_size": 768}),
                text_encoder=CLIPTextModel(text(OPENCLIP_H, tok)),
                tokenizer=tok,
                unet=UNet2DConditionModel(**SD21_UNET),
                scheduler=DDIMScheduler.from_config(SD21_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            tok_2 = tokenizer("tokenizer_2")
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(text(CLIP_L, tok)),
                text_encoder_2=CLIPTextModelWithProjection(text(OPENCLIP_BIGG, tok_2)),
                tokenizer=tok,
                tokenizer_2=tok_2,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                force_zeros_for_empty_prompt=True,
            )
    finally:
        torch.set_default_dtype(before)
    params = sum(p.numel() for p in pipe.unet.parameters())
    pipe.save_pretrained(out)
    del pipe
    return params


METHODS = {
    "diffusion_dpo": {"method": "diffusion_dpo"},
    "inversion_dpo": {"method": "inversion_dpo", "inversion_steps": 2},
    "inpo": {"method": "inpo", "inpo_inversion_steps": 2},
}


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_real_config_trains_one_step_of_each_method(tmp_path, kind):
    t0 = time.perf_counter()
    model = tmp_path / kind
    params = build_real(kind, model)
    assert params == {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}[kind]  # the published sizes
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if kind == "sd21" else "epsilon")
    built = time.perf_counter() - t0
    dataset = make_toy_dataset(tmp_path / "data", 2)
    times = {}
    for name, method in METHODS.items():
        t1 = time.perf_counter()
        result = train(
            parse_config(
                {
                    "base_model": str(model),
                    "dataset": str(dataset),
                    "resolution": 64,
                    "batch_size": 1,
                    "max_steps": 1,
                    "mixed_precision": "bf16",
                    "adapter": {"type": "lora"},
                    "checkpoint_interval": 100,
                    "output_dir": str(tmp_path / f"run-{name}"),
                    **method,
                }
            )
        )
        times[name] = round(time.perf_counter() - t1, 1)
        assert result.steps == 1 and result.model_path is not None
        assert result.metrics["loss"] == pytest.approx(0.6931, abs=5e-3)  # policy == reference at the first step
        assert result.metrics["grad_norm"] > 0
    print(json.dumps({"kind": kind, "unet_params": params, "build_s": round(built, 1), "step_s": times}))
