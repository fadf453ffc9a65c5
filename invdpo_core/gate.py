"""The promotion gate: may a fine-tuned model replace the `champion`? A rule over the evaluation's flat metrics.

Imports no torch, so the API decides without a GPU image. The metrics are `Evaluation.metrics()` (evaluate.py),
as logged to MLflow and recorded on the job. A check whose metric is missing (no evaluation, or the scorer was not
run) fails: an absent measurement is never evidence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from invdpo_core.config import ConfigError


class GateRule(BaseModel):
    """Every check that is set must pass. The default: implicit accuracy on held-out pairs credibly above chance."""

    model_config = ConfigDict(extra="forbid")

    min_implicit_acc_lower: float | None = Field(
        0.5,
        ge=0,
        le=1,
        description="Pass only if the lower end of the implicit accuracy's bootstrap interval is above this "
        "(so the accuracy itself is too); null skips the check.",
    )
    win_rate_scorer: str | None = Field(
        None, description="Scorer whose win-rate against the base is checked (toy, pickscore, ...); null skips it."
    )
    min_win_rate: float = Field(0.5, ge=0, le=1, description="With win_rate_scorer: the win-rate must be above this.")

    @model_validator(mode="after")
    def _some_check(self) -> GateRule:
        if self.min_implicit_acc_lower is None and self.win_rate_scorer is None:
            raise ValueError("the rule checks nothing: set min_implicit_acc_lower and/or win_rate_scorer")
        return self


def parse_gate_rule(data: Mapping[str, Any]) -> GateRule:
    """Validate a dict into a GateRule, raising ConfigError that names each bad field and value."""
    try:
        return GateRule.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(
            [
                {"field": ".".join(str(p) for p in e["loc"]) or "gate", "message": e["msg"], "value": e.get("input")}
                for e in exc.errors()
            ]
        ) from None


def parse_gate_setting(value: str) -> GateRule | None:
    """The rule of an INVDPO_PROMOTION_GATE value (a JSON object, or none: the gate is off; None).

    A JSONDecodeError is a ValueError, so a pydantic validator calling this reports it against its field."""
    if value.strip().lower() == "none":
        return None
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object or none")
    return parse_gate_rule(data)


def evaluate_gate(metrics: Mapping[str, float], rule: GateRule) -> tuple[bool, list[str]]:
    """(passed, reasons): one reason per check, saying what was measured against what."""
    checks: list[tuple[str, float]] = []  # (metric, threshold it must exceed)
    if rule.min_implicit_acc_lower is not None:
        checks.append(("eval/implicit_acc_lower", rule.min_implicit_acc_lower))
    if rule.win_rate_scorer is not None:
        checks.append((f"eval/win_rate/{rule.win_rate_scorer}", rule.min_win_rate))
    passed, reasons = True, []
    for name, threshold in checks:
        value = metrics.get(name)
        if value is None:
            passed = False
            reasons.append(f"{name} missing (not evaluated or scorer not run); must be > {threshold:g}")
        elif value > threshold:
            reasons.append(f"{name} {value:.4g} > {threshold:g}")
        else:
            passed = False
            reasons.append(f"{name} {value:.4g} <= {threshold:g}")
    return passed, reasons
