import pytest
import torch

from invdpo_core.testing import build_tiny_pipeline


@pytest.fixture(scope="module")
def one_thread():
    # Tiny ops on a shared machine: more threads only spin against each other (10x slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny SD1.5 pipeline saved once per session: the base model of training and evaluation tests."""
    path = tmp_path_factory.mktemp("model")
    build_tiny_pipeline("sd15", seed=0).save_pretrained(path)
    return path
