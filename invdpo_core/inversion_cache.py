"""Inverted pairs kept per pair, so a pair's DDIM inversion (inversion.py) runs once per run, not once per visit.

Three kinds, `TrainingConfig.inversion_cache`:
- memory: a dict on the CPU, one entry per entry key; each process holds the pairs it inverted;
- disk: one file per entry key in `directory` (a local directory or an s3:// prefix, through storage.py), written
  atomically, shared by every process, every node that reads the same place, and a resumed run;
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
import io
import json
import pickle
from collections.abc import Callable
from typing import Literal

import torch

from invdpo_core import storage
from invdpo_core.data import PreferencePair
from invdpo_core.inversion import InvertedPairs, noised

# Inverts a batch of pairs under the given captions: InvertedPairs (B, N, ...), and the clean latents z_w, z_l
# (B, C, h, w) it inverted.
Invert = Callable[[list[PreferencePair], list[str]], tuple[InvertedPairs, torch.Tensor, torch.Tensor]]
# The entry format, part of every key: a change of what an entry holds can never read an entry of the old format.
LAYOUT = 2
MAX_ENTRY_BYTES = 1 << 31  # a read limit far above any entry (SDXL, fp32, all of 999 points: about 1 GiB)


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


# What an entry holds, per target: only what the loss needs, nothing twice, targets derived when they are functions
# of stored latents. M kept points, (C, h, w) the latent shape; latents in the storage dtype (inversion_cache_dtype),
# the scalar reference errors in float32 as they are, the points' places on the grid in int16 (N <= 999).
#   every target: points (M,), ref_err_w, ref_err_l (M,)
#   paired:       z_w, z_l (C, h, w) and the shared noise n (M, C, h, w): x_t = sqrt(abar) z + sqrt(1 - abar) n for
#                 both images (exactly the chosen image's inverted point, up to rounding), n the target of both
#   x0:           z_w, z_l (C, h, w), each image's own implied noise noise_w, noise_l (M, C, h, w), its target:
#                 x_t = sqrt(abar) z + sqrt(1 - abar) n (storing x_t and deriving n instead would scale x_t's
#                 rounding by 1 / sqrt(1 - abar), 25x at t = 1)
#   step, reference: xt_w, xt_l, target_w, target_l (M, C, h, w): these targets are the reference's own predictions
# (clean latents, latents per point) per target: benchmarks/cache_size.py computes entry sizes from it.
LATENTS: dict[str, tuple[int, int]] = {"paired": (2, 1), "x0": (2, 2), "step": (0, 4), "reference": (0, 4)}
POINT_BYTES = 2 + 4 + 4  # points (int16), ref_err_w and ref_err_l (float32), per kept point


def layout_bytes(target: str, points: int, latent_shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """Bytes of one entry's tensors: the layout above, for `points` kept points of latents `latent_shape`."""
    clean, per_point = LATENTS[target]
    latent = latent_shape[0] * latent_shape[1] * latent_shape[2] * dtype.itemsize
    return (clean + per_point * points) * latent + POINT_BYTES * points


def entry_bytes(entry: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def kept_points(seed: int, key: str, n: int, m: int) -> torch.Tensor:
    """The M of the N grid points a pair keeps (all N when m is 0 or >= n), ascending: drawn from a per-pair seed,
    sha256 of the seed and the pair's key, so a resumed run and every process keep the same ones."""
    if m == 0 or m >= n:
        return torch.arange(n)
    digest = hashlib.sha256(f"{seed}:points:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))
    return torch.randperm(n, generator=generator)[:m].sort().values


class InversionCache:
    """(pair, caption) -> one entry (the layout above); `invert` computes what is missing (the module docstring).

    identity: the model and the settings the entries depend on (the module docstring). target, dtype,
    points_per_pair (0: all N) and seed: what an entry keeps and how (config.py's inversion_target,
    inversion_cache_dtype, inversion_points_per_pair, seed). grid, abar: (N,) the inversion grid's timesteps and
    their alphas_cumprod, to rebuild the points. `inverted` counts the pairs this cache inverted."""

    def __init__(
        self,
        kind: Literal["memory", "disk", "none"],
        directory: str,
        invert: Invert,
        *,
        identity: str,
        target: str,
        dtype: torch.dtype,
        points_per_pair: int,
        seed: int,
        grid: torch.Tensor,
        abar: torch.Tensor,
        device: torch.device,
    ):
        self.kind, self.directory, self._invert, self.device = kind, directory, invert, device
        self.identity, self.target, self.dtype, self.points_per_pair, self.seed = (
            identity,
            target,
            dtype,
            points_per_pair,
            seed,
        )
        self.grid, self.abar = grid, abar.float()
        self.inverted = 0
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def key(self, pair: PreferencePair, caption: str) -> str:
        """The entry's key: the cache's identity, the pair's key and the record's content (64 hex digits)."""
        parts = [f"layout {LAYOUT}", self.identity, pair.key, record_digest(pair, caption)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _file(self, key: str) -> str:
        return f"{self.directory.rstrip('/')}/{key}.pt"

    def has(self, pair: PreferencePair, caption: str) -> bool:
        key = self.key(pair, caption)
        if self.kind == "memory":
            return key in self._memory
        return self.kind == "disk" and storage.exists(self._file(key))

    def get(self, pair: PreferencePair, caption: str) -> dict[str, torch.Tensor] | None:
        key = self.key(pair, caption)
        if self.kind == "memory":
            return self._memory.get(key)
        if self.kind != "disk":
            return None
        try:
            data = storage.read_bytes(self._file(key), max_bytes=MAX_ENTRY_BYTES)
        except FileNotFoundError:
            return None
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError):  # a torn file: recompute it
            return None

    def pack(
        self, inv: InvertedPairs, i: int, z_w: torch.Tensor, z_l: torch.Tensor, key: str
    ) -> dict[str, torch.Tensor]:
        """Pair i of a built batch as an entry: its kept points, in the layout above. key: the pair's. The batch holds
        all N grid points, or (built with `keep`) only the kept ones."""
        keep = kept_points(self.seed, key, len(self.grid), self.points_per_pair).to(inv.points.device)
        pos = torch.searchsorted(inv.points[i].contiguous(), keep)  # their positions in the batch's points
        assert pos.max() < inv.points.shape[1] and torch.equal(inv.points[i, pos], keep), "pair built without them"
        on = torch.device("cpu") if self.kind != "none" else self.device

        # Copies, not views: a view would keep (and torch.save would write) the whole batch's storage.
        def latent(t: torch.Tensor) -> torch.Tensor:
            return t.to(on, self.dtype, copy=True).contiguous()

        entry = {
            "points": inv.points[i, pos].to(on, torch.int16, copy=True),
            "ref_err_w": inv.ref_err_w[i, pos].to(on, torch.float32, copy=True),
            "ref_err_l": inv.ref_err_l[i, pos].to(on, torch.float32, copy=True),
        }
        if self.target == "paired":  # target_w is the shared noise (target_l is the same tensor's values)
            names = {"z_w": z_w[i], "z_l": z_l[i], "noise": inv.target_w[i, pos]}
        elif self.target == "x0":
            names = {"z_w": z_w[i], "z_l": z_l[i], "noise_w": inv.target_w[i, pos], "noise_l": inv.target_l[i, pos]}
        else:
            names = {n: getattr(inv, n)[i, pos] for n in ("xt_w", "xt_l", "target_w", "target_l")}
        return entry | {n: latent(t) for n, t in names.items()}

    def unpack(self, entries: list[dict[str, torch.Tensor]]) -> InvertedPairs:
        """Entries -> the batch's InvertedPairs (B, M, ...) in float32 on the device, points and targets rebuilt."""
        e = {n: torch.stack([entry[n] for entry in entries]).to(self.device) for n in entries[0]}
        points = e["points"].long()  # (B, M)
        abar = self.abar.to(self.device)[points].view(*points.shape, 1, 1, 1)  # (B, M, 1, 1, 1)
        if self.target in ("paired", "x0"):
            # x_t = sqrt(abar) z + sqrt(1 - abar) n, n the target: one shared noise (paired) or each image's own.
            target_w = e["noise" if self.target == "paired" else "noise_w"].float()
            target_l = e["noise" if self.target == "paired" else "noise_l"].float()
            xt_w = noised(e["z_w"].float()[:, None], target_w, abar)
            xt_l = noised(e["z_l"].float()[:, None], target_l, abar)
        else:
            xt_w, xt_l, target_w, target_l = (e[n].float() for n in ("xt_w", "xt_l", "target_w", "target_l"))
        return InvertedPairs(
            self.grid.to(self.device), xt_w, xt_l, target_w, target_l, e["ref_err_w"], e["ref_err_l"], points
        )

    def invert(self, batch: list[PreferencePair], captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Invert the pairs now; one entry per pair, stored in the cache when there is one."""
        inv, z_w, z_l = self._invert(batch, captions)
        self.inverted += len(batch)
        entries = []
        for i, (pair, caption) in enumerate(zip(batch, captions, strict=True)):
            key = self.key(pair, caption)
            entry = self.pack(inv, i, z_w, z_l, pair.key)
            if self.kind == "memory":
                self._memory[key] = entry
            elif self.kind == "disk":
                buffer = io.BytesIO()
                torch.save(entry, buffer)
                storage.write_bytes(self._file(key), buffer.getvalue())  # atomic: a reader sees all of it or none
            entries.append(entry)
        return entries

    def batch(self, batch: list[PreferencePair], captions: list[str]) -> InvertedPairs:
        """The batch's inverted pairs (B, M, ...) on the device, from the cache or inverted now."""
        entries = [self.get(p, c) for p, c in zip(batch, captions, strict=True)]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            inverted = self.invert([batch[i] for i in missing], [captions[i] for i in missing])
            for i, entry in zip(missing, inverted, strict=True):
                entries[i] = entry
        return self.unpack([e for e in entries if e is not None])
