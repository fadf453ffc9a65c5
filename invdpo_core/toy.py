"""A toy preference task with a reward anyone can compute: "redder is better".

`toy_image_reward` scores an image; `make_toy_dataset` writes preference pairs whose winner is the image with the
higher reward, in either format `invdpo_core.data` reads. A model fine-tuned on them should drift towards red,
which the demo and the benchmarks measure without any learned reward model.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

TOY_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple heart",
    "an orange moon",
)
TOY_RESOLUTION = 64
TOY_STEPS = 4  # denoising steps: the untrained tiny UNet gains nothing from more
ROW_GROUP_SIZE = 16  # small row groups, so even a toy file exercises the row-group reader
# The Pick-a-Pic v2 columns; the readers use caption, jpg_0, jpg_1 and label_0.
_PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns", tz="UTC")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def toy_image_reward(image: Image.Image | np.ndarray) -> float:
    """Mean red minus mean blue, channels scaled to [0, 1]: a reward in [-1, 1]. Takes a PIL image or a uint8
    (H, W, 3) array."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {pixels.dtype} {pixels.shape}")
    return float(pixels[..., 0].mean() - pixels[..., 2].mean()) / 255.0


def _tint(image: np.ndarray, rng: random.Random) -> np.ndarray:
    # An untrained tiny pipeline draws grey-ish noise, so the two images of a pair would score alike. A seeded
    # shift along the red-blue axis makes their rewards clearly differ (and learnable from the pixels).
    shift = rng.uniform(-0.35, 0.35)
    out = image.copy()  # (H, W, 3) float in [0, 1]
    out[..., 0] += shift
    out[..., 2] -= shift
    return (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_toy_dataset(
    out: str | Path,
    pairs: int,
    fmt: Literal["jsonl", "parquet"] = "jsonl",
    seed: int = 0,
    kind: Literal["sd15", "sdxl"] = "sd15",
    model_dir: str | Path | None = None,
) -> Path:
    """Write `pairs` toy preference pairs: two 64 px images per prompt from different seeds, the redder one chosen.

    jsonl: OUT/manifest.jsonl + OUT/images/*.png. parquet: OUT/train-00000.parquet with Pick-a-Pic v2 columns
    (winners placed at jpg_0 or jpg_1 at random, so both label values occur). Images come from the tiny pipeline
    (`kind`) or the pipeline in `model_dir`. Returns the path to pass to the readers.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be one of 'jsonl', 'parquet', got {fmt!r}")
    import torch
    from diffusers import DiffusionPipeline

    from invdpo_core.testing import build_tiny_pipeline

    pipe = (
        DiffusionPipeline.from_pretrained(str(model_dir)) if model_dir else build_tiny_pipeline(kind=kind, seed=seed)
    )
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (out / "images").mkdir(exist_ok=True)

    records = []
    batch = 8  # pairs per pipeline call: 16 images
    for first in range(0, pairs, batch):
        ids = range(first, min(first + batch, pairs))
        prompts = [TOY_PROMPTS[i % len(TOY_PROMPTS)] for i in ids]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + 2 * i + k) for i in ids for k in (0, 1)]
        images = pipe(
            [p for p in prompts for _ in (0, 1)],
            generator=generators,
            num_inference_steps=TOY_STEPS,
            height=TOY_RESOLUTION,
            width=TOY_RESOLUTION,
            output_type="np",
        ).images  # (2B, H, W, 3) float in [0, 1]: image a then b of each pair
        for j, (i, prompt) in enumerate(zip(ids, prompts, strict=True)):
            a, b = _tint(images[2 * j], rng), _tint(images[2 * j + 1], rng)
            records.append((i, prompt, a, b, toy_image_reward(a), toy_image_reward(b)))

    if fmt == "jsonl":
        with open(out / "manifest.jsonl", "w") as f:
            for i, prompt, a, b, ra, rb in records:
                (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
                (out / "images" / f"{i:05d}_chosen.png").write_bytes(_encode(chosen, "PNG"))
                (out / "images" / f"{i:05d}_rejected.png").write_bytes(_encode(rejected, "PNG"))
                row = {
                    "prompt": prompt,
                    "chosen": f"images/{i:05d}_chosen.png",
                    "rejected": f"images/{i:05d}_rejected.png",
                    "chosen_reward": round(rc, 6),
                    "rejected_reward": round(rr, 6),
                }
                f.write(json.dumps(row) + "\n")
        return out / "manifest.jsonl"

    # Pick-a-Pic v2 shape. Ids are seeded UUIDs so the same seed writes the same file.
    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    model = str(model_dir) if model_dir else f"tiny-{kind}"
    created = datetime(2024, 1, 1, tzinfo=timezone.utc)
    columns: dict[str, list] = {name: [] for name in _PICKAPIC_SCHEMA.names}
    for i, prompt, a, b, ra, rb in records:
        if rng.random() < 0.5:  # the winner lands at either position, as in the real data
            a, b = b, a
        # Score what was stored: JPEG shifts colours a little, and the label must agree with the stored pixels.
        jpg_0, jpg_1 = _encode(a, "JPEG"), _encode(b, "JPEG")
        ra, rb = (toy_image_reward(Image.open(io.BytesIO(jpg))) for jpg in (jpg_0, jpg_1))
        label_0 = 1.0 if ra > rb else 0.0 if rb > ra else 0.5
        uids = (uid(), uid())
        row = {
            "are_different": True,
            "best_image_uid": uids[0] if label_0 == 1 else uids[1] if label_0 == 0 else "",
            "caption": prompt,
            "created_at": created + timedelta(minutes=i),
            "has_label": True,
            "image_0_uid": uids[0],
            "image_0_url": f"toy://{uids[0]}.jpg",
            "image_1_uid": uids[1],
            "image_1_url": f"toy://{uids[1]}.jpg",
            "jpg_0": jpg_0,
            "jpg_1": jpg_1,
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "model_0": model,
            "model_1": model,
            "ranking_id": i,
            "user_id": 0,
            "num_example_per_prompt": 1,
            "__index_level_0__": i,
        }
        for name, value in row.items():
            columns[name].append(value)
    path = out / "train-00000.parquet"
    pq.write_table(pa.table(columns, schema=_PICKAPIC_SCHEMA), path, row_group_size=ROW_GROUP_SIZE)
    return path
