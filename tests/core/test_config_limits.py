"""Limits: every number a job may set has a documented upper bound, and the bounds refuse what no worker could run
(a one-line error in the CLI, never a traceback), including an inversion grid past the model's timesteps."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import BaseModel

from invdpo_core.config import ConfigError, EvalConfig, TrainingConfig, parse_config, schedule_problem
from invdpo_core.testing import with_scheduler
from invdpo_core.toy import make_toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(dotted name, JSON schema) of every int or float field, nested sections included."""
    found = []
    schema = model.model_json_schema()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _numeric_fields(annotation, f"{prefix}{name}.")
            continue
        prop = schema["properties"][name]
        for option in [prop, *prop.get("anyOf", [])]:  # an optional number: its bounds are in the number's branch
            if option.get("type") in ("integer", "number"):
                found.append((f"{prefix}{name}", {"default": prop.get("default"), **option}))
    return found


@pytest.mark.parametrize("model", [TrainingConfig, EvalConfig])
def test_every_numeric_field_has_a_documented_upper_bound(model: type[BaseModel]) -> None:
    fields = _numeric_fields(model)
    assert len(fields) >= (20 if model is TrainingConfig else 5)  # the walk found them (nested adapter too)
    unbounded = [name for name, prop in fields if "maximum" not in prop and "exclusiveMaximum" not in prop]
    assert unbounded == []
    for name, prop in fields:  # and it leaves room for the default
        bound = prop.get("maximum", prop.get("exclusiveMaximum"))
        assert prop.get("default") is None or prop["default"] <= bound, name


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 10**9),  # was accepted, and the job could not even be cancelled
        ("resolution", 4096),  # got the trainer killed for memory
        ("max_steps", 10**12),
        ("inversion_steps", 1000),  # crashed the trainer with an IndexError
        ("gradient_accumulation_steps", 10**9),
        ("seed", 2**32),  # numpy cannot be seeded with it
        ("checkpoints_to_keep", 10**6),
    ],
)
def test_bounds_refuse_what_no_worker_could_run(field: str, value: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"base_model": "m", "dataset": "d", field: value})
    assert [e["field"] for e in info.value.errors] == [field]
    assert "less than or equal" in info.value.errors[0]["message"]


SD = {"num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}


def test_the_inversion_grid_must_fit_the_models_timesteps() -> None:
    assert schedule_problem(SD, "inversion_dpo", 999) is None
    assert schedule_problem(SD, "inversion_dpo", 1000) == (
        "inversion_steps: 1000 steps reach timestep 1000, past this model's 1000 training timesteps (steps_offset 1);"
        " at most 999"
    )
    assert schedule_problem({**SD, "timestep_spacing": "trailing"}, "inversion_dpo", 1000) is None
    assert schedule_problem({**SD, "timestep_spacing": "linspace"}, "inversion_dpo", 1000) is None  # 0 ... 999
    # InPO stops below a timestep drawn under T, so its grid may reach T; never more steps than timesteps.
    assert schedule_problem(SD, "inpo", 1000) is None
    short = {**SD, "num_train_timesteps": 500}
    assert "at most 499" in (schedule_problem(short, "inversion_dpo", 500) or "")
    assert schedule_problem(short, "inpo", 600) == (
        "inpo_inversion_steps: 600 steps exceed this model's 500 training timesteps"
    )
    assert schedule_problem(short, "diffusion_dpo", None) is None


def test_other_noise_processes_are_refused_and_a_loaded_config_reads_as_written() -> None:
    from diffusers import EulerDiscreteScheduler

    from invdpo_core.config import scheduler_as_written

    for family in ("EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler"):
        assert f"scheduler._class_name: {family!r} is not supported" in (
            schedule_problem({**SD, "_class_name": family}, "diffusion_dpo") or ""
        )
    # An SDXL-style Euler config that does not say its spacing: loaded, Euler's own default (linspace) fills it in;
    # the check reads what the file says (leading, the default the inversion grid takes too).
    euler = EulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "steps_offset": 1})
    assert euler.config.timestep_spacing == "linspace"
    written = scheduler_as_written(euler.config, "EulerDiscreteScheduler")
    assert "timestep_spacing" not in written and written["_class_name"] == "EulerDiscreteScheduler"
    assert written["steps_offset"] == 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, model_dir):
    return make_toy_dataset(tmp_path_factory.mktemp("data"), 2, model_dir=model_dir)


def test_a_grid_past_the_models_timesteps_is_refused_before_training(model_dir, dataset, tmp_path) -> None:
    """A model of 500 training timesteps: 500 inversion steps pass the config's bound but not the model. The
    files check (before any GPU) and the trainer name the field instead of crashing on an IndexError."""
    from invdpo_core.train import TrainError, train
    from services.jobs.file_checks import check_files

    model = with_scheduler(model_dir, tmp_path / "short-schedule", num_train_timesteps=500)
    error = check_files(str(model), str(dataset), None, 2, method="inversion_dpo", inversion_steps=500)
    assert error is not None and error["code"] == "unsupported_model" and "inversion_steps: 500" in error["message"]
    config = parse_config(
        {"base_model": str(model), "dataset": str(dataset), "resolution": 64, "inversion_steps": 500, "max_steps": 1,
         "output_dir": str(tmp_path / "run")}
    )  # fmt: skip
    with pytest.raises(TrainError, match="inversion_steps: 500 steps reach timestep 500.*at most 499"):
        train(config)


@pytest.mark.parametrize("setting", ["inversion_steps=1000", "batch_size=1000000000", "resolution=4096"])
def test_cli_prints_one_line_for_a_config_no_worker_could_run(model_dir, dataset, tmp_path, setting: str) -> None:
    # A real process: what a user sees on the terminal, traceback or not.
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "train", "--set", f"base_model={model_dir}", "--set",
         f"dataset={dataset}", "--set", "resolution=64", "--set", "max_steps=1", "--set",
         f"output_dir={tmp_path / 'run'}", "--set", setting],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err and "\n" not in err
    assert err.startswith(f"error: {setting.split('=')[0]}: Input should be less than or equal to")


@pytest.fixture(scope="module")
def one_bad_in_four(tmp_path_factory, model_dir):
    """Four pairs, the third with a corrupt chosen image."""
    root = make_toy_dataset(tmp_path_factory.mktemp("bad-data"), 4, model_dir=model_dir)
    lines = root.read_text().splitlines()
    corrupt = root.parent / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    record = json.loads(lines[2])
    lines[2] = json.dumps({**record, "chosen": "corrupt.png"})
    root.write_text("\n".join(lines) + "\n")
    return root


def test_unreadable_pairs_up_to_max_bad_share_are_skipped_counted_and_reported(model_dir, one_bad_in_four, tmp_path):
    from invdpo_core.data import DatasetError
    from invdpo_core.train import TrainCallbacks, train

    base = {
        "base_model": str(model_dir), "dataset": str(one_bad_in_four), "resolution": 64, "inversion_steps": 4,
        "max_steps": 4, "checkpoint_interval": 100, "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    skipped, steps = [], []
    callbacks = TrainCallbacks(
        on_skipped_pair=lambda n, why: skipped.append((n, why)), on_step=lambda s, t, m: steps.append(m)
    )
    result = train(parse_config({**base, "max_bad_share": 0.25}), callbacks)
    assert result.steps == 4  # 4 steps of one pair: the three good pairs, then the first again
    assert len(skipped) == 1 and skipped[0][0] == 1  # once, though the cache walk and each epoch read it again
    assert "line 3 chosen: unreadable image" in skipped[0][1]
    assert [m.get("skipped_pairs") for m in steps] == [1.0, 1.0, 1.0, 1.0]
    # The default share (1%) tolerates none of four: the run fails naming the record and the setting.
    with pytest.raises(DatasetError, match=r"line 3 chosen: unreadable image.*above max_bad_share 0.01") as info:
        train(parse_config({**base, "output_dir": str(tmp_path / "strict")}))
    assert info.value.code == "too_many_bad_images"


def test_dataset_validate_says_how_many_records_it_read(one_bad_in_four, capsys) -> None:
    from invdpo_core.cli import main as core_main

    assert core_main(["dataset", "validate", str(one_bad_in_four), "--max-bad-share", "0.5", "--sample", "3"]) == 0
    out = capsys.readouterr().out
    assert "records: 3 read of 4" in out and "(first 3 records only)" in out
    assert "unreadable images: 1 (1 pairs skipped)" in out
