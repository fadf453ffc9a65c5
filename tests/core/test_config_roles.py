"""Field roles are metadata on TrainingConfig: every list of fields elsewhere derives from them."""

from __future__ import annotations

from invdpo_core import config, train


def test_roles_give_the_lists_the_trainer_uses() -> None:
    assert config.RESUMABLE_FIELDS == set(train.RESUMABLE_CHANGES)
    assert set(config.CACHE_KEY_FIELDS) == set(train.CACHE_KEYS)


def test_reserved_fields_say_where_they_are_set() -> None:
    assert config.RESERVED_FIELDS == ("base_model", "dataset", "validation_dataset", "method", "seed", "output_dir")
    assert config.set_by("base_model") == "set it with the top-level `model`"
    assert config.set_by("output_dir") == "chosen by the worker"
    assert config.LOCAL_FIELDS == {"output_dir", "resume"}


def test_every_role_is_a_known_one() -> None:
    known = set(config.Role.__args__)  # type: ignore[attr-defined]
    for name, info in config.TrainingConfig.model_fields.items():
        assert set(config._roles(info)) <= known, name
