"""The inversion cache (invdpo_core/inversion_cache.py): an entry is reused only for the same record, the same model
and the same settings, however the output_dir or the cache directory is shared."""

import shutil

import pytest

from invdpo_core import train as train_module
from invdpo_core.config import parse_config
from invdpo_core.testing import build_tiny_pipeline
from invdpo_core.toy import make_toy_dataset
from invdpo_core.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inversions(monkeypatch):
    """Pairs inverted so far (a list of batch sizes), counted at the reference inversion itself."""
    counted: list[int] = []
    real = train_module.build_inverted_pairs

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        counted.append(out.ref_err_w.shape[0])
        return out

    monkeypatch.setattr(train_module, "build_inverted_pairs", counting)
    return counted


def run_disk_cached(model, dataset, output_dir, inversions: list[int]) -> int:
    """Train 2 steps of 2 pairs (the 4 pairs of a toy dataset) with a disk cache; the pairs this run inverted."""
    inversions.clear()
    config = {
        "base_model": str(model), "dataset": str(dataset), "resolution": 64, "inversion_steps": 4, "batch_size": 2,
        "max_steps": 2, "learning_rate": 1e-3, "beta": 500.0, "checkpoint_interval": 100,
        "output_dir": str(output_dir), "method": "inversion_dpo", "inversion_cache": "disk", "resume": False,
    }  # fmt: skip
    train(parse_config(config))
    return sum(inversions)


def test_another_dataset_with_the_same_file_names_is_inverted_not_served_the_old_entries(
    tmp_path, model_dir, inversions
):
    # Two datasets whose records have the same keys ("manifest.jsonl line n") but other images.
    data_a = make_toy_dataset(tmp_path / "a", 4, model_dir=model_dir, seed=0)
    data_b = make_toy_dataset(tmp_path / "b", 4, model_dir=model_dir, seed=1)
    assert data_a.name == data_b.name == "manifest.jsonl"
    out = tmp_path / "run"
    assert run_disk_cached(model_dir, data_a, out, inversions) == 4
    assert run_disk_cached(model_dir, data_b, out, inversions) == 4  # a stale cache would invert none
    assert run_disk_cached(model_dir, data_a, out, inversions) == 0  # data_a's entries are still there, reused


def test_other_weights_under_the_same_model_path_are_inverted_again(tmp_path, model_dir, inversions):
    dataset = make_toy_dataset(tmp_path / "data", 4, model_dir=model_dir)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "run"
    assert run_disk_cached(model, dataset, out, inversions) == 4
    assert run_disk_cached(model, dataset, out, inversions) == 0
    shutil.rmtree(model)
    build_tiny_pipeline("sd15", seed=1).save_pretrained(model)  # a new base model at the same path
    assert run_disk_cached(model, dataset, out, inversions) == 4
