"""Inverted pairs kept per pair, so a pair's DDIM inversion (inversion.py) runs once per run, not once per visit.

Three kinds, `TrainingConfig.inversion_cache`:
- memory: a dict on the CPU, one entry (1, N, ...) per entry key; each process holds the pairs it inverted;
- disk: one file per entry key in `directory`, written atomically, shared by every process and by a resumed run;
- none: nothing kept; every visit inverts again (entries stay on the device).

An entry's key is its whole identity, never only its folder, so a shared cache directory (a reused output_dir, a
cache of another dataset or another model) can never hand out an entry that belongs to something else:
- the cache's `identity`: every setting that changes an entry (the `cache_key` fields of config.py) and, for a
  disk cache, the base model's weights and scheduler (`model_digest`), as train.py builds it;
- LAYOUT, the entry format;
- the record: sha256 of the two images' bytes and the caption the pair is inverted under (`record_digest`), and
  the pair's location-free key (its per-pair coin and points are drawn from the seed and that key).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch

from invdpo_core.data import PreferencePair
from invdpo_core.inversion import InvertedPairs

# Inverts a batch of pairs under the given captions: InvertedPairs (B, N, ...).
Invert = Callable[[list[PreferencePair], list[str]], InvertedPairs]
# The entry format, part of every key: a change of what an entry holds can never read an entry of the old format.
LAYOUT = 1


def model_digest(modules: list[torch.nn.Module], scheduler_config: dict) -> str:
    """sha256 over the modules' state_dict tensors (names, dtypes, shapes, bytes) and the scheduler config: the base
    model's identity as the cache sees it, computed once per run (a few seconds per GB of weights)."""
    h = hashlib.sha256(json.dumps(scheduler_config, sort_keys=True, default=str).encode())
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record_digest(pair: PreferencePair, caption: str) -> str:
    """The record's content: sha256 of the chosen and the rejected image's bytes and the caption used."""
    h = hashlib.sha256()
    for part in (pair.chosen, pair.rejected, caption.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _map_pairs(pairs: InvertedPairs, fn: Callable[[torch.Tensor], torch.Tensor]) -> InvertedPairs:
    return InvertedPairs(*(fn(getattr(pairs, f.name)) for f in fields(pairs)))


def entry_bytes(entry: InvertedPairs) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(entry, f.name) for f in fields(entry)))


class InversionCache:
    """(pair, caption) -> inverted pair (1, N, ...); `invert` computes what is missing (see the module docstring).

    identity: the model and the settings the entries depend on (the module docstring); `inverted` counts the pairs
    this cache inverted."""

    def __init__(
        self,
        kind: Literal["memory", "disk", "none"],
        directory: Path,
        invert: Invert,
        *,
        identity: str,
        device: torch.device,
        rank: int = 0,
    ):
        self.kind, self.directory, self._invert, self.device, self.rank = kind, directory, invert, device, rank
        self.identity, self.inverted = identity, 0
        self._memory: dict[str, InvertedPairs] = {}

    def key(self, pair: PreferencePair, caption: str) -> str:
        """The entry's key: the cache's identity, the pair's key and the record's content (64 hex digits)."""
        parts = [f"layout {LAYOUT}", self.identity, pair.key, record_digest(pair, caption)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _file(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def has(self, pair: PreferencePair, caption: str) -> bool:
        key = self.key(pair, caption)
        if self.kind == "memory":
            return key in self._memory
        return self.kind == "disk" and self._file(key).is_file()

    def get(self, pair: PreferencePair, caption: str) -> InvertedPairs | None:
        key = self.key(pair, caption)
        if self.kind == "memory":
            return self._memory.get(key)
        if self.kind == "disk" and self._file(key).is_file():
            try:
                return InvertedPairs(**torch.load(self._file(key), map_location="cpu", weights_only=True))
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # a torn file: recompute it
                return None
        return None

    def invert(self, batch: list[PreferencePair], captions: list[str]) -> list[InvertedPairs]:
        """Invert the pairs now; one entry (1, N, ...) per pair, stored in the cache when there is one."""
        inv = self._invert(batch, captions)
        self.inverted += len(batch)
        keep_on = torch.device("cpu") if self.kind != "none" else self.device
        entries = []
        for i, (pair, caption) in enumerate(zip(batch, captions, strict=True)):
            key = self.key(pair, caption)
            # A copy, not a view: a view would keep (and torch.save would write) the whole batch's storage.
            entry = _map_pairs(inv.select(slice(i, i + 1)), lambda t: t.to(keep_on, copy=True))
            if self.kind == "memory":
                self._memory[key] = entry
            elif self.kind == "disk":
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self._file(key).with_suffix(f".tmp{self.rank}")
                torch.save({f.name: getattr(entry, f.name) for f in fields(entry)}, tmp)
                os.replace(tmp, self._file(key))  # atomic: a reader sees a whole entry or none
            entries.append(entry)
        return entries

    def batch(self, batch: list[PreferencePair], captions: list[str]) -> InvertedPairs:
        """The batch's inverted pairs (B, N, ...) on the device, from the cache or inverted now."""
        entries = [self.get(p, c) for p, c in zip(batch, captions, strict=True)]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            inverted = self.invert([batch[i] for i in missing], [captions[i] for i in missing])
            for i, entry in zip(missing, inverted, strict=True):
                entries[i] = entry
        return _map_pairs(
            InvertedPairs.cat([e for e in entries if e is not None]), lambda t: t.to(self.device, copy=True)
        )
