"""Preference pairs from Pick-a-Pic v2 parquet or a JSONL manifest, local or s3://, in flat memory.

No torch at import: the API calls `inspect_dataset` from a torch-free image. Only `load_image` builds tensors.

Formats, detected from the URI:
- Pick-a-Pic v2 parquet: a `.parquet` file, a directory / s3 prefix (every `*.parquet` under it, recursively), or
  a glob in the last component (`s3://b/pickapic/data/train-*.parquet`) to pick one split. Columns used: caption,
  jpg_0, jpg_1 (encoded image bytes) and label_0: 1 means jpg_0 won, 0 means jpg_1 won, 0.5 is a tie. Read one
  row group at a time, so memory is bounded by the largest row group, never by the dataset size.
- JSONL manifest: a `.jsonl` file (or a directory / prefix holding `manifest.jsonl`) of
  {"prompt", "chosen", "rejected"} records; image paths are relative to the manifest's directory and must stay
  inside it: absolute paths, `..` and URIs (s3://, file://...) are refused with DatasetError("bad_image_path"), so
  a manifest reads only what lies beside it (what the run's dataset fingerprint covers) and never the host's files
  or another prefix. Only line offsets (16 bytes a record) are held in memory; a record line is at most 1 MiB, an
  s3 manifest at most 1 GiB.

Every image is read with a size cap (`max_image_bytes`, default 32 MiB or INVDPO_MAX_IMAGE_BYTES): a larger image
is unreadable (counted, below), and never read whole. A parquet row group above 1 GiB uncompressed is refused.

Order and epochs: `iter_pairs` is ONE epoch. With a seed, parquet row groups are shuffled, then the rows within
each row group (a two-level shuffle keeps memory flat); JSONL records get a global permutation. The trainer calls
`iter_pairs(uri, seed=seed + epoch, start=k)` to resume at pair k of an epoch. `start` counts yielded pairs and is
exact (skipped records go through the same tie and image checks), so skipping reads the skipped records: its cost
is proportional to k.

Ties (label_0 == 0.5): tie_policy "drop" skips and counts them; "keep" yields them with jpg_0 as chosen and
`tie=True`, leaving the trainer to decide (e.g. mask them out of the DPO loss).

Unreadable images (corrupt, truncated, missing file): the pair is skipped and counted. Once the skipped pairs
exceed `max_bad_share` of the records being read, reading stops with DatasetError("too_many_bad_images") naming
the record that crossed the line (the share can only grow, so failing early is the same verdict, sooner).
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import posixpath
import random
import re
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from invdpo_core.storage import (
    StorageError,
    TooLargeError,
    download_prefix,
    exists,
    format_bytes,
    is_s3,
    list_files,
    open_s3,
    read_bytes,
    split_s3,
)

if TYPE_CHECKING:
    import torch

TiePolicy = Literal["drop", "keep"]
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
JSONL_FIELDS = ("prompt", "chosen", "rejected")
DEFAULT_MAX_IMAGE_BYTES = 32 << 20
MAX_RECORD_BYTES = 1 << 20  # one JSONL line: a prompt and two paths
MAX_MANIFEST_BYTES = 1 << 30  # ~5M records; fetched to local disk, 16 bytes a record held in memory
MAX_ROW_GROUP_BYTES = 1 << 30  # uncompressed; Pick-a-Pic's are ~100-300 MB


def default_max_image_bytes() -> int:
    """INVDPO_MAX_IMAGE_BYTES if set (the API and worker settings of that name), else 32 MiB. Read here because the
    trainer calls iter_pairs without it."""
    value = os.environ.get("INVDPO_MAX_IMAGE_BYTES", "").strip()
    return int(value) if value else DEFAULT_MAX_IMAGE_BYTES


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: bytes  # encoded image (JPEG/PNG...), decoded by load_image
    rejected: bytes
    source: str  # "<file> row <n>" (parquet, 0-based) or "<manifest> line <n>" (JSONL, 1-based)
    tie: bool = False  # only with tie_policy="keep": the raters saw no difference; chosen is jpg_0

    @property
    def key(self) -> str:
        """A location-free id, "<file name> row/line <n>": the same data read from another place (a local copy,
        s3://) gets the same per-pair coins, caption drops and cache entries, so training does not depend on where
        the files live. (Shards are told apart by file name.)"""
        return self.source.rsplit("/", 1)[-1]


class DatasetError(ValueError):
    """The dataset cannot be used. `code` is machine-readable; the message is one line naming the file and row."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class DatasetReport:
    uri: str
    format: Literal["parquet", "jsonl"]
    files: int  # parquet shards, or 1 manifest
    records: int = 0  # records examined
    total_records: int = 0  # records in the dataset (examined or not)
    pairs: int = 0  # pairs a trainer gets
    ties: int = 0  # records with label_0 == 0.5
    ties_dropped: int = 0
    unreadable_images: int = 0
    skipped_pairs: int = 0  # pairs skipped for an unreadable image
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> images of that size (readable pairs)
    first_unreadable: str | None = None  # "<source> <column>: <reason>"
    sampled: bool = False  # only the first `sample` records were examined


class _Raw(NamedTuple):
    source: str
    prompt: str
    label: float  # 1: first image won, 0: second won, 0.5: tie
    images: tuple[tuple[str, bytes | str], tuple[str, bytes | str]]  # (column, bytes or why it is unreadable)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_error(exc: Exception) -> str:
    # PIL names the in-memory buffer (`<_io.BytesIO object at 0x...>`) when it cannot identify a format.
    if isinstance(exc, MemoryError):  # e.g. a small PNG that decodes to gigabytes, under a process memory limit
        return "too large to decode within the memory limit"
    return "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else _one_line(str(exc), 120)


def _image_size(data: bytes) -> tuple[int, int]:
    """Decode `data` far enough to prove it is a whole image; returns (width, height). JPEGs decode at 1/8 scale
    (libjpeg DCT scaling still reads every byte, so truncation is caught) for a fraction of the cost."""
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return size


# --- Pick-a-Pic parquet ------------------------------------------------------------------------------------------


class _Shard(NamedTuple):
    uri: str
    size: int  # bytes
    metadata: pq.FileMetaData
    row_offsets: list[int]  # first row of each row group within the file


@contextmanager
def _open_parquet(uri: str, shard: _Shard | None = None) -> Iterator[tuple[pq.ParquetFile, int]]:
    """The parquet file and its size in bytes. Reopening a known shard (saved footer and size) costs no request;
    pre_buffer coalesces a row group's column chunks into few reads (few GETs on S3)."""
    f = open_s3(uri, shard.size if shard else None) if is_s3(uri) else pa.OSFile(uri, "rb")
    try:
        size = shard.size if shard else f.seek(0, io.SEEK_END)
        if size == 0:
            raise DatasetError("empty_dataset", f"{uri}: file is empty (0 bytes)")
        yield pq.ParquetFile(f, metadata=shard.metadata if shard else None, pre_buffer=True), size
    finally:
        f.close()


@contextmanager
def _read_errors(where: str, what: str) -> Iterator[None]:
    """Storage failures and corrupt files as DatasetErrors naming the file."""
    try:
        yield
    except FileNotFoundError as exc:  # e.g. deleted between listing and reading
        raise DatasetError("dataset_not_found", _one_line(str(exc))) from None
    except (StorageError, PermissionError) as exc:
        raise DatasetError("storage_error", _one_line(str(exc))) from None
    except (pa.ArrowException, OSError) as exc:  # pyarrow reports a corrupt file as ArrowInvalid or OSError
        raise DatasetError("bad_file", f"{where}: {what} ({_one_line(str(exc))})") from None


# Column -> (accepted arrow types, what the message asks for).
_PICKAPIC_TYPES = {
    "caption": ((pa.types.is_string, pa.types.is_large_string), "string"),
    "jpg_0": ((pa.types.is_binary, pa.types.is_large_binary), "binary (encoded image bytes)"),
    "jpg_1": ((pa.types.is_binary, pa.types.is_large_binary), "binary (encoded image bytes)"),
    "label_0": ((pa.types.is_integer, pa.types.is_floating), "a number (1, 0 or 0.5)"),
}


def _check_schema(uri: str, schema: pa.Schema) -> None:
    for name, (checks, wanted) in _PICKAPIC_TYPES.items():
        if name not in schema.names:
            raise DatasetError(
                "missing_column",
                f"{uri}: missing column '{name}' (Pick-a-Pic parquet needs {', '.join(PICKAPIC_COLUMNS)})",
            )
        kind = schema.field(name).type
        if not any(check(kind) for check in checks):
            raise DatasetError("bad_column", f"{uri}: column '{name}' has type {kind}, expected {wanted}")


class _ParquetSource:
    format: Literal["parquet"] = "parquet"

    def __init__(self, shards: list[str], max_image_bytes: int):
        self.max_image_bytes = max_image_bytes
        self.shards: list[_Shard] = []
        for uri in shards:
            with _read_errors(uri, "not a readable parquet file"), _open_parquet(uri) as (pf, size):
                metadata, schema = pf.metadata, pf.schema_arrow
            _check_schema(uri, schema)
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            self.shards.append(_Shard(uri, size, metadata, [sum(sizes[:i]) for i in range(len(sizes))]))
        self.files = len(self.shards)
        self.total = sum(s.metadata.num_rows for s in self.shards)

    def close(self) -> None:
        pass

    def records(self, seed: int | None) -> Iterator[_Raw]:
        units = [(i, rg) for i, shard in enumerate(self.shards) for rg in range(shard.metadata.num_row_groups)]
        if seed is not None:
            random.Random(seed).shuffle(units)
        for i, rg in units:
            shard = self.shards[i]
            group_bytes = shard.metadata.row_group(rg).total_byte_size
            if group_bytes > MAX_ROW_GROUP_BYTES:
                raise DatasetError(
                    "row_group_too_large",
                    f"{shard.uri} row group {rg}: {group_bytes} bytes uncompressed, above the "
                    f"{format_bytes(MAX_ROW_GROUP_BYTES)} limit per row group (write smaller row groups)",
                )
            with (
                _read_errors(f"{shard.uri} row group {rg}", "cannot read"),
                _open_parquet(shard.uri, shard) as (pf, _),
            ):
                table = pf.read_row_group(rg, columns=list(PICKAPIC_COLUMNS))
            captions = table.column("caption").to_pylist()
            labels = table.column("label_0").to_pylist()
            jpg_0, jpg_1 = table.column("jpg_0"), table.column("jpg_1")
            rows = list(range(table.num_rows))
            if seed is not None:
                # Seeded by the unit (shard number, not its URI: a copy on S3 reads in the same order as the local
                # original), not by the unit's place in the epoch.
                random.Random(f"{seed}:{i}:{rg}").shuffle(rows)
            for r in rows:
                row = shard.row_offsets[rg] + r
                source = f"{shard.uri} row {row}"
                label = labels[r]
                if isinstance(label, bool) or label not in (0, 0.5, 1):
                    raise DatasetError("bad_label", f"{source}: label_0 must be 1, 0 or 0.5 (tie), got {label!r}")
                if captions[r] is None:
                    raise DatasetError("bad_record", f"{source}: caption is null")
                images = (
                    ("jpg_0", self._image(jpg_0[r].as_py())),
                    ("jpg_1", self._image(jpg_1[r].as_py())),
                )
                yield _Raw(source, captions[r], float(label), images)
            del table, jpg_0, jpg_1  # release this row group before the next one is read

    def _image(self, data: bytes | None) -> bytes | str:
        if not data:
            return "no image bytes"
        if len(data) > self.max_image_bytes:
            return f"{len(data)} bytes, larger than the {format_bytes(self.max_image_bytes)} limit per image"
        return data


# --- JSONL manifest ----------------------------------------------------------------------------------------------


class _JsonlSource:
    format: Literal["jsonl"] = "jsonl"
    files = 1

    def __init__(self, uri: str, max_image_bytes: int):
        self.uri = uri
        self.max_image_bytes = max_image_bytes
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if is_s3(uri):
            # Records are read in a shuffled order, so the manifest (text, small next to the images) is fetched once.
            self._tmp = tempfile.TemporaryDirectory(prefix="invdpo-manifest-")
            try:
                size = open_s3(uri).seek(0, io.SEEK_END)  # one HEAD: a manifest is capped like everything read
                if size > MAX_MANIFEST_BYTES:
                    raise DatasetError(
                        "manifest_too_large",
                        f"{uri}: {size} bytes, above the {format_bytes(MAX_MANIFEST_BYTES)} limit per manifest",
                    )
                self.path = download_prefix(uri, self._tmp.name) / posixpath.basename(uri)
            except FileNotFoundError:
                raise DatasetError("dataset_not_found", f"{uri}: no such manifest") from None
            except StorageError as exc:
                raise DatasetError("storage_error", _one_line(str(exc))) from None
            self.base = posixpath.dirname(uri)
        else:
            self.path = Path(uri)
            self.base = str(self.path.parent)
        self.offsets, self.lines = array("q"), array("q")
        with _read_errors(uri, "cannot read manifest"), open(self.path, "rb") as f:
            pos = 0
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.offsets.append(pos)
                    self.lines.append(n)
                pos += len(line)
        self.total = len(self.offsets)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def _resolve(self, source: str, name: str, path: str) -> str:
        """`path` joined to the manifest's directory, or DatasetError if it would leave it."""
        refused = None
        if not path or "\x00" in path:
            refused = "is empty or holds a NUL character"
        elif "://" in path or path.startswith(("/", "\\")):
            refused = "is absolute or a URI"
        elif ".." in re.split(r"[/\\]", path):
            refused = "contains '..'"
        if refused is None and not is_s3(self.base):
            # Local manifests (embedded setups only): a symlink must not lead out of the directory either.
            target = os.path.realpath(os.path.join(self.base, path))
            if os.path.commonpath([target, os.path.realpath(self.base)]) != os.path.realpath(self.base):
                refused = "leads out of the manifest's directory (symlink)"
        if refused is not None:
            raise DatasetError(
                "bad_image_path",
                f"{source}: field '{name}' {_one_line(repr(path), 120)} {refused}; image paths must be relative to "
                "the manifest's directory and stay inside it",
            )
        rel = posixpath.normpath(path)
        return posixpath.join(self.base, rel) if is_s3(self.base) else str(Path(self.base) / rel)

    def _fetch(self, uri: str) -> bytes | str:
        try:
            return read_bytes(uri, max_bytes=self.max_image_bytes)
        except StorageError as exc:  # the store, not the data, is the problem: stop
            raise DatasetError("storage_error", _one_line(str(exc))) from None
        except TooLargeError:  # read no further than the limit: counted like a corrupt image
            return f"larger than the {format_bytes(self.max_image_bytes)} limit per image"
        except FileNotFoundError:  # a missing image is a data problem: counted like a corrupt one
            return f"no such file {uri}"
        except OSError as exc:
            return f"cannot read {uri}: {exc.strerror or exc}"

    def records(self, seed: int | None) -> Iterator[_Raw]:
        order = array("q", range(self.total))
        if seed is not None:
            random.Random(seed).shuffle(order)
        with open(self.path, "rb") as f:
            for i in order:
                f.seek(self.offsets[i])
                source = f"{self.uri} line {self.lines[i]}"
                line = f.readline(MAX_RECORD_BYTES + 1)
                if len(line) > MAX_RECORD_BYTES:
                    raise DatasetError(
                        "bad_record", f"{source}: longer than the {format_bytes(MAX_RECORD_BYTES)} limit per record"
                    )
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DatasetError("bad_record", f"{source}: not valid JSON ({_one_line(str(exc))})") from None
                if not isinstance(record, dict):
                    raise DatasetError("bad_record", f"{source}: expected an object with {', '.join(JSONL_FIELDS)}")
                for name in JSONL_FIELDS:
                    if name not in record:
                        raise DatasetError("missing_column", f"{source}: missing field '{name}'")
                    if not isinstance(record[name], str):
                        raise DatasetError("bad_record", f"{source}: field '{name}' must be a string")
                # Both paths are checked before either image is read.
                uris = [self._resolve(source, name, record[name]) for name in ("chosen", "rejected")]
                images = (("chosen", self._fetch(uris[0])), ("rejected", self._fetch(uris[1])))
                yield _Raw(source, record["prompt"], 1.0, images)


# --- detection and the shared loop -------------------------------------------------------------------------------


def _open(uri: str, max_image_bytes: int | None) -> _ParquetSource | _JsonlSource:
    max_image_bytes = default_max_image_bytes() if max_image_bytes is None else max_image_bytes
    try:
        if is_s3(uri):
            split_s3(uri)
        name = posixpath.basename(uri.rstrip("/"))
        if any(c in name for c in "*?["):  # a glob picks shards (e.g. one split) in a directory or prefix
            parent = uri.rstrip("/")[: -len(name)].rstrip("/") or "."
            files = [f for f in list_files(parent) if fnmatch.fnmatch(posixpath.basename(f), name)]
            found = bool(files) or exists(parent)
        else:
            files = list_files(uri)
            found = bool(files) or exists(uri)
    except ValueError as exc:
        raise DatasetError("bad_uri", f"dataset: {exc}") from None
    except FileNotFoundError as exc:
        raise DatasetError("dataset_not_found", _one_line(str(exc))) from None
    except (StorageError, PermissionError) as exc:
        raise DatasetError("storage_error", _one_line(str(exc))) from None
    if not found:
        raise DatasetError("dataset_not_found", f"{uri}: no such file, directory or s3 prefix")
    if uri.endswith(".jsonl"):
        source: _ParquetSource | _JsonlSource = _JsonlSource(uri, max_image_bytes)
    else:
        shards = [f for f in files if f.endswith(".parquet")]
        manifests = [f for f in files if posixpath.basename(f) == "manifest.jsonl"]
        if shards:
            source = _ParquetSource(shards, max_image_bytes)
        elif len(manifests) == 1 and not uri.endswith(".parquet"):
            source = _JsonlSource(manifests[0], max_image_bytes)
        else:
            raise DatasetError("empty_dataset", f"{uri}: no *.parquet shards or manifest.jsonl found")
    if source.total == 0:
        source.close()
        raise DatasetError("empty_dataset", f"{uri}: no records ({source.files} file(s), 0 rows)")
    return source


def _check_args(tie_policy: str, max_bad_share: float) -> None:
    if tie_policy not in ("drop", "keep"):
        raise ValueError(f"tie_policy must be one of 'drop', 'keep', got {tie_policy!r}")
    if not 0 <= max_bad_share <= 1:
        raise ValueError(f"max_bad_share must be in [0, 1], got {max_bad_share!r}")


def _pairs(
    raws: Iterator[_Raw],
    report: DatasetReport,
    total: int,
    tie_policy: str,
    max_bad_share: float,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[PreferencePair]:
    """The one place ties and unreadable images are decided, for iter_pairs and inspect_dataset alike. A pair
    skipped for an unreadable image is told to `on_skip(source, reason)`."""
    sizes: Counter[str] = Counter()
    try:
        for raw in raws:
            report.records += 1
            if raw.label == 0.5:
                report.ties += 1
                if tie_policy == "drop":
                    report.ties_dropped += 1
                    continue
            bad: list[str] = []
            readable: list[bytes] = []
            pair_sizes: list[str] = []
            for column, data in raw.images:
                try:
                    if isinstance(data, str):  # the reader could not even fetch it; `data` says why
                        raise OSError(data)
                    w, h = _image_size(data)
                except Exception as exc:  # any decoder failure (truncated, not an image, bomb) means unreadable
                    bad.append(f"{raw.source} {column}: unreadable image ({_image_error(exc)})")
                    continue
                readable.append(data)
                pair_sizes.append(f"{w}x{h}")
            if bad:
                report.unreadable_images += len(bad)
                report.skipped_pairs += 1
                report.first_unreadable = report.first_unreadable or bad[0]
                if report.skipped_pairs > max_bad_share * total:
                    raise DatasetError(
                        "too_many_bad_images",
                        f"{bad[0]}; {report.skipped_pairs} of {total} records have unreadable images, "
                        f"above max_bad_share {max_bad_share}",
                    )
                if on_skip is not None:
                    on_skip(raw.source, bad[0])
                continue
            sizes.update(pair_sizes)
            report.pairs += 1
            first, second = readable
            chosen, rejected = (second, first) if raw.label == 0 else (first, second)
            yield PreferencePair(raw.prompt, chosen, rejected, raw.source, tie=raw.label == 0.5)
    finally:
        report.image_sizes = dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def iter_pairs(
    uri: str,
    *,
    tie_policy: TiePolicy = "drop",
    seed: int = 0,
    start: int = 0,
    max_bad_share: float = 0.01,
    max_image_bytes: int | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> Iterator[PreferencePair]:
    """One epoch of preference pairs in a deterministic order for `seed`, skipping the first `start` pairs.
    `on_skip(source, reason)` hears of each pair skipped for an unreadable image.

    Raises DatasetError (missing data, missing column, bad label, too many unreadable images...) when reached.
    """
    _check_args(tie_policy, max_bad_share)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    source = _open(uri, max_image_bytes)
    report = DatasetReport(uri, source.format, source.files)
    try:
        pairs = _pairs(source.records(seed), report, source.total, tie_policy, max_bad_share, on_skip)
        for i, pair in enumerate(pairs):
            if i >= start:
                yield pair
    finally:
        source.close()


def inspect_dataset(
    uri: str,
    *,
    sample: int | None = None,
    tie_policy: TiePolicy = "drop",
    max_bad_share: float = 0.01,
    max_image_bytes: int | None = None,
) -> DatasetReport:
    """Read the dataset (or only its first `sample` records, in file order) as training would, and report what
    it holds. Raises DatasetError for anything that would stop training."""
    _check_args(tie_policy, max_bad_share)
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    source = _open(uri, max_image_bytes)
    try:
        total = source.total if sample is None else min(sample, source.total)
        sampled = sample is not None and sample < source.total
        report = DatasetReport(uri, source.format, source.files, total_records=source.total, sampled=sampled)
        raws = source.records(seed=None)
        for _ in _pairs(islice(raws, total), report, total, tie_policy, max_bad_share):
            pass
    finally:
        source.close()
    if report.pairs == 0:
        raise DatasetError(
            "empty_dataset",
            f"{uri}: no usable pairs in {report.records} records ({report.ties_dropped} ties dropped, "
            f"{report.skipped_pairs} with unreadable images)",
        )
    return report


def load_image(data: bytes, resolution: int, *, source: str = "image") -> torch.Tensor:
    """Encoded image -> float tensor (3, R, R) in [-1, 1]: shorter side resized to R (bilinear), centre crop.
    The same transform as the diffusers / Diffusion-DPO training scripts (Resize, CenterCrop, Normalize(0.5))."""
    import numpy as np
    import torch

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # any decoder failure means the bytes are not a usable image
        raise DatasetError("unreadable_image", f"{source}: unreadable image ({_image_error(exc)})") from None
    size, left, top = _resize_and_crop(*rgb.size, resolution)
    rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))  # (R, R, 3) uint8
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, R, R) in [-1, 1]


def _resize_and_crop(w: int, h: int, resolution: int) -> tuple[tuple[int, int], int, int]:
    """What load_image does to a w x h image: the resized (width, height), then the crop's left and top."""
    # torchvision Resize(int): the shorter side becomes R, the longer one int(R * long / short).
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    return size, int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))


def image_time_ids(data: bytes, resolution: int, *, source: str = "image") -> tuple[int, int, int, int, int, int]:
    """SDXL's added time ids of the crop load_image takes from an encoded image, as SDXL's training script builds
    them: (original height, original width, crop top, crop left, R, R). Reads only the image header."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as exc:  # any decoder failure means the bytes are not a usable image
        raise DatasetError("unreadable_image", f"{source}: unreadable image ({_image_error(exc)})") from None
    _, left, top = _resize_and_crop(w, h, resolution)
    return h, w, top, left, resolution, resolution
