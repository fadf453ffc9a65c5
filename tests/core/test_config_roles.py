"""Field roles are metadata on TrainingConfig: every list of fields elsewhere derives from them."""

from __future__ import annotations

import pytest

from invdpo_core import config, train


def test_roles_give_the_lists_the_trainer_uses() -> None:
    # The trainer reads the role lists; these are the settings a resume may change and a cache entry depends on.
    assert config.RESUMABLE_FIELDS == {
        "max_steps", "checkpoint_interval", "checkpoints_to_keep", "validation_prompts", "validation_interval",
        "validation_inference_steps", "output_dir", "resume", "inversion_cache", "inversion_cache_dir",
    }  # fmt: skip
    assert set(config.CACHE_KEY_FIELDS) == {
        "base_model", "resolution", "inversion_target", "inversion_steps", "inversion_guidance", "empty_prompt_share",
        "seed", "mixed_precision", "inversion_cache_dtype", "inversion_points_per_pair",
    }  # fmt: skip
    assert train.RESUMABLE_FIELDS is config.RESUMABLE_FIELDS and train.CACHE_KEY_FIELDS is config.CACHE_KEY_FIELDS


def test_reserved_fields_say_where_they_are_set() -> None:
    assert config.RESERVED_FIELDS == (
        "base_model", "dataset", "validation_dataset", "method", "inversion_cache_dir", "seed", "output_dir",
    )  # fmt: skip
    assert config.set_by("base_model") == "set it with the top-level `model`"
    assert config.set_by("output_dir") == "chosen by the worker"
    assert config.LOCAL_FIELDS == {"output_dir", "resume", "inversion_cache_dir"}


def test_every_role_is_a_known_one() -> None:
    known = set(config.Role.__args__)  # type: ignore[attr-defined]
    for name, info in config.TrainingConfig.model_fields.items():
        assert set(config._roles(info)) <= known, name


def test_config_error_lists_every_bad_field_with_a_suggestion_for_a_misspelled_key() -> None:
    data = {"base_model": "m", "dataset": "d", "beta": 0, "learning_rte": 1e-5, "adapter": {"rnak": 4}}
    with pytest.raises(config.ConfigError) as info:
        config.parse_config(data)
    fields = {e["field"]: e["message"] for e in info.value.errors}
    assert set(fields) == {"beta", "learning_rte", "adapter.rnak"}
    assert fields["learning_rte"].endswith("(did you mean 'learning_rate'?)")
    assert fields["adapter.rnak"].endswith("(did you mean 'rank'?)")
    assert "did you mean" not in fields["beta"]
    assert config.did_you_mean(["zzzzzz"]) is None  # nothing close: no guess
