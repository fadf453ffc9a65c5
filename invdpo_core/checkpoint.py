"""Atomic, resumable checkpoints: written aside, renamed into place, manifest last.

Layout under a run's `checkpoints/` directory:

    .tmp-step-N/        being written; never read, removed by the next save
    checkpoint-N/       <name>.pt per object, then manifest.json
    checkpoint-N/manifest.json   {"step", "config_hash", "files": {name: {"bytes", "sha256"}}, "meta"}

A checkpoint counts only once its manifest exists and every file it lists has the recorded size, so a process
killed at any point (mid-file, after the rename, mid-manifest) leaves the previous checkpoint as the latest.
Files are fsynced before the rename and the manifest is fsynced before it is renamed into place: a power loss
cannot leave a manifest that points at unwritten data. Objects are loaded with `weights_only=True`: tensors, dicts,
lists, tuples and numbers only, so a checkpoint directory cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Test hook: "<step>:<stage>" makes the save of that step print a line and sleep at `stage` ("files": after the
# first file, "renamed": after the rename, before the manifest) so a test can SIGKILL the process mid-write.
_PAUSE_ENV = "INVDPO_TEST_CHECKPOINT_PAUSE"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and the reason in one line."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pause(step: int, stage: str) -> None:
    if os.environ.get(_PAUSE_ENV) == f"{step}:{stage}":
        print(f"checkpoint paused at step {step} {stage}", flush=True)
        sys.stdout.flush()
        time.sleep(3600)


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_DIR.match(path.name)
    return int(match.group(1)) if match else None


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint, or None: missing or unparsable manifest, wrong step, a listed file
    missing or of the wrong size. Cheap (no hashing); `load_checkpoint` verifies the hashes."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest["step"] != checkpoint_step(path):
            return None
        for name, info in manifest["files"].items():
            if (path / f"{name}.pt").stat().st_size != info["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := checkpoint_step(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found) if read_manifest(p) is not None]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (incomplete ones are ignored), or None."""
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def save_checkpoint(
    root: str | Path,
    step: int,
    objects: dict[str, Any],
    *,
    config_hash: str,
    meta: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `objects` (name -> anything `torch.save` stores with weights_only-loadable types) as the checkpoint of
    `step` under `root`, atomically; then delete all but the `keep` newest complete checkpoints (None keeps all).
    Returns the checkpoint directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir()

    # 1. Every object into the side directory, each file fsynced.
    files = {}
    for name, obj in objects.items():
        file = tmp / f"{name}.pt"
        with open(file, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        files[name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        _pause(step, "files")
    _fsync_dir(tmp)

    # 2. Rename into place. An earlier checkpoint-N (an incomplete one, or a run started over) is replaced.
    final = root / f"checkpoint-{step}"
    if final.exists():
        (final / MANIFEST).unlink(missing_ok=True)  # invalid first, so a crash mid-delete leaves nothing "complete"
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    _pause(step, "renamed")

    # 3. The manifest, last: only now does the checkpoint exist for readers.
    manifest = {"step": step, "config_hash": config_hash, "files": files, "meta": meta or {}}
    part = final / f"{MANIFEST}.part"
    with open(part, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    part.rename(final / MANIFEST)
    _fsync_dir(final)

    # 4. Prune: incomplete directories and all but the newest `keep` complete checkpoints.
    complete = list_checkpoints(root)
    for path in root.iterdir():
        if checkpoint_step(path) is not None and path not in complete:
            shutil.rmtree(path, ignore_errors=True)
    if keep is not None:
        for old in complete[:-keep]:
            (old / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load every object of a complete checkpoint onto the CPU; returns (objects, manifest).

    verify: check each file's sha256 against the manifest first. Raises CheckpointError on anything wrong.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (manifest missing, invalid or files missing)")
    objects = {}
    for name, info in manifest["files"].items():
        file = path / f"{name}.pt"
        if verify and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupt file)")
        try:
            objects[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types; all mean the file is unusable
            raise CheckpointError(f"{file}: cannot load ({type(exc).__name__}: {exc})") from None
    return objects, manifest
