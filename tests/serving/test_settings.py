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
