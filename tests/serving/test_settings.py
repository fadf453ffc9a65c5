"""The model server's settings: the model list and the limits that must agree."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.serving.settings import Settings


def test_models_are_names_with_an_optional_alias() -> None:
    settings = Settings(models=" cats, dogs@staging ,", default_alias="prod")
    assert settings.model_refs() == {"cats": "prod", "dogs": "staging"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"models": " , "}, "name at least one registered model"),
        ({"models": "cats@"}, "'cats@' is not NAME or NAME@ALIAS"),
        ({"models": "cats,cats@staging"}, "a model is listed twice"),
        ({"models": "cats", "max_batch_size": 2, "max_images_per_request": 4}, "must be at most max_batch_size"),
        ({"models": "cats", "max_batch_size": 0}, "max_batch_size"),
    ],
)
def test_bad_settings_name_the_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_the_promotion_gate_is_the_apis_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server checks versions against the rule the API promotes with: the same INVDPO_PROMOTION_GATE."""
    from services.api.settings import Settings as ApiSettings

    monkeypatch.setenv("INVDPO_PROMOTION_GATE", '{"min_implicit_acc_lower": null, "win_rate_scorer": "toy"}')
    rule = Settings(models="cats").gate_rule()
    assert rule is not None and rule.win_rate_scorer == "toy" and rule.min_implicit_acc_lower is None
    assert rule == ApiSettings().gate_rule()
    monkeypatch.setenv("INVDPO_PROMOTION_GATE", "none")
    assert Settings(models="cats").gate_rule() is None
    monkeypatch.setenv("INVDPO_PROMOTION_GATE", '{"min_win_rate": 2}')
    with pytest.raises(ValidationError, match="INVDPO_PROMOTION_GATE"):
        Settings(models="cats")
