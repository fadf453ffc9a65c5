"""Settings of the model server, read from the environment, behind a cached `get_settings()`.

Its own knobs are prefixed INVDPO_SERVING_; the job database, the MLflow server and the promotion gate are the
control plane's (INVDPO_DATABASE_URL, INVDPO_MLFLOW_TRACKING_URI, INVDPO_PROMOTION_GATE), so one set of variables
configures both.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from invdpo_core.gate import GateRule, parse_gate_setting

# A registered model name as the control plane accepts it, optionally @alias.
_MODEL_REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:@([A-Za-z0-9_-]+))?$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INVDPO_SERVING_", extra="ignore", populate_by_name=True)

    models: str = Field(
        description="Comma-separated registered models to serve, each NAME or NAME@ALIAS (alias defaults to "
        "default_alias): `cats, dogs@staging` serves models:/cats@champion and models:/dogs@staging."
    )
    default_alias: str = Field("champion", description="The alias followed when a model names none.")
    database_url: str = Field(
        "sqlite:///./invdpo.db",
        validation_alias="INVDPO_DATABASE_URL",
        description="The control plane's job database: API keys, projects, and the jobs behind model versions.",
    )
    mlflow_tracking_uri: str = Field(
        "sqlite:///./mlflow.db",
        validation_alias="INVDPO_MLFLOW_TRACKING_URI",
        description="The MLflow server whose registry holds the models.",
    )
    promotion_gate: str = Field(
        '{"min_implicit_acc_lower": 0.5}',
        validation_alias="INVDPO_PROMOTION_GATE",
        description="The API's promotion gate (JSON GateRule, or none): a version the alias points at is served only "
        "if its job's evaluation passes it, or its promotion was forced. Set it as the API's.",
    )
    poll_seconds: float = Field(10.0, gt=0, description="How often each model's alias is looked up in MLflow.")
    max_batch_size: int = Field(8, ge=1, description="Most images one pipeline call generates; 1 turns batching off.")
    max_wait_ms: float = Field(
        20.0, ge=0, description="How long the first waiting request waits for others to share its pipeline call."
    )
    max_queue: int = Field(64, ge=1, description="Requests waiting per model; one more is answered 429.")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After sent with a 429 (queue full) or 503.")
    request_timeout_seconds: float = Field(
        120.0, gt=0, description="A request not answered within this (queueing included) gets a 504."
    )
    max_images_per_request: int = Field(4, ge=1, description="Largest `n`; at most max_batch_size.")
    max_prompt_chars: int = Field(1000, ge=1, description="Longest accepted prompt, in characters.")
    max_steps: int = Field(100, ge=1, description="Largest `steps` (denoising steps) a request may ask for.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU if there is one.")
    cache_dir: str = Field(
        "~/.cache/invdpo/serving", description="Where model versions are downloaded before they are loaded."
    )
    host: str = Field("0.0.0.0", description="Address `python -m services.serving` listens on.")
    port: int = Field(8080, ge=1, le=65535, description="Port `python -m services.serving` listens on.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of the JSON logs.")

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        refs = [ref.strip() for ref in value.split(",") if ref.strip()]
        if not refs:
            raise ValueError("name at least one registered model")
        for ref in refs:
            if not _MODEL_REF.match(ref):
                raise ValueError(f"{ref!r} is not NAME or NAME@ALIAS")
        names = [ref.split("@")[0] for ref in refs]
        if len(set(names)) != len(names):
            raise ValueError("a model is listed twice")
        return value

    @field_validator("promotion_gate")
    @classmethod
    def _check_gate(cls, value: str) -> str:
        parse_gate_setting(value)
        return value

    @model_validator(mode="after")
    def _n_fits_a_batch(self) -> Settings:
        if self.max_images_per_request > self.max_batch_size:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must be at most max_batch_size "
                f"({self.max_batch_size}): a request's images are generated in one call"
            )
        return self

    def gate_rule(self) -> GateRule | None:
        """The promotion gate's rule, or None when it is off."""
        return parse_gate_setting(self.promotion_gate)

    def model_refs(self) -> dict[str, str]:
        """{registered model name: alias followed}, in the order listed."""
        refs = {}
        for ref in self.models.split(","):
            match = _MODEL_REF.match(ref.strip())
            if match:
                refs[match.group(1)] = match.group(2) or self.default_alias
        return refs


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # `models` comes from the environment
