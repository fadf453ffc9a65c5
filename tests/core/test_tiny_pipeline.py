import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from invdpo_core.cli import main as core_main
from invdpo_core.testing import build_tiny_pipeline


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_pipeline_generates_64px_and_round_trips(kind, tmp_path):
    pipe = build_tiny_pipeline(kind=kind, seed=0)
    assert pipe.vae.config.block_out_channels and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert image.shape == (64, 64, 3)
    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded) is type(pipe)
    again = reloaded("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    np.testing.assert_allclose(image, again, atol=1e-5)


def test_sdxl_variant_has_both_conditioning_paths():
    pipe = build_tiny_pipeline(kind="sdxl")
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size * 2


def test_same_seed_same_weights_and_unknown_kind_rejected():
    a, b = build_tiny_pipeline(seed=3), build_tiny_pipeline(seed=3)
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="sd15"):
        build_tiny_pipeline(kind="sd3")


def test_cli_tiny_model(tmp_path, capsys):
    assert core_main(["tiny-model", str(tmp_path / "m"), "--kind", "sdxl", "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model_index.json").exists()
    assert (tmp_path / "m" / "tokenizer_2" / "tokenizer.json").exists()
