"""The served model: an `mlflow.pyfunc` PythonModel around a saved diffusers pipeline. Prompts in, PNGs out.

Logged as MLflow "model from code": MLflow stores this file with the model and runs it at load time, so serving
(`mlflow models serve -m models:/NAME@champion`) needs mlflow, torch, diffusers and pandas, not invdpo. Hence it
imports nothing from this repository.

Input: a DataFrame with a `prompt` column, optional `seed` and `steps` columns (a missing or empty value takes
the default). Output: a DataFrame with an `image` column, base64 PNGs of the trained size:

    curl -X POST http://HOST:PORT/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"prompt": "a red apple", "seed": 1}]}'
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model


def _value(row: pd.Series, column: str, default: int) -> int:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return int(value)


class DiffusionPipelineModel(mlflow.pyfunc.PythonModel):
    """`artifacts["pipeline"]`: a diffusers pipeline directory. model_config: resolution (pixels per side) and
    num_inference_steps (the default denoising steps)."""

    def load_context(self, context: Any) -> None:
        import torch
        from diffusers import DiffusionPipeline

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        config = context.model_config or {}
        default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.resolution = int(config.get("resolution") or default_size)
        self.steps = int(config.get("num_inference_steps") or 25)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        if "prompt" not in model_input.columns:
            raise ValueError("input needs a `prompt` column")
        images = []
        for _, row in model_input.iterrows():
            # One call per row: each prompt gets its own seed and step count.
            generator = torch.Generator().manual_seed(_value(row, "seed", 0))
            image = self.pipe(
                str(row["prompt"]),
                generator=generator,
                num_inference_steps=_value(row, "steps", self.steps),
                height=self.resolution,
                width=self.resolution,
            ).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return pd.DataFrame({"image": images})


set_model(DiffusionPipelineModel())
