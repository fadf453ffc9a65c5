"""Evaluation end to end on the tiny pipeline: a model trained on the toy "redder is better" pairs is compared with
its base under the toy reward, the base against itself ties exactly, LoRA outputs load on their base, the CLIP-format
scorers load from a tiny local CLIP, the CLI reports reward-free metrics and the scorers it did not run, and the
promotion gate passes and fails as its rule says."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from invdpo_core.cli import main as cli_main
from invdpo_core.config import ConfigError, parse_config
from invdpo_core.evaluate import (
    GRID_LABEL_WIDTH,
    SCORERS,
    EvaluationError,
    bootstrap,
    check_scorers,
    evaluate,
    load_scorer,
)
from invdpo_core.gate import GateRule, evaluate_gate, parse_gate_rule
from invdpo_core.testing import write_tiny_tokenizer
from invdpo_core.toy import TOY_PROMPTS, TOY_STEPS, make_toy_dataset

PROMPTS = list(TOY_PROMPTS) * 2  # 12 prompts, seeds 0..11
# The tiny UNet's conditional and unconditional predictions differ by noise; classifier-free guidance at 7.5 would
# amplify that noise over the colour shift training learned. The trainer's effect is measured without guidance.
GEN = {"inference_steps": TOY_STEPS, "guidance_scale": 1.0, "draws": 8, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, model_dir):
    # Another seed than the training pairs: other images, other tints.
    return make_toy_dataset(tmp_path_factory.mktemp("held_out"), 16, seed=1, model_dir=model_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    """Diffusion-DPO, full fine-tune, 40 steps of 8 pairs on 32 toy pairs. Which way its pictures move is chance: the
    tiny VAE is untrained, so what the UNet learns about encoded images need not decode redder. Training seeds 0, 1,
    2 won 0, 12 and 4 of the 12 prompts (with per-visit draws; with the earlier per-process draws seeds 0-3 won all
    12), while the held-out implicit accuracy was 0.625-0.81. So the test checks the comparison, not a direction."""
    from invdpo_core.train import train

    root = tmp_path_factory.mktemp("trained")
    dataset = make_toy_dataset(root / "data", 32, seed=0, model_dir=model_dir)
    config = {
        "base_model": str(model_dir),
        "dataset": str(dataset),
        "method": "diffusion_dpo",
        "resolution": 64,
        "batch_size": 8,
        "max_steps": 40,
        "learning_rate": 1e-3,
        "beta": 500.0,
        "checkpoint_interval": 1000,
        "output_dir": str(root / "run"),
    }
    full = train(parse_config(config)).model_path
    lora = {"adapter": {"type": "lora", "rank": 4, "alpha": 8.0}, "max_steps": 2, "output_dir": str(root / "lora")}
    return {"full": full, "lora": train(parse_config({**config, **lora})).model_path}


def test_trained_model_is_compared_with_its_base_and_the_grid_shows_both(tmp_path, model_dir, held_out, trained):
    result = evaluate(str(trained["full"]), str(model_dir), str(held_out), PROMPTS, out_dir=tmp_path, **GEN)
    toy = result.scorers["toy"]
    assert toy.model_mean != toy.base_mean and toy.wins + toy.ties + toy.losses == len(PROMPTS), toy
    assert toy.win_rate.mean == pytest.approx((toy.wins + 0.5 * toy.ties) / len(PROMPTS))
    assert toy.win_rate.lower <= toy.win_rate.mean <= toy.win_rate.upper
    pm = result.pair_metrics
    assert pm.pairs == 16 and pm.draws == 8 and result.adapter == "full"
    assert 0 <= pm.implicit_acc.lower <= pm.implicit_acc.mean <= pm.implicit_acc.upper <= 1
    assert pm.reward_margin.lower <= pm.reward_margin.mean <= pm.reward_margin.upper

    # A labelled margin, then 8 columns (the first 8 prompts), base row above the fine-tuned row, 64 px each.
    with Image.open(result.grid) as grid:
        assert grid.size == (GRID_LABEL_WIDTH + 8 * 64, 2 * 64) and grid.mode == "RGB"
        pixels = np.asarray(grid)
    assert not np.array_equal(pixels[:64], pixels[64:])  # the two rows differ
    margin = pixels[:, :GRID_LABEL_WIDTH]
    assert (margin < 128).any(axis=2).any() and not np.array_equal(margin[:64], margin[64:])  # two different labels
    assert result.metrics()["eval/implicit_acc_n"] == 16 and result.metrics()["eval/win_rate_n/toy"] == len(PROMPTS)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["scorers"]["toy"]["win_rate"]["mean"] == toy.win_rate.mean
    assert saved["grid_prompts"] == PROMPTS[:8]
    # The file names its grid beside it, so it still points at it once copied away (the worker's scratch
    # directory is deleted after the two are logged to MLflow).
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    (tmp_path / "grid.png").unlink()
    with Image.open(moved / json.loads((moved / "evaluation.json").read_text())["grid"]) as copy:
        assert copy.size == grid.size
    metrics = result.metrics()
    assert metrics["eval/win_rate/toy"] == toy.win_rate.mean
    assert metrics["eval/implicit_acc_lower"] == pm.implicit_acc.lower


def test_base_against_itself_ties_exactly(tmp_path, model_dir, held_out):
    result = evaluate(str(model_dir), str(model_dir), str(held_out), PROMPTS, out_dir=tmp_path, **GEN)
    toy = result.scorers["toy"]
    # Same weights, same seeds: identical images, every prompt a tie, and ties count half.
    assert (toy.win_rate.mean, toy.win_rate.lower, toy.win_rate.upper) == (0.5, 0.5, 0.5)
    assert toy.ties == len(PROMPTS) and toy.base_mean == toy.model_mean
    # Policy == reference on the same draws: every pair's margin is exactly 0.
    pm = result.pair_metrics
    assert (pm.implicit_acc.mean, pm.implicit_acc.lower, pm.implicit_acc.upper) == (0.5, 0.5, 0.5)
    assert pm.reward_margin.mean == 0.0
    with Image.open(result.grid) as grid:
        pixels = np.asarray(grid)[:, GRID_LABEL_WIDTH:]  # the images, without the row labels
    assert np.array_equal(pixels[:64], pixels[64:])


def test_lora_output_is_evaluated_on_its_base(tmp_path, model_dir, held_out, trained):
    result = evaluate(str(trained["lora"]), str(model_dir), str(held_out), PROMPTS[:4], out_dir=tmp_path, **GEN)
    assert result.adapter == "lora"
    # The base side is the shared pipeline with its adapters off: the same images as the base on its own.
    alone = evaluate(str(model_dir), str(model_dir), str(held_out), PROMPTS[:4], out_dir=tmp_path / "b", **GEN)
    assert result.scorers["toy"].base_mean == alone.scorers["toy"].base_mean
    assert result.scorers["toy"].model_mean != result.scorers["toy"].base_mean  # the adapter changed the images
    assert result.pair_metrics.reward_margin.mean != 0.0


def test_cli_without_scorers_reports_reward_free_metrics_and_what_did_not_run(
    tmp_path, model_dir, held_out, trained, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    argv = ["evaluate", "--model", str(trained["full"]), "--base", str(model_dir), "--pairs", str(held_out)]
    argv += ["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2", "--draws", "2"]
    assert cli_main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pair_metrics"]["pairs"] == 16 and report["prompts"] == 2
    assert set(report["metrics"]) >= {"eval/implicit_acc", "eval/implicit_acc_lower", "eval/reward_margin"}
    assert set(report["not_run"]) == set(SCORERS) and list(report["scorers"]) == ["toy"]
    assert all(not k.startswith(f"eval/win_rate/{s}") for k in report["metrics"] for s in SCORERS)
    with Image.open(report["grid"]) as grid:
        assert grid.size == (GRID_LABEL_WIDTH + 2 * 64, 2 * 64)

    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "implicit accuracy:" in text and "reward margin:" in text
    assert all(f"{name}: not run" in text for name in SCORERS)

    assert cli_main([*argv, "--scorer", "pickscore"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert cli_main([*argv, "--scorer", "imagereward=/nowhere"]) == 2
    assert "unknown scorer 'imagereward'" in capsys.readouterr().err  # no loader: not offered


# --- scorers: a tiny CLIP built from a config, saved to disk, loaded back -----------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    tokenizer = write_tiny_tokenizer(path)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=16))
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]


def test_clip_scorers_match_clipmodel_forward(tiny_clip):
    images, prompts = _images(), ["a red circle", "a blue square", "a green triangle"]
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    logits = out.logits_per_image.diagonal()  # logit_scale.exp() * cos, each image with its own prompt
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    device = torch.device("cpu")
    pick = load_scorer("pickscore", str(tiny_clip), device=device, batch_size=2)(images, prompts)
    assert pick == pytest.approx(logits.tolist(), abs=1e-4)
    hps = load_scorer("hpsv2.1", str(tiny_clip), device=device)(images, prompts)
    assert hps == pytest.approx((100 * cos).tolist(), abs=1e-3)
    clip = load_scorer("clip_score", str(tiny_clip), device=device)(images, prompts)
    assert clip == pytest.approx((100 * cos).clamp(min=0).tolist(), abs=1e-3)


def test_aesthetic_head_on_normalised_image_embeddings(tiny_clip, tmp_path):
    import shutil

    directory = tmp_path / "aesthetic"
    shutil.copytree(tiny_clip, directory)
    # The LAION predictor's shape (Linear at 0, 2, 4, 6, 7; dropout between), narrowed to the tiny CLIP's 16 dims.
    torch.manual_seed(1)
    dims = [(16, 32), (32, 16), (16, 8), (8, 4), (4, 1)]
    layers = {i: torch.nn.Linear(a, b) for i, (a, b) in zip((0, 2, 4, 6, 7), dims, strict=True)}
    state = {f"layers.{i}.{k}": v for i, layer in layers.items() for k, v in layer.state_dict().items()}
    torch.save(state, directory / "sac+logos+ava1-l14-linearMSE.pth")

    images = _images()
    model, processor = CLIPModel.from_pretrained(directory).eval(), CLIPProcessor.from_pretrained(directory)
    with torch.no_grad():
        emb = model(**processor(text=["x"] * 3, images=images, return_tensors="pt", padding=True)).image_embeds
        x = emb
        for i in (0, 2, 4, 6, 7):
            x = layers[i](x)
    got = load_scorer("aesthetic", str(directory), device=torch.device("cpu"))(images, [""] * 3)
    assert got == pytest.approx(x.squeeze(1).tolist(), abs=1e-5)


def test_scorer_problems_are_one_line_errors(tiny_clip, tmp_path):
    cases = {
        "nope": "unknown scorer 'nope'; valid: pickscore",
        "toy": "built in",
        "imagereward": "unknown scorer 'imagereward'",
        "pickscore": "no config.json",
        "aesthetic": "exactly one \\*.pth",
    }
    for name, message in cases.items():
        path = str(tiny_clip) if name == "aesthetic" else str(tmp_path)
        with pytest.raises(EvaluationError, match=message):
            check_scorers({name: path})


def test_a_given_scorer_runs_and_leaves_the_not_run_list(tmp_path, model_dir, tiny_clip):
    result = evaluate(
        str(model_dir),
        str(model_dir),
        None,
        PROMPTS[:3],
        out_dir=tmp_path,
        scorers={"pickscore": str(tiny_clip)},
        **GEN,
    )
    assert set(result.scorers) == {"toy", "pickscore"} and "pickscore" not in result.not_run
    assert result.scorers["pickscore"].win_rate.mean == 0.5  # identical images score identically
    # No held-out pairs: no reward-free metrics, rather than made-up ones.
    assert result.pair_metrics is None and not any("implicit_acc" in k for k in result.metrics())


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.6, 0.2, 200).tolist()
    a, b = bootstrap(values, seed=3), bootstrap(values, seed=3)
    assert a == b and a.lower < a.mean < a.upper
    assert a.upper - a.lower == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(200), rel=0.25)
    assert bootstrap([1.0, 1.0], seed=0) == bootstrap([1.0], seed=5)


# --- the promotion gate --------------------------------------------------------------------------------------------
GOOD = {"eval/implicit_acc": 0.7, "eval/implicit_acc_lower": 0.58, "eval/win_rate/pickscore": 0.64}


@pytest.mark.parametrize(
    ("rule", "metrics", "passed", "reason"),
    [
        ({}, GOOD, True, "eval/implicit_acc_lower 0.58 > 0.5"),
        ({}, {**GOOD, "eval/implicit_acc_lower": 0.49}, False, "eval/implicit_acc_lower 0.49 <= 0.5"),
        ({}, {**GOOD, "eval/implicit_acc_lower": 0.5}, False, "<= 0.5"),  # above, not at
        ({"win_rate_scorer": "pickscore", "min_win_rate": 0.6}, GOOD, True, "eval/win_rate/pickscore 0.64 > 0.6"),
        ({"win_rate_scorer": "pickscore", "min_win_rate": 0.7}, GOOD, False, "eval/win_rate/pickscore 0.64 <= 0.7"),
        ({"min_implicit_acc_lower": None, "win_rate_scorer": "hpsv2"}, GOOD, False, "win_rate/hpsv2 missing"),
        ({}, {}, False, "eval/implicit_acc_lower missing"),
    ],
)
def test_gate(rule, metrics, passed, reason):
    ok, reasons = evaluate_gate(metrics, parse_gate_rule(rule))
    assert ok is passed
    assert any(reason in r for r in reasons), reasons


def test_gate_needs_every_check_to_pass():
    rule = GateRule(win_rate_scorer="pickscore", min_win_rate=0.5)
    ok, reasons = evaluate_gate({**GOOD, "eval/implicit_acc_lower": 0.4}, rule)
    assert not ok and len(reasons) == 2


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"min_implicit_acc_lower": None}, "the rule checks nothing"),
        ({"min_win_rate": 1.5, "win_rate_scorer": "toy"}, "min_win_rate"),
        ({"min_acc": 0.5}, "min_acc"),
    ],
)
def test_bad_gate_rules_name_the_field(rule, field):
    with pytest.raises(ConfigError, match=field):
        parse_gate_rule(rule)
