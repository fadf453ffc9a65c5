import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from invdpo_core.checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _objects(step):
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(4, 4, generator=g), "b": torch.zeros(4)},
        "trainer": {"step": step, "epoch": 0, "index": 2 * step},
        "rng": [{"python": (3, tuple(range(5)), None), "generator": g.get_state()}],
    }


def test_round_trip_and_manifest(tmp_path):
    path = save_checkpoint(tmp_path, 3, _objects(3), config_hash="abc", meta={"config": {"beta": 1.0}})
    assert path == tmp_path / "checkpoint-3"
    objects, manifest = load_checkpoint(path)
    torch.testing.assert_close(objects["model"]["w"], _objects(3)["model"]["w"], rtol=0, atol=0)
    assert objects["trainer"] == {"step": 3, "epoch": 0, "index": 6}
    assert objects["rng"][0]["python"] == (3, (0, 1, 2, 3, 4), None)
    assert manifest["step"] == 3 and manifest["config_hash"] == "abc" and manifest["meta"]["config"]["beta"] == 1.0
    assert set(manifest["files"]) == {"model", "trainer", "rng"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    assert latest_checkpoint(tmp_path) == path


def test_keep_prunes_the_oldest_and_stale_directories(tmp_path):
    (tmp_path / ".tmp-step-9").mkdir(parents=True)
    (tmp_path / "checkpoint-7").mkdir()  # no manifest: a killed save
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _objects(step), config_hash="h", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    good = save_checkpoint(tmp_path, 1, _objects(1), config_hash="h")
    # A newer checkpoint without its manifest, one whose file was truncated, one with a mislabelled step.
    no_manifest = save_checkpoint(tmp_path, 2, _objects(2), config_hash="h")
    (no_manifest / MANIFEST).unlink()
    truncated = save_checkpoint(tmp_path, 3, _objects(3), config_hash="h")
    (truncated / "model.pt").write_bytes((truncated / "model.pt").read_bytes()[:-10])
    wrong_step = save_checkpoint(tmp_path, 4, _objects(4), config_hash="h")
    manifest = json.loads((wrong_step / MANIFEST).read_text())
    (wrong_step / MANIFEST).write_text(json.dumps({**manifest, "step": 5}))
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(truncated)


def test_corrupt_file_with_the_right_size_fails_the_hash(tmp_path):
    path = save_checkpoint(tmp_path, 1, _objects(1), config_hash="h")
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_latest_of_a_missing_directory_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None


# A process that writes checkpoint 1, then pauses inside the save of checkpoint 2 (the test hook) to be killed.
_WRITER = textwrap.dedent(
    """
    import sys, torch
    from invdpo_core.checkpoint import save_checkpoint
    root = sys.argv[1]
    for step in (1, 2, 3):
        objects = {"model": {"w": torch.full((256, 256), float(step))}, "optimizer": {"m": torch.zeros(256, 256)}}
        save_checkpoint(root, step, objects, config_hash="h", keep=2)
    """
)


@pytest.mark.parametrize("stage", ["files", "renamed"])
def test_sigkill_while_writing_leaves_the_previous_checkpoint(tmp_path, stage):
    env = {**os.environ, "INVDPO_TEST_CHECKPOINT_PAUSE": f"2:{stage}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        line = proc.stdout.readline()  # blocks until the writer is paused mid-save
        assert line.startswith(f"checkpoint paused at step 2 {stage}"), line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    # The half-written checkpoint 2 is on disk, and ignored.
    assert (tmp_path / (".tmp-step-2" if stage == "files" else "checkpoint-2")).is_dir()
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-1"
    objects, manifest = load_checkpoint(latest)
    assert manifest["step"] == 1 and objects["model"]["w"].eq(1.0).all()
    # The next save clears the debris.
    save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(1)}}, config_hash="h", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
