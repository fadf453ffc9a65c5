"""Does the fine-tuned model beat its base, and by how much: the evidence the promotion gate (gate.py) reads.

`evaluate(model, base, pairs, prompts, ...)` measures two things and draws one picture:

1. Reward-free, on held-out preference pairs: the Diffusion-DPO implicit accuracy of the fine-tuned model (policy)
   against its base (reference), and the mean implicit reward margin. Each pair gets `draws` fixed (timestep, noise)
   draws, shared by winner and loser and by policy and reference (methods.diffusion_dpo_points); the four errors are
   averaged over the draws before the DPO margin (losses.dpo_loss) is taken, so one unlucky timestep does not decide
   a pair. A model evaluated against itself scores exactly 0.5 (ties count half).
2. Generation, on a prompt set, with the same seed per prompt for base and fine-tuned model: the win-rate (ties
   count half) and the mean score under every scorer given a local path, plus the built-in `toy` reward
   (toy.toy_image_reward, "redder is better"), which needs no weights. Nothing is downloaded; a scorer without a
   path is listed in `not_run`, never given a number.
3. A grid PNG: the base's images in the top row, the fine-tuned model's below, same prompts and seeds.

Every mean comes with a percentile bootstrap confidence interval over pairs (or prompts), seeded.

Scorers that load with transformers' CLIPModel / CLIPProcessor from a local directory:
- pickscore: PickScore_v1 (Kirstain et al., arXiv 2305.01569): logit_scale.exp() * cos(image, prompt), ~20-22;
- hpsv2 / hpsv2.1: HPS v2 / v2.1 (Wu et al., arXiv 2306.09341) converted to the transformers CLIP format (the
  official release is an open_clip checkpoint): 100 * cos(image, prompt), ~27;
- clip_score: 100 * max(cos(image, prompt), 0), torchmetrics' CLIPScore convention (any CLIP model);
- aesthetic: the LAION aesthetic predictor, an MLP head (the single *.pth file in the directory, e.g.
  sac+logos+ava1-l14-linearMSE.pth) on the L2-normalised image embedding of the CLIP ViT-L/14 in the same
  directory, ~1-10.
ImageReward is a BLIP model and has no loader here: asking for it is an error.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from invdpo_core.data import iter_pairs
from invdpo_core.inversion import encode_prompts
from invdpo_core.losses import dpo_loss
from invdpo_core.methods import diffusion_dpo_points, per_pair, policy_errors
from invdpo_core.pipeline import PipelineLoadError, encode_latents, load_pipeline, pair_time_ids
from invdpo_core.toy import toy_image_reward

# External scorers, each run only when given a local path. `toy` is built in and always runs.
# Scorers with a loader here (CLIP-format weights from a local path). ImageReward (a BLIP model) has none yet, so it is
# not offered rather than listed as "not run".
SCORERS = ("pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clip_score")
CLIP_SCORERS = ("pickscore", "hpsv2", "hpsv2.1", "clip_score", "aesthetic")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what train.py (diffusers' save_lora_weights) writes
DEFAULT_PROMPTS = (
    "a photo of a red fox in the snow",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon",
    "a cozy reading nook with a window and plants",
    "a futuristic city skyline at night, neon lights",
    "a portrait of an old fisherman, oil painting",
    "a cat wearing sunglasses on a beach",
)


class EvaluationError(ValueError):
    """The evaluation cannot run (unknown scorer, missing weights, model not loadable...); one-line message."""


@dataclass
class Interval:
    mean: float
    lower: float  # bootstrap percentile interval at `confidence`
    upper: float


@dataclass
class PairMetrics:
    pairs: int  # held-out pairs evaluated
    draws: int  # (timestep, noise) draws per pair
    beta: float  # DPO temperature of the reward margin
    implicit_acc: Interval  # share of pairs whose implicit reward prefers the winner (ties half)
    reward_margin: Interval  # mean of -0.5 * beta * ((Lp_w - Lp_l) - (Lr_w - Lr_l))


@dataclass
class ScorerMetrics:
    win_rate: Interval  # share of prompts where the fine-tuned image scores higher (ties half)
    base_mean: float
    model_mean: float
    wins: int
    ties: int
    losses: int


@dataclass
class Evaluation:
    model: str
    base: str
    adapter: Literal["full", "lora"]
    confidence: float
    pair_metrics: PairMetrics | None  # None: no held-out pairs given
    prompts: int
    seed: int  # prompt i is generated with seed + i, by both models
    inference_steps: int
    guidance_scale: float
    resolution: int
    scorers: dict[str, ScorerMetrics]  # scorer name -> metrics; always holds "toy"
    not_run: dict[str, str]  # scorer name -> why it did not run
    grid: str  # PNG path: base row on top, fine-tuned row below
    grid_prompts: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat `eval/...` metrics for MLflow and the promotion gate (gate.py)."""
        out: dict[str, float] = {}
        pm = self.pair_metrics
        for name, iv in (("implicit_acc", pm.implicit_acc), ("reward_margin", pm.reward_margin)) if pm else ():
            out[f"eval/{name}"], out[f"eval/{name}_lower"], out[f"eval/{name}_upper"] = iv.mean, iv.lower, iv.upper
            out[f"eval/{name}_n"] = self.pair_metrics.pairs if self.pair_metrics else 0  # the interval's sample size
        for scorer, m in self.scorers.items():
            out[f"eval/win_rate/{scorer}"] = m.win_rate.mean
            out[f"eval/win_rate_n/{scorer}"] = m.wins + m.ties + m.losses
            out[f"eval/win_rate_lower/{scorer}"] = m.win_rate.lower
            out[f"eval/win_rate_upper/{scorer}"] = m.win_rate.upper
            out[f"eval/score_base/{scorer}"] = m.base_mean
            out[f"eval/score_model/{scorer}"] = m.model_mean
        return out


def bootstrap(values: Sequence[float], *, seed: int, confidence: float = 0.95, samples: int = 1000) -> Interval:
    """The mean of `values` and its percentile bootstrap interval (resampling the values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    assert x.ndim == 1 and x.size > 0, f"expected a non-empty 1-D sequence, got shape {x.shape}"
    assert 0 < confidence < 1, f"confidence must be in (0, 1), got {confidence}"
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)  # (samples,)
    lower, upper = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(x.mean()), float(lower), float(upper))


# --- scorers -------------------------------------------------------------------------------------------------------
ScoreFn = Callable[[list[Image.Image], list[str]], list[float]]


def check_scorers(scorers: Mapping[str, str]) -> None:
    """Raise EvaluationError unless every `name -> path` names a known scorer with weights at a local path."""
    for name, path in scorers.items():
        if name == "toy":
            raise EvaluationError("scorer toy: built in and always run; it takes no path")
        if name not in CLIP_SCORERS:
            raise EvaluationError(f"unknown scorer {name!r}; valid: {', '.join(CLIP_SCORERS)}")
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise EvaluationError(f"scorer {name}: {path}: no config.json (not a transformers CLIP model directory)")
        if name == "aesthetic" and len(list(directory.glob("*.pth"))) != 1:
            raise EvaluationError(f"scorer aesthetic: {path}: expected exactly one *.pth file (the MLP head)")


def _aesthetic_head(path: Path, embed_dim: int) -> torch.nn.Sequential:
    """The LAION aesthetic MLP: Linear layers at indices 0, 2, 4, 6, 7 (dropout between, identity at eval)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    layers: list[torch.nn.Module] = []
    for i in range(8):
        if f"{i}.weight" in state:
            out_dim, in_dim = state[f"{i}.weight"].shape
            layers.append(torch.nn.Linear(in_dim, out_dim))
        else:
            layers.append(torch.nn.Identity())  # the dropouts of the original module
    head = torch.nn.Sequential(*layers)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise EvaluationError(f"scorer aesthetic: {path.name}: not the LAION aesthetic MLP ({exc})") from None
    first = layers[0]
    if not isinstance(first, torch.nn.Linear) or first.in_features != embed_dim:
        raise EvaluationError(
            f"scorer aesthetic: {path.name}: head input does not match the CLIP embedding {embed_dim}"
        )
    return head.eval()


def load_scorer(name: str, path: str, *, device: torch.device, batch_size: int = 16) -> ScoreFn:
    """A CLIP-format scorer from a local directory (see the module docstring): (images, prompts) -> scores."""
    from transformers import CLIPModel, CLIPProcessor

    check_scorers({name: path})
    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError...: all mean "cannot load this"
        raise EvaluationError(f"scorer {name}: {path}: cannot load: {type(exc).__name__}: {exc}") from None
    head = None
    if name == "aesthetic":
        (head_file,) = Path(path).glob("*.pth")
        head = _aesthetic_head(head_file, model.config.projection_dim).to(device)

    @torch.no_grad()
    def score(images: list[Image.Image], prompts: list[str]) -> list[float]:
        assert len(images) == len(prompts), f"{len(images)} images for {len(prompts)} prompts"
        out: list[float] = []
        for s in range(0, len(images), batch_size):
            pixels = processor(images=images[s : s + batch_size], return_tensors="pt")["pixel_values"].to(device)
            # The projected image embedding, as CLIPModel.forward computes it: (B, D), L2-normalised.
            img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            img = img / img.norm(dim=-1, keepdim=True)
            if head is not None:
                out += head(img).squeeze(1).tolist()
                continue
            text = processor(text=prompts[s : s + batch_size], padding=True, truncation=True, return_tensors="pt").to(
                device
            )
            txt = model.text_projection(
                model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
            )
            txt = txt / txt.norm(dim=-1, keepdim=True)
            cos = (img * txt).sum(dim=-1)  # (B,): each image against its own prompt
            if name == "pickscore":
                out += (model.logit_scale.exp() * cos).tolist()
            elif name == "clip_score":
                out += (100 * cos).clamp(min=0).tolist()
            else:  # hpsv2, hpsv2.1
                out += (100 * cos).tolist()
        return out

    return score


def toy_score(images: list[Image.Image], prompts: list[str]) -> list[float]:
    """The built-in scorer: toy.toy_image_reward (mean red minus mean blue); the prompt is not used."""
    return [toy_image_reward(image) for image in images]


# --- models --------------------------------------------------------------------------------------------------------
@dataclass
class _Models:
    base: Any  # the base pipeline; for LoRA also the fine-tuned one (its adapters switched on)
    tuned: Any
    adapter: Literal["full", "lora"]

    @contextmanager
    def as_base(self) -> Iterator[Any]:
        """The base pipeline; with LoRA, the shared pipeline with its adapters switched off meanwhile."""
        if self.adapter == "full":
            yield self.base
            return
        self.base.disable_lora()
        try:
            yield self.base
        finally:
            self.base.enable_lora()


def _load_pipeline(uri: str, what: str, device: torch.device, model_cache_dir: str | Path | None) -> Any:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    try:
        pipe = load_pipeline(uri, model_cache_dir=model_cache_dir, what=what)
    except PipelineLoadError as exc:
        raise EvaluationError(str(exc)) from None
    if isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is not None:
        # Blacked-out images would be scored as images; the checker's verdict is for an operator, not a metric.
        pipe = DiffusionPipeline.from_pipe(pipe, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    return pipe.to(device)


def load_models(model: str, base: str, device: torch.device, *, model_cache_dir: str | Path | None = None) -> _Models:
    """The base pipeline and the fine-tuned one: a pipeline (dir, hub id, s3://), or a local LoRA output of
    train.py (the base with `load_lora_weights`). Models from s3:// are downloaded into model_cache_dir."""
    base_pipe = _load_pipeline(base, "base", device, model_cache_dir)
    lora_dir = Path(model)
    if lora_dir.is_dir() and not (lora_dir / "model_index.json").is_file():
        if not (lora_dir / LORA_WEIGHTS).is_file():
            raise EvaluationError(f"model {model}: neither a diffusers pipeline (model_index.json) nor LoRA weights")
        try:
            base_pipe.load_lora_weights(str(lora_dir))
        except Exception as exc:  # a LoRA for another architecture, a corrupt file...
            raise EvaluationError(
                f"model {model}: cannot load the LoRA weights: {type(exc).__name__}: {exc}"
            ) from None
        return _Models(base_pipe, base_pipe, "lora")
    return _Models(base_pipe, _load_pipeline(model, "model", device, model_cache_dir), "full")


# --- 1. reward-free metrics on held-out pairs ---------------------------------------------------------------------
@torch.no_grad()
def pair_metrics(
    models: _Models,
    uri: str,
    *,
    beta: float,
    draws: int,
    resolution: int,
    device: torch.device,
    seed: int,
    batch_size: int = 4,
    max_pairs: int | None = None,
    confidence: float = 0.95,
) -> PairMetrics:
    """Implicit accuracy and reward margin of the fine-tuned model against its base on the pairs at `uri`."""
    from diffusers import DDPMScheduler

    assert draws >= 1 and batch_size >= 1, f"draws and batch_size must be >= 1, got {draws}, {batch_size}"
    with models.as_base() as pipe:
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        vae = pipe.vae
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any device
    acc: list[float] = []
    margin: list[float] = []

    def run(batch: list) -> None:
        z_w, z_l = encode_latents(vae, batch, resolution, device)  # (B, C, h, w) each, as in training
        # (B*D, C, h, w): each pair repeated `draws` times in place, pair-major.
        z_w, z_l = z_w.repeat_interleave(draws, dim=0), z_l.repeat_interleave(draws, dim=0)
        with models.as_base() as base_pipe:
            cond = encode_prompts(
                base_pipe, [p.prompt for p in batch], device=device, resolution=resolution,
                time_ids=pair_time_ids(batch, resolution),
            )  # fmt: skip
            points = diffusion_dpo_points(base_pipe.unet, scheduler, z_w, z_l, cond.repeat(draws), generator=generator)
        err_w, err_l = policy_errors(models.tuned.unet, points)  # (B*D,) each
        # (B,) each: the errors averaged over a pair's draws, then the DPO margin per pair.
        lp_w, lp_l, lr_w, lr_l = (
            per_pair(e, points.weights, draws) for e in (err_w, err_l, points.ref_err_w, points.ref_err_l)
        )
        for i in range(len(batch)):
            _, m = dpo_loss(lp_w[i : i + 1], lp_l[i : i + 1], lr_w[i : i + 1], lr_l[i : i + 1], beta=beta)
            acc.append(m["implicit_acc"].item())
            margin.append(m["rewards/margins"].item())

    batch: list = []
    for n, pair in enumerate(iter_pairs(uri, seed=0)):
        if max_pairs is not None and n >= max_pairs:
            break
        batch.append(pair)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not acc:
        raise EvaluationError(f"pairs {uri}: no usable pairs")
    return PairMetrics(
        pairs=len(acc),
        draws=draws,
        beta=beta,
        implicit_acc=bootstrap(acc, seed=seed, confidence=confidence),
        reward_margin=bootstrap(margin, seed=seed, confidence=confidence),
    )


# --- 2. generation metrics -----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
) -> list[Image.Image]:
    """One image per prompt; prompt i from seed + i (a CPU generator, so any model and device draw the same noise)."""
    images: list[Image.Image] = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s : s + batch_size])
        generators = [torch.Generator().manual_seed(seed + s + j) for j in range(len(chunk))]
        images += pipe(
            chunk,
            generator=generators,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
        ).images
    return images


def compare(
    base_scores: Sequence[float], model_scores: Sequence[float], *, seed: int, confidence: float
) -> ScorerMetrics:
    """Win-rate of the fine-tuned model over the base, prompt by prompt; a tie counts half."""
    assert len(base_scores) == len(model_scores), f"{len(base_scores)} base scores, {len(model_scores)} model scores"
    b, m = np.asarray(base_scores, dtype=np.float64), np.asarray(model_scores, dtype=np.float64)
    outcome = (m > b) + 0.5 * (m == b)  # (P,): 1 win, 0.5 tie, 0 loss
    return ScorerMetrics(
        win_rate=bootstrap(outcome.tolist(), seed=seed, confidence=confidence),
        base_mean=float(b.mean()),
        model_mean=float(m.mean()),
        wins=int((m > b).sum()),
        ties=int((m == b).sum()),
        losses=int((m < b).sum()),
    )


GRID_LABEL_WIDTH = 72  # pixels of the left margin that names each row


def image_grid(top: Sequence[Image.Image], bottom: Sequence[Image.Image]) -> Image.Image:
    """Two rows of same-size images behind a labelled margin: (72 + len * W, 2 * H); top "base", bottom
    "fine-tuned", so the picture says which row is which without the docs."""
    from PIL import ImageDraw

    assert len(top) == len(bottom) > 0, f"rows of {len(top)} and {len(bottom)} images"
    w, h = top[0].size
    m = GRID_LABEL_WIDTH
    grid = Image.new("RGB", (m + len(top) * w, 2 * h), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(("base", "fine-tuned")):
        draw.text((4, row * h + h // 2 - 5), label, fill="black")  # PIL's built-in bitmap font: no font file
    for col, (a, b) in enumerate(zip(top, bottom, strict=True)):
        assert a.size == b.size == (w, h), f"image {col}: sizes {a.size} and {b.size}, expected {(w, h)}"
        grid.paste(a.convert("RGB"), (m + col * w, 0))
        grid.paste(b.convert("RGB"), (m + col * w, h))
    return grid


# --- the whole evaluation ------------------------------------------------------------------------------------------
def evaluate(
    model: str,
    base: str,
    pairs: str | None,
    prompts: Sequence[str],
    *,
    out_dir: str | Path,
    scorers: Mapping[str, str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    beta: float = 5000.0,
    draws: int = 8,
    max_pairs: int | None = None,
    inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 4,
    grid_columns: int = 8,
    confidence: float = 0.95,
    model_cache_dir: str | Path | None = None,
) -> Evaluation:
    """Evaluate `model` (a pipeline or a LoRA output of train.py) against `base`; see the module docstring.

    pairs: held-out preference pairs (None: no reward-free metrics). scorers: name -> local directory, for any of
    SCORERS (toy is always run). resolution: default the base UNet's native size. Writes OUT_DIR/grid.png and
    OUT_DIR/evaluation.json, whose `grid` is relative to its own directory (the two travel together: copied, or
    logged to MLflow side by side). model_cache_dir: where models from s3:// are downloaded (default ~/.cache/invdpo).
    """
    scorers = dict(scorers or {})
    check_scorers(scorers)  # before any model loads: a typo should cost nothing
    prompts = list(prompts)
    if not prompts:
        raise EvaluationError("no prompts")
    device = torch.device(device)
    models = load_models(model, base, device, model_cache_dir=model_cache_dir)
    with models.as_base() as pipe:
        res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if res % 8:
        raise EvaluationError(f"resolution must be a multiple of 8, got {res}")

    pm = None
    if pairs is not None:
        pm = pair_metrics(
            models, pairs, beta=beta, draws=draws, resolution=res, device=device, seed=seed,
            batch_size=batch_size, max_pairs=max_pairs, confidence=confidence,
        )  # fmt: skip
    images = []
    for side in ("base", "model"):
        with models.as_base() if side == "base" else nullcontext(models.tuned) as pipe:
            images.append(
                generate(
                    pipe,
                    prompts,
                    seed=seed,
                    steps=inference_steps,
                    guidance_scale=guidance_scale,
                    resolution=res,
                    batch_size=batch_size,
                )  # fmt: skip
            )
    base_images, model_images = images
    adapter = models.adapter
    del models, pipe
    gc.collect()  # the pipelines go before the scorers come
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    results = {
        "toy": compare(
            toy_score(base_images, prompts), toy_score(model_images, prompts), seed=seed, confidence=confidence
        )
    }
    for name, path in scorers.items():
        score = load_scorer(name, path, device=device, batch_size=batch_size)
        results[name] = compare(
            score(base_images, prompts), score(model_images, prompts), seed=seed, confidence=confidence
        )
        del score
        gc.collect()
    not_run = {name: "no local path given" for name in SCORERS if name not in scorers}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = min(grid_columns, len(prompts))
    image_grid(base_images[:k], model_images[:k]).save(out / "grid.png")
    evaluation = Evaluation(
        model=model,
        base=base,
        adapter=adapter,
        confidence=confidence,
        pair_metrics=pm,
        prompts=len(prompts),
        seed=seed,
        inference_steps=inference_steps,
        guidance_scale=guidance_scale,
        resolution=res,
        scorers=results,
        not_run=not_run,
        grid=str(out / "grid.png"),
        grid_prompts=prompts[:k],
    )
    tmp = out / "evaluation.json.part"
    tmp.write_text(json.dumps({**evaluation.to_json(), "grid": "grid.png"}, indent=2))
    os.replace(tmp, out / "evaluation.json")
    return evaluation
