"""The evaluation after training: the fine-tuned model against its base (invdpo_core/evaluate.py) on the job's
validation_file and prompts, logged to the job's MLflow run and returned as the job's `evaluation` record, which
the promotion gate (POST /v1/models/{name}/promote) reads.

Runs in the training process, on rank 0, while the job's run is active.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from invdpo_core.config import EvalConfig, TrainingConfig
from services.jobs.logs import mask_secrets
from services.worker.settings import Settings

GRID_ARTIFACT = "evaluation/grid.png"


def evaluate_job(
    config: TrainingConfig, model_path: Path, out_dir: Path, settings: Settings, model_uri: str | None = None
) -> dict[str, Any]:
    """Evaluate the trained model and log eval/... metrics, evaluation/grid.png and evaluation/evaluation.json to the
    active run. Returns {metrics, not_run, grid, error}. An evaluation that fails is recorded (error), not raised:
    the model is trained either way, and the gate finds no metrics to pass on.

    model_uri: where the model will be stored; the logged evaluation.json names it instead of `model_path`, the
    scratch copy that is deleted when the job ends."""
    import mlflow
    import torch

    from invdpo_core.evaluate import DEFAULT_PROMPTS, evaluate

    eval_config = EvalConfig.after_training(
        config,
        default_prompts=DEFAULT_PROMPTS,
        scorers=settings.eval_scorers,
        guidance_scale=settings.eval_guidance_scale,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = evaluate(
            str(model_path), **eval_config.model_dump(), out_dir=out_dir, device=device,
            model_cache_dir=settings.cache_dir,
        )  # fmt: skip
    except Exception as exc:  # out of memory, a scorer that will not load, an unreadable validation file...
        text = mask_secrets(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        return {"metrics": {}, "not_run": {}, "grid": None, "error": text if len(text) <= 300 else text[:297] + "..."}
    metrics = result.metrics()
    report = Path(out_dir) / "evaluation.json"
    if model_uri is not None:
        report.write_text(json.dumps({**json.loads(report.read_text()), "model": model_uri}, indent=2))
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(result.grid, "evaluation")
    mlflow.log_artifact(str(report), "evaluation")
    return {"metrics": metrics, "not_run": result.not_run, "grid": GRID_ARTIFACT, "error": None}


def summary(evaluation: dict[str, Any]) -> str:
    """One line for the job's events."""
    if evaluation["error"]:
        return f"Evaluation failed: {evaluation['error']}"
    m = evaluation["metrics"]
    parts = []
    if "eval/implicit_acc" in m:
        parts.append(
            f"implicit accuracy {m['eval/implicit_acc']:.3f} "
            f"[{m['eval/implicit_acc_lower']:.3f}, {m['eval/implicit_acc_upper']:.3f}]"
        )
    else:
        parts.append("implicit accuracy not measured (no validation_file)")
    scorers = sorted(k.removeprefix("eval/win_rate/") for k in m if k.startswith("eval/win_rate/"))
    parts += [f"{s} win-rate {m[f'eval/win_rate/{s}']:.3f}" for s in scorers]
    if evaluation["not_run"]:
        parts.append(f"not run: {', '.join(evaluation['not_run'])}")
    return "Evaluated against the base: " + "; ".join(parts)
