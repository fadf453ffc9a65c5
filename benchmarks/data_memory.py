"""Does reading preference pairs keep memory flat whatever the dataset size?

Builds a 1,000-pair and a 20,000-pair Pick-a-Pic-shaped parquet (64x64 JPEGs, row groups of 256) in a temporary
directory, reads each fully with `iter_pairs` in a fresh subprocess, and prints the peak RSS of both and the
difference (target: within 200 MB). For scale, it also reports a naive whole-file `pyarrow.parquet.read_table` of
the large file.

    .venv/bin/python benchmarks/data_memory.py [--pairs 20000] [--small 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROW_GROUP = 256
TARGET_MB = 200


def build(path: Path, pairs: int, seed: int = 0) -> float:
    """Write `pairs` rows with distinct images (8x8 random colour blocks scaled to 64x64); returns size in MB."""
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
    )

    def jpeg() -> bytes:
        blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blocks).resize((64, 64), Image.Resampling.NEAREST).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    # Written one row group at a time, so building the big file does not need it in memory either.
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, pairs, ROW_GROUP):
            n = min(ROW_GROUP, pairs - first)
            columns = {
                "caption": [f"prompt {first + i}" for i in range(n)],
                "jpg_0": [jpeg() for _ in range(n)],
                "jpg_1": [jpeg() for _ in range(n)],
                "label_0": rng.choice([0.0, 1.0, 0.5], size=n, p=[0.45, 0.45, 0.1]).tolist(),
            }
            writer.write_table(pa.table(columns, schema=schema), row_group_size=ROW_GROUP)
    return path.stat().st_size / 2**20


def read_in_child(path: Path, mode: str) -> dict:
    """Run this file with --read in a fresh interpreter, so each peak RSS is that read's alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--read", str(path), "--mode", mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _vm(field: str) -> float:
    """A field of /proc/self/status in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(path: str, mode: str) -> None:
    from invdpo_core.data import iter_pairs

    # Importing pyarrow, PIL and boto3 has its own transient peak; reset the high-water mark (Linux >= 4.0:
    # writing 5 to clear_refs resets VmHWM) so the peak below is the read's, on top of what is resident now.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _vm("VmRSS")
    start = time.perf_counter()
    if mode == "iter_pairs":
        count = sum(1 for _ in iter_pairs(path, seed=0))
    else:
        count = pq.read_table(path).num_rows
    seconds = time.perf_counter() - start
    peak = _vm("VmHWM")
    print(json.dumps({"pairs": count, "baseline_mb": baseline, "peak_mb": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--read", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="iter_pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        child(args.read, args.mode)
        return

    with tempfile.TemporaryDirectory(prefix="invdpo-bench-") as tmp:
        sizes = {}
        for n in (args.small, args.pairs):
            t = time.perf_counter()
            sizes[n] = build(Path(tmp) / f"pairs-{n}.parquet", n)
            print(f"built {n:>6} pairs: {sizes[n]:7.1f} MB parquet in {time.perf_counter() - t:5.1f} s")
        results = {n: read_in_child(Path(tmp) / f"pairs-{n}.parquet", "iter_pairs") for n in (args.small, args.pairs)}
        naive = read_in_child(Path(tmp) / f"pairs-{args.pairs}.parquet", "read_table")

    for n, r in results.items():
        print(
            f"iter_pairs {n:>6} rows: {r['pairs']:>6} pairs (ties dropped), peak RSS {r['peak_mb']:6.1f} MB "
            f"(after imports {r['baseline_mb']:6.1f} MB), {r['seconds']:5.1f} s"
        )
    diff = results[args.pairs]["peak_mb"] - results[args.small]["peak_mb"]
    print(f"difference {args.pairs} vs {args.small}: {diff:+.1f} MB (target within {TARGET_MB} MB)")
    print(f"for scale, pq.read_table of the {args.pairs}-row file: peak RSS {naive['peak_mb']:.1f} MB")
    if abs(diff) > TARGET_MB:
        sys.exit(f"FAIL: peak RSS grew by {diff:.1f} MB")


if __name__ == "__main__":
    main()
