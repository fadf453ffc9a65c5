"""Training configuration: pydantic models that import no torch, so the API can validate a job without a GPU image.

Every field says what it is. An invalid value raises `ConfigError` naming the field and the value. The roles a
field plays beyond training (`role(...)` in its json_schema_extra, read with `fields_with(ROLE)`) are listed here
once; the API's request schema, the worker, the tracking and the resume check derive their lists from them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

Method = Literal["inversion_dpo", "diffusion_dpo", "inpo"]
InversionTarget = Literal["paired", "x0", "step", "reference"]
LossType = Literal["sigmoid", "hinge", "ipo"]
# Statuses a job moves through (services/jobs/jobstore.py), here so the CLI client needs no database library.
# Active ones count against the project's limits; a paused job holds no worker and counts again once resumed.
ActiveStatus = Literal["validating_files", "queued", "running", "cancel_requested", "pause_requested"]
TerminalStatus = Literal["succeeded", "failed", "cancelled"]
JobStatus = Literal[ActiveStatus, "paused", TerminalStatus]
ACTIVE_STATUSES: tuple[str, ...] = get_args(ActiveStatus)
TERMINAL_STATUSES: tuple[str, ...] = get_args(TerminalStatus)
STATUSES = (*ACTIVE_STATUSES, "paused", *TERMINAL_STATUSES)

# Roles of a TrainingConfig field outside the training itself:
#   reserved   set by the service from the job's own fields (or by the worker), never in a job's hyperparameters;
#              `set_by` says where it comes from instead
#   resumable  a resumed run may change it (how long, how often, where); any other change from the checkpoint's
#              config is an error, or the resumed run would not continue the run that wrote it
#   cache_key  an inversion cache entry depends on it (the disk cache directory is named by their hash)
#   local      where this worker puts things, not the training: not logged as a run parameter (it differs between
#              the workers a job runs on, and MLflow refuses to change a logged param)
Role = Literal["reserved", "resumable", "cache_key", "local"]

# Upper bounds: every number a job may set has one, so the API refuses (422) what no worker could run instead of a
# worker crashing, running out of memory or training for ever on it. Each is generous against the recipes it cites.
MAX_STEPS = 1_000_000  # optimizer steps; Diffusion-DPO's SD1.5 and SDXL runs take 2,000 (of 2,048 pairs each)
# The DDIM grid's top label is (N - 1) * (T // N) + steps_offset, which must stay below the model's T = 1,000 training
# timesteps (SD 1.x/2.x/XL) with steps_offset 1: N = 1,000 reaches label 1,000 and indexes past the schedule. The
# model's own scheduler is checked too when the job's files are (schedule_problem).
MAX_INVERSION_STEPS = 999
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


def role(*roles: Role, set_by: str | None = None) -> dict[str, Any]:
    """json_schema_extra of a field with these roles (and, for a reserved field, where it is set instead)."""
    extra: dict[str, Any] = {"roles": list(roles)}
    if set_by is not None:
        extra["set_by"] = set_by
    return extra


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field path and the bad value."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        lines = [f"{e['field']}: {e['message']} (got {e['value']!r})" for e in errors]
        super().__init__("; ".join(lines))


class _Strict(BaseModel):
    # Unknown keys are an error: a misspelled hyperparameter must not be silently ignored. strict: no coercion, so
    # "yes" is not true, true is not 1 and "5" is not 5 (ints are still accepted where a float is expected).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's exponent floats: `1e-5` is a number, as its writer means (YAML 1.1,
    and so PyYAML, reads it as a string, which the strict config would refuse)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),  # the exponent forms 1.1 lacks
    list("-+0123456789."),
)


class AdapterConfig(_Strict):
    type: Literal["full", "lora"] = Field("full", description="Fine-tune every UNet weight, or a LoRA adapter.")
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank (adapter=lora), at most 1024.")
    alpha: float = Field(
        8.0,
        gt=0,
        le=4096,
        description="LoRA alpha, at most 4096 (4x the largest rank); the update is scaled by alpha / rank.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="Names of the UNet linear layers that get a LoRA adapter.",
    )


class TrainingConfig(_Strict):
    """One fine-tuning run. Defaults follow the method study in docs/method.md."""

    # --- what to train on ---
    base_model: str = Field(
        ...,
        min_length=1,
        description="Base diffusers pipeline: a local directory, a hub id, or an s3:// prefix.",
        json_schema_extra=role("reserved", "cache_key", set_by="set it with the top-level `model`"),
    )
    dataset: str = Field(
        ...,
        min_length=1,
        description="Preference pairs: a Pick-a-Pic parquet file/prefix or a JSONL manifest, local or s3://.",
        json_schema_extra=role("reserved", set_by="set it with the top-level `training_file`"),
    )
    validation_dataset: str | None = Field(
        None,
        description="Held-out preference pairs for evaluation.",
        json_schema_extra=role("reserved", set_by="set it with the top-level `validation_file`"),
    )

    # --- the method ---
    method: Method = Field(
        "inversion_dpo",
        description="inversion_dpo (cached DDIM-inverted points), diffusion_dpo, or inpo (InPO: on-policy partial "
        "stochastic inversion every step; docs/method.md section 'InPO').",
        json_schema_extra=role("reserved", set_by="set it with `method.type`"),
    )
    inversion_target: InversionTarget = Field(
        "paired",
        description="Noise target for inversion_dpo (docs/method.md section 'Targets').",
        json_schema_extra=role("cache_key"),
    )
    beta: float = Field(
        5000.0,
        gt=0,
        le=1e6,
        description="DPO temperature on the per-pixel MSE differences, at most 1e6 (the published recipes use "
        "2,000-5,000).",
    )
    loss_type: LossType = Field("sigmoid", description="sigmoid (DPO), hinge, or ipo.")
    timestep_weighting: Literal["uniform", "inverse_alpha"] = Field(
        "uniform", description="Per-timestep weight; inverse_alpha is the released code's 1/(2 abar_t)."
    )
    inversion_steps: int = Field(
        20,
        ge=1,
        le=MAX_INVERSION_STEPS,
        description="Number N of DDIM inversion steps, at most 999: the grid's top timestep must lie inside the "
        "model's 1,000 training timesteps (checked against the model's own scheduler too).",
        json_schema_extra=role("cache_key"),
    )
    timesteps_per_step: int = Field(
        1,
        ge=0,
        le=MAX_INVERSION_STEPS,
        description="K inverted points sampled per pair per step among the pair's kept ones, at most inversion_steps "
        "and inversion_points_per_pair; 0 means all kept points (two-pass gradient).",
    )
    inversion_guidance: float = Field(
        1.0,
        ge=0,
        le=30,
        description="Classifier-free guidance during inversion, at most 30; 1.0 is plain conditional inversion.",
        json_schema_extra=role("cache_key"),
    )
    inversion_cache: Literal["memory", "disk", "none"] = Field(
        "memory",
        description="Where the per-pair reference trajectory lives; none recomputes it every step.",
        json_schema_extra=role("resumable"),
    )
    inversion_cache_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp16",
        description="Storage dtype of the latents a cache entry holds (the reference errors stay float32); "
        "tests/core/test_inversion_cache.py bounds the loss change of each against fp32.",
        json_schema_extra=role("cache_key"),
    )
    inversion_points_per_pair: int = Field(
        4,
        ge=0,
        le=MAX_INVERSION_STEPS,
        description="M inverted points a pair keeps in the cache, drawn once per pair from the seed and the pair's "
        "key; each step samples timesteps_per_step of them. 0 (or M >= inversion_steps) keeps all inversion_steps.",
        json_schema_extra=role("cache_key"),
    )
    inversion_cache_dir: str | None = Field(
        None,
        description="Where inversion_cache: disk keeps its entries: a local directory or an s3:// prefix every "
        "process and node can read; an entry's key is its whole identity, so runs may share it. none: "
        "output_dir/cache.",
        json_schema_extra=role("reserved", "resumable", "local", set_by="a trainer setting, not a job's"),
    )
    empty_prompt_share: float = Field(
        0.2, ge=0, le=1, description="Share of captions replaced by ''.", json_schema_extra=role("cache_key")
    )
    # InPO (method: inpo). Defaults: the released scripts (examples/sd15.sh, sdxl.sh and train.py of JaydenLyh/InPO).
    # A step costs about N + 4 UNet forwards per pair plus 2 backwards (docs/method.md, 'InPO').
    inpo_inversion_steps: int = Field(
        10,
        ge=1,
        le=1000,
        description="InPO: steps N of the inverse DDIM grid, at most the model's 1,000 training timesteps; each "
        "image is inverted through the grid steps below its pair's sampled timestep (N/2 of them on average).",
    )
    inpo_eta: float = Field(
        0.1,
        ge=0,
        le=1,
        description="InPO: random term added after each inversion step, in units of the DDIM step's standard "
        "deviation; 0 makes the inversion deterministic.",
    )
    inpo_inverter: Literal["policy", "reference"] = Field(
        "policy", description="InPO: which UNet inverts the images every step, the current policy or the reference."
    )
    tie_policy: Literal["drop", "keep"] = Field("drop", description="Pick-a-Pic ties (label 0.5): drop or keep.")
    max_bad_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of the dataset's records whose images may be unreadable (corrupt, truncated, missing, "
        "too large), at most 1: those pairs are skipped and counted (metric skipped_pairs, an event); past it the "
        "run fails as too_many_bad_images.",
    )

    # --- optimisation ---
    learning_rate: float = Field(1e-5, gt=0, le=1, description="Peak learning rate, at most 1.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps, at most 1,000,000.")
    optimizer: Literal["adamw", "adafactor"] = Field("adamw", description="AdamW (SD1.5) or Adafactor (SDXL).")
    use_8bit_adam: bool = Field(
        False,
        description="optimizer adamw only: bitsandbytes' AdamW8bit (8-bit optimizer states, a quarter of AdamW's "
        "memory); needs bitsandbytes on the worker.",
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay, at most 1.")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the trained weights (diffusers' EMAModel: its decay "
        "after n steps is min(ema_decay, (1 + n) / (10 + n))) and save it as the model; none: off.",
    )
    max_steps: int = Field(
        1000,
        ge=1,
        le=MAX_STEPS,
        description="Optimizer steps to train, at most 1,000,000 (the job's max_runtime_seconds bounds the time).",
        json_schema_extra=role("resumable"),
    )
    batch_size: int = Field(
        1,
        ge=1,
        le=256,
        description="Preference pairs per process per micro-batch, at most 256 (512 images: more than any GPU "
        "holds); larger batches come from gradient_accumulation_steps and more GPUs.",
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=4096,
        description="Micro-batches per optimizer step, at most 4,096 (Diffusion-DPO's 2,048-pair step on one GPU "
        "needs 2,048).",
    )
    max_grad_norm: float = Field(
        1.0, ge=0, le=1e6, description="Gradient clipping norm, at most 1e6; 0 disables clipping."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast precision.", json_schema_extra=role("cache_key")
    )
    gradient_checkpointing: bool = Field(False, description="Trade UNet compute for activation memory.")
    cache_text_embeddings: bool = Field(
        False,
        description="Run the text encoders once per distinct caption and keep the embeddings in host memory "
        "(about 0.25 MB per caption for SD1.5 and 0.6 MB for SDXL in float32, half that in bf16/fp16).",
    )
    cache_latents: bool = Field(
        False,
        description="diffusion_dpo and inpo: run the VAE once per distinct image (its posterior mean, keyed by the "
        "image bytes' sha256, the VAE weights and the resolution) and keep the latents in host memory, up to half "
        "the RAM shared by the machine's processes (about 64 KiB per image for SD1.5 at 512 px, 256 KiB for SDXL "
        "at 1024 px, float32); inversion_dpo's cache holds its latents already.",
    )
    adapter: AdapterConfig = Field(default_factory=lambda: AdapterConfig(), description="Full fine-tune or LoRA.")
    resolution: int | None = Field(
        None,
        ge=8,
        le=2048,
        description="Training and evaluation image side in pixels (multiple of 8), at most 2,048 (twice SDXL's "
        "1,024; 4,096 got the trainer killed for memory); none: the model's own (UNet sample_size x VAE scale "
        "factor: 512 for SD1.5, 768 for SD2.x-768, 1024 for SDXL).",
        json_schema_extra=role("cache_key"),
    )
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed for data order, noise and initialisation, below 2^32.",
        json_schema_extra=role("reserved", "cache_key", set_by="set it with the top-level `seed`"),
    )

    # --- checkpoints, validation, output ---
    checkpoint_interval: int = Field(
        500,
        ge=1,
        le=MAX_STEPS,
        description="Save a resumable checkpoint every this many steps, at most 1,000,000.",
        json_schema_extra=role("resumable"),
    )
    checkpoints_to_keep: int = Field(
        2,
        ge=1,
        le=100,
        description="Keep only the newest this many checkpoints, at most 100: locally, and a job's in the object "
        "store too (never its final model).",
        json_schema_extra=role("resumable"),
    )
    validation_prompts: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Prompts for sample grids, at most 64.",
        json_schema_extra=role("resumable"),
    )
    validation_interval: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="Sample grids every this many steps, at most 1,000,000; 0 disables.",
        json_schema_extra=role("resumable"),
    )
    validation_inference_steps: int = Field(
        25,
        ge=1,
        le=500,
        description="Denoising steps for the validation samples, at most 500.",
        json_schema_extra=role("resumable"),
    )
    output_dir: str = Field(
        "runs/invdpo",
        min_length=1,
        description="Where checkpoints and the model go.",
        json_schema_extra=role("reserved", "resumable", "local", set_by="chosen by the worker"),
    )
    resume: bool = Field(
        True,
        description="Continue from the newest complete checkpoint in output_dir/checkpoints (false: start at step 0 "
        "and delete the checkpoints there).",
        json_schema_extra=role("resumable", "local"),
    )

    @property
    def inversion_grid_steps(self) -> int | None:
        """Steps of the inverse DDIM grid the method walks (inversion_steps, inpo_inversion_steps), None for
        diffusion_dpo, which inverts nothing: what schedule_problem checks against the model's scheduler."""
        return {"inversion_dpo": self.inversion_steps, "inpo": self.inpo_inversion_steps}.get(self.method)

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainingConfig:
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise ValueError(f"use_8bit_adam needs optimizer adamw, got optimizer {self.optimizer}")
        if self.timesteps_per_step > self.inversion_steps:
            raise ValueError(
                f"timesteps_per_step ({self.timesteps_per_step}) cannot exceed inversion_steps "
                f"({self.inversion_steps})"
            )
        if self.inversion_points_per_pair and self.timesteps_per_step > self.inversion_points_per_pair:
            raise ValueError(
                f"timesteps_per_step ({self.timesteps_per_step}) cannot exceed inversion_points_per_pair "
                f"({self.inversion_points_per_pair})"
            )
        return self


class EvalConfig(_Strict):
    """The evaluation of a fine-tuned model against its base (invdpo_core/evaluate.py `evaluate`, whose keyword
    arguments these fields are)."""

    base: str = Field(..., min_length=1, description="The base pipeline the model is compared with.")
    pairs: str | None = Field(None, description="Held-out preference pairs for the reward-free metrics; none: skip.")
    prompts: list[str] = Field(..., min_length=1, description="Prompts both models draw images for.")
    scorers: dict[str, str] = Field(default_factory=dict, description="Scorer name -> local directory of its model.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the drawn noise, the same for both models.")
    beta: float = Field(5000.0, gt=0, le=1e6, description="DPO temperature of the implicit reward margin.")
    inference_steps: int = Field(25, ge=1, le=500, description="Denoising steps of each image.")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance of each image.")
    resolution: int | None = Field(None, ge=8, le=2048, description="Image side in pixels; none: the base UNet's own.")

    @classmethod
    def after_training(
        cls, config: TrainingConfig, *, default_prompts: Sequence[str], scorers: dict[str, str], guidance_scale: float
    ) -> EvalConfig:
        """The evaluation of the model `config` trained: its base, validation set and prompts, seed, beta, steps
        and resolution; `default_prompts` when it names none."""
        return cls(
            base=config.base_model,
            pairs=config.validation_dataset,
            prompts=list(config.validation_prompts or default_prompts),
            scorers=scorers,
            seed=config.seed,
            beta=config.beta,
            inference_steps=config.validation_inference_steps,
            guidance_scale=guidance_scale,
            resolution=config.resolution,
        )


SPACINGS = ("leading", "trailing", "linspace")  # what diffusers' DDIM schedulers, hence SD-family checkpoints, use
PREDICTIONS = ("epsilon", "v_prediction")
# Schedulers of another noise process (EDM sigmas, flow matching): no method here trains their models.
NOT_DDPM = ("EDM", "CosineDPMSolver", "FlowMatch", "FlowMap")


def scheduler_as_written(config: Any, class_name: str | None = None) -> dict[str, Any]:
    """A loaded diffusers scheduler config as its scheduler_config.json says it: without the keys diffusers filled
    in from the loaded class's defaults (listed in `_use_default_values`), which DDIMScheduler.from_config drops too
    when the inversion grid is built. A missing timestep_spacing thus reads as leading everywhere (an
    EulerDiscreteScheduler's own default would be linspace). class_name: the loaded scheduler's class, which an
    in-memory config does not hold."""
    defaults = set(config.get("_use_default_values", []))
    written = {k: v for k, v in dict(config).items() if k not in defaults and k != "_use_default_values"}
    return written | ({"_class_name": class_name} if class_name else {})


def schedule_problem(scheduler: dict[str, Any], method: str, inversion_steps: int | None = None) -> str | None:
    """Why `method` cannot train a model with this scheduler config (scheduler/scheduler_config.json), naming the
    field, or None. Every method takes epsilon and v-prediction models; the inversion methods (inversion.py) walk
    the model's DDIM grid under its own spacing, which must fit the model's training timesteps
    (inversion_steps, or inpo_inversion_steps for inpo)."""
    prediction = scheduler.get("prediction_type", "epsilon")
    spacing = scheduler.get("timestep_spacing", "leading")
    family = str(scheduler.get("_class_name", ""))
    if family.startswith(NOT_DDPM):
        return f"scheduler._class_name: {family!r} is not supported (a DDPM-family scheduler: DDIM, PNDM, Euler, ...)"
    if prediction not in PREDICTIONS:
        return f"scheduler.prediction_type: {prediction!r} is not supported (epsilon or v_prediction)"
    if method == "diffusion_dpo":  # forward noising only: any spacing
        return None
    if spacing not in SPACINGS:
        return f"scheduler.timestep_spacing: {spacing!r} is not supported by method {method} ({', '.join(SPACINGS)})"
    if scheduler.get("rescale_betas_zero_snr"):
        # The top of a trailing or linspace grid has abar = 0: no signal, so neither the inverted point's clean
        # latent nor a v target can be recovered from it.
        return (
            f"scheduler.rescale_betas_zero_snr: true is not supported by method {method} "
            "(the last timestep has no signal)"
        )
    if inversion_steps is not None:
        field = "inpo_inversion_steps" if method == "inpo" else "inversion_steps"
        return _grid_problem(scheduler, field, inversion_steps, spacing, partial=method == "inpo")
    return None


def _grid_problem(scheduler: dict[str, Any], field: str, steps: int, spacing: str, *, partial: bool) -> str | None:
    """Why an inverse DDIM grid of `steps` steps does not fit the model's training timesteps, or None. Leading
    spacing labels step k (k = 0..N-1) with k * (T // N) + steps_offset (diffusers' DDIM schedulers); trailing and
    linspace end at T - 1. InPO's partial inversion stops below a timestep drawn under T, so its top label may be T."""
    total = int(scheduler.get("num_train_timesteps", 1000))
    offset = int(scheduler.get("steps_offset", 0)) if spacing == "leading" else 0
    if steps > total:
        return f"{field}: {steps} steps exceed this model's {total} training timesteps"
    limit = total if partial else total - 1  # the highest label the grid may reach

    def top(n: int) -> int:
        return (n - 1) * (total // n) + offset if spacing == "leading" else total - 1

    if top(steps) <= limit:
        return None
    most = max((n for n in range(1, total + 1) if top(n) <= limit), default=0)
    return (
        f"{field}: {steps} steps reach timestep {top(steps)}, past this model's {total} training timesteps "
        f"(steps_offset {offset}); at most {most}"
    )


def fields_with(name: Role) -> tuple[str, ...]:
    """The TrainingConfig fields that play role `name`, in declaration order."""
    return tuple(field for field, info in TrainingConfig.model_fields.items() if name in _roles(info))


def _roles(info: FieldInfo) -> list[str]:
    extra = info.json_schema_extra
    return list(extra.get("roles", [])) if isinstance(extra, dict) else []  # type: ignore[arg-type]


def set_by(field: str) -> str:
    """Where a reserved field is set instead of a job's hyperparameters."""
    extra = TrainingConfig.model_fields[field].json_schema_extra
    return str(extra["set_by"]) if isinstance(extra, dict) and "set_by" in extra else "set by the service"


RESERVED_FIELDS = fields_with("reserved")
RESUMABLE_FIELDS = frozenset(fields_with("resumable"))
CACHE_KEY_FIELDS = fields_with("cache_key")
LOCAL_FIELDS = frozenset(fields_with("local"))


def did_you_mean(loc: Sequence[str | int]) -> str | None:
    """For an unknown TrainingConfig key at `loc` (e.g. ("adapter", "rnak")): the closest real field, if any."""
    model: type[BaseModel] = TrainingConfig
    for part in loc[:-1]:  # walk down the nested sections (adapter, ...)
        info = model.model_fields.get(str(part))
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        message = e["msg"]
        if e["type"] == "extra_forbidden" and (guess := did_you_mean(e["loc"])):
            message += f" (did you mean {guess!r}?)"
        out.append({"field": field, "message": message, "value": e.get("input")})
    return out


def parse_config(data: dict[str, Any]) -> TrainingConfig:
    """Validate a dict into a TrainingConfig, raising ConfigError that names each bad field and value."""
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_errors(exc)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides (dotted keys for nested fields); values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([{"field": item, "message": "override must look like key=value", "value": item}])
        key, raw = item.split("=", 1)
        value = yaml.load(raw, Loader=_Yaml12Loader) if raw else ""
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([{"field": key, "message": f"{p} is not a section", "value": raw}])
        node[leaf] = value
    return data


def _file_error(path: str | Path, message: str) -> ConfigError:
    return ConfigError([{"field": "config", "message": message, "value": str(path)}])


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read a YAML config file (or start empty), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_Yaml12Loader)
        except OSError as exc:
            raise _file_error(path, f"cannot read file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise _file_error(path, f"invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise _file_error(path, "top level must be a mapping")
        data = loaded or {}
    return parse_config(apply_overrides(data, list(overrides)))
