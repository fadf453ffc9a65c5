"""Request and response bodies, one family per resource, shaped like the fine-tuning job APIs users know."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model
from pydantic.json_schema import SkipJsonSchema

from invdpo_core.config import RESERVED_FIELDS, TrainingConfig, set_by
from invdpo_core.config import Method as MethodType
from services.jobs.logs import has_credentials
from services.jobs.models import JobStatus

MAX_RUNTIME_SECONDS = 30 * 24 * 3600
# No NUL characters anywhere: PostgreSQL text and JSONB cannot store them.
_NO_NUL = r"^[^\x00]*$"


def _no_embedded_credentials(uri: str) -> str:
    if has_credentials(uri):
        raise ValueError("credentials must not be embedded in the URI; workers use their own")
    return uri


Uri = Annotated[
    str,
    StringConstraints(min_length=1, max_length=2048, pattern=r"^[^\x00\s][^\x00]*$"),
    AfterValidator(_no_embedded_credentials),
]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=_NO_NUL)]
MetadataValue = Annotated[str, StringConstraints(max_length=512, pattern=_NO_NUL)]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    Field(max_length=16, description="Up to 16 key-value pairs; keys up to 64 characters, values up to 512."),
]


class ErrorDetail(BaseModel):
    """Body of every 4xx answer except 422: a short fixed string."""

    detail: str


# Every route with a JSON body: services/api/middleware.py JsonBodyMiddleware answers these before the route runs.
BAD_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The body is not UTF-8, or nests deeper than 32 levels."}
}


# ---- jobs ----


class _FiniteTrainingConfig(TrainingConfig):
    # The config is stored as JSON, which has no NaN or Infinity.
    model_config = ConfigDict(allow_inf_nan=False)


def _not_here(field: str) -> AfterValidator:
    def reject(value: Any) -> Any:
        raise ValueError(f"not allowed here: {set_by(field)}")

    return AfterValidator(reject)


# TrainingConfig minus its reserved fields (set from the job's own fields or by the worker): OpenAPI shows every
# hyperparameter with its bounds, and a value for a reserved field is a 422 saying where it goes instead.
if TYPE_CHECKING:  # mypy cannot follow create_model

    class Hyperparameters(BaseModel): ...

else:
    Hyperparameters = create_model(
        "Hyperparameters",
        __base__=_FiniteTrainingConfig,
        __doc__="The TrainingConfig fields a job may set (invdpo_core/config.py); the rest keep their defaults.",
        **{name: (SkipJsonSchema[Annotated[Any, _not_here(name)]], None) for name in RESERVED_FIELDS},
    )


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MethodType = Field(description="inversion_dpo, diffusion_dpo or inpo (docs/method.md).")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training settings; unknown keys are rejected."
    )


class JobResources(BaseModel):
    """What one job runs on. One node (the default) trains on the claiming worker's own GPUs, as ever; more run as
    a Kubeflow Trainer TrainJob of `nodes` pods with `gpus_per_node` GPUs each (docs/deploy.md)."""

    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(
        1, ge=1, le=64, description="Training nodes; at most the deployment's max_nodes_per_job (1 unless enabled)."
    )
    gpus_per_node: int = Field(
        1,
        ge=1,
        le=16,
        description="GPUs (and training processes) per node of a multi-node job; a one-node job "
        "uses the worker's GPUs.",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Uri = Field(description="Base diffusers pipeline: a hub id, a directory or an s3:// prefix.")
    training_file: Uri = Field(description="Preference pairs: a Pick-a-Pic parquet file/prefix or a JSONL manifest.")
    validation_file: Uri | None = Field(None, description="Held-out preference pairs.")
    method: MethodSpec
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Training seed; chosen at random if omitted.")
    suffix: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$", description="Added to the model name."
    )
    registered_model_name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="MLflow registered model the result is registered under.",
    )
    metadata: Metadata | None = None
    resources: JobResources | None = Field(None, description="Nodes and GPUs per node; omitted: one node.")
    max_runtime_seconds: int | None = Field(
        None,
        ge=1,
        le=MAX_RUNTIME_SECONDS,
        description="How long the job may run, over all its attempts (at most 30 days); after it the job "
        "checkpoints and ends failed as runtime_limit. Omitted: the deployment's INVDPO_MAX_RUNTIME_SECONDS "
        "(7 days by default). nodes x gpus_per_node x max_runtime_seconds counts against the project's GPU-hours.",
    )


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Method(BaseModel):
    type: MethodType
    hyperparameters: dict[str, Any] = Field(description="The resolved hyperparameters, defaults included.")


class JobEvaluation(BaseModel):
    """The fine-tuned model against its base, measured by the worker after training (invdpo_core/evaluate.py)."""

    metrics: dict[str, float] = Field(
        description="eval/implicit_acc[_lower|_upper] and eval/reward_margin[...] on the validation_file; "
        "eval/win_rate[_lower|_upper]/SCORER and eval/score_base|score_model/SCORER on the prompts."
    )
    not_run: dict[str, str] = Field(description="Scorers that did not run, and why: never a number for them.")
    grid: str | None = Field(description="MLflow artifact of the run: base row on top, fine-tuned row below.")
    error: str | None = Field(None, description="Why the evaluation failed, if it did (the model is kept).")


class Job(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    status: JobStatus
    model: str
    training_file: str
    validation_file: str | None
    method: Method
    seed: int
    suffix: str | None
    registered_model_name: str | None
    metadata: dict[str, str] | None
    created_at: int = Field(description="Unix seconds.")
    started_at: int | None
    finished_at: int | None
    estimated_finish: int | None
    step: int | None
    total_steps: int | None
    mlflow_run_id: str | None
    registered_model_version: str | None
    fine_tuned_model: str | None
    evaluation: JobEvaluation | None = Field(None, description="Set once the job succeeded and was evaluated.")
    error: JobError | None
    resources: JobResources | None = Field(None, description="As requested; null: one node.")
    max_runtime_seconds: int | None = Field(None, description="How long the job may run, all attempts together.")
    runtime_seconds: float = Field(0.0, description="How long it has run so far, all attempts together.")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


# ---- job events ----


class JobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    type: Literal["message", "metrics"]
    message: str
    data: dict[str, Any] | None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


# ---- checkpoints ----


class JobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    fine_tuning_job_id: str
    created_at: int
    step_number: int
    uri: str
    metrics: dict[str, Any]


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool


# ---- health ----


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"] | None = None
    broker: Literal["ok", "unavailable"] | None = None
