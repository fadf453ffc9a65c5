"""Inverted pairs kept per pair, so a pair's DDIM inversion (inversion.py) runs once per run, not once per visit.

Three kinds, `TrainingConfig.inversion_cache`:
- memory: a dict on the CPU, one entry (1, N, ...) per pair key; each process holds the pairs it inverted;
- disk: one file per pair key in `directory`, written atomically, shared by every process and by a resumed run;
- none: nothing kept; every visit inverts again (entries stay on the device).
"""

from __future__ import annotations

import hashlib
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


def _map_pairs(pairs: InvertedPairs, fn: Callable[[torch.Tensor], torch.Tensor]) -> InvertedPairs:
    return InvertedPairs(*(fn(getattr(pairs, f.name)) for f in fields(pairs)))


def entry_bytes(entry: InvertedPairs) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(entry, f.name) for f in fields(entry)))


class InversionCache:
    """Pair key -> inverted pair (1, N, ...); `invert` computes what is missing (see the module docstring)."""

    def __init__(
        self,
        kind: Literal["memory", "disk", "none"],
        directory: Path,
        invert: Invert,
        *,
        device: torch.device,
        rank: int = 0,
    ):
        self.kind, self.directory, self._invert, self.device, self.rank = kind, directory, invert, device, rank
        self._memory: dict[str, InvertedPairs] = {}

    def _file(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def __contains__(self, key: str) -> bool:
        if self.kind == "memory":
            return key in self._memory
        return self.kind == "disk" and self._file(key).is_file()

    def get(self, key: str) -> InvertedPairs | None:
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
        keep_on = torch.device("cpu") if self.kind != "none" else self.device
        entries = []
        for i, pair in enumerate(batch):
            # A copy, not a view: a view would keep (and torch.save would write) the whole batch's storage.
            entry = _map_pairs(inv.select(slice(i, i + 1)), lambda t: t.to(keep_on, copy=True))
            if self.kind == "memory":
                self._memory[pair.key] = entry
            elif self.kind == "disk":
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self._file(pair.key).with_suffix(f".tmp{self.rank}")
                torch.save({f.name: getattr(entry, f.name) for f in fields(entry)}, tmp)
                os.replace(tmp, self._file(pair.key))  # atomic: a reader sees a whole entry or none
            entries.append(entry)
        return entries

    def batch(self, batch: list[PreferencePair], captions: list[str]) -> InvertedPairs:
        """The batch's inverted pairs (B, N, ...) on the device, from the cache or inverted now."""
        entries = [self.get(p.key) for p in batch]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            inverted = self.invert([batch[i] for i in missing], [captions[i] for i in missing])
            for i, entry in zip(missing, inverted, strict=True):
                entries[i] = entry
        return _map_pairs(
            InvertedPairs.cat([e for e in entries if e is not None]), lambda t: t.to(self.device, copy=True)
        )
