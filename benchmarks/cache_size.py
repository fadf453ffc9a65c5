"""Bytes of one inversion cache entry per pair at SD1.5 512 px and SDXL 1024 px, and the total for Pick-a-Pic v2.

The size comes from the entry layout (invdpo_core/inversion_cache.py `layout_bytes`) with the real models' latent
shapes, read from the real UNet and VAE configs of tests/core/test_real_config.py (latent side = VAE sample size /
2^(VAE blocks - 1), channels = the UNet's in_channels). The formula is checked first against the tiny model: for every
target, storage dtype and kept-point count, the tensors of each entry a disk cache wrote with torch.save are exactly
the formula's bytes at the tiny latent shape (4x8x8). Also printed: the layout before issue 20 (x_t^w, x_t^l,
target_w, target_l at all N points in float32, plus the errors and the grid), for comparison.

    python benchmarks/cache_size.py            # writes benchmarks/results/cache_size.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's invdpo_core and tests, whatever is installed

from invdpo_core.config import TrainingConfig  # noqa: E402
from invdpo_core.data import PreferencePair  # noqa: E402
from invdpo_core.inversion import TARGETS, build_inverted_pairs, encode_prompts, inversion_grid, pair_coin  # noqa: E402
from invdpo_core.inversion_cache import InversionCache, entry_bytes, layout_bytes  # noqa: E402
from invdpo_core.testing import build_tiny_pipeline  # noqa: E402
from tests.core.test_real_config import SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE  # noqa: E402

PICK_A_PIC_PAIRS = 851_293  # train split rows without ties (docs/method.md)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GOAL = 256 * 1024  # bytes per pair, SD1.5 512 px, default settings (issue 20)


def latent_shape(unet: dict, vae: dict) -> tuple[int, int, int]:
    side = vae["sample_size"] // 2 ** (len(vae["block_out_channels"]) - 1)
    assert side == unet["sample_size"], (side, unet["sample_size"])
    return unet["in_channels"], side, side


def old_layout_bytes(n: int, shape: tuple[int, int, int]) -> int:
    """Before issue 20: x_t^w, x_t^l, target_w, target_l (n latents each) in float32, the two errors (n,) in float32
    and the grid (n,) in int64."""
    return 4 * n * shape[0] * shape[1] * shape[2] * 4 + 2 * n * 4 + n * 8


def check_tiny() -> int:
    """Every target x dtype x kept points: the tiny model's saved entries hold exactly layout_bytes. Returns checks."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    n = 6
    g = torch.Generator().manual_seed(0)
    z_w, z_l = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    prompts = ["a red circle", "a blue square"]
    cond = encode_prompts(pipe, prompts, device=torch.device("cpu"), resolution=64)
    pairs = [PreferencePair(p, f"w{i}".encode(), f"l{i}".encode(), f"m.jsonl line {i}") for i, p in enumerate(prompts)]
    grid = inversion_grid(pipe.scheduler.config, n)
    checks = 0
    with tempfile.TemporaryDirectory() as tmp:
        for target in TARGETS:
            built = build_inverted_pairs(
                pipe.unet, pipe.scheduler.config, z_w, z_l, cond, target=target, num_steps=n,
                use_winner_noise=pair_coin(0, [p.key for p in pairs]),
            )  # fmt: skip

            def invert(batch, caps, built=built):  # type: ignore[no-untyped-def]
                return built, z_w, z_l

            for dtype in DTYPES:
                for m in (0, 1, 4):
                    directory = Path(tmp) / f"{target}-{dtype}-{m}"
                    cache = InversionCache(
                        "disk", str(directory), invert, identity="size", target=target,
                        dtype=DTYPES[dtype], points_per_pair=m, seed=0, grid=grid.timesteps,
                        abar=grid.alphas_cumprod[grid.timesteps], device=torch.device("cpu"),
                    )  # fmt: skip
                    cache.invert(pairs, prompts)
                    for path in sorted(directory.glob("*.pt")):
                        measured = entry_bytes(torch.load(path, weights_only=True))
                        expected = layout_bytes(target, m or n, (4, 8, 8), DTYPES[dtype])
                        assert measured == expected, (target, dtype, m, measured, expected)
                        checks += 1
    return checks


def main() -> int:
    checks = check_tiny()
    print(f"tiny model: {checks} saved entries (4 targets x 3 dtypes x M in 0, 1, 4, 2 pairs) hold exactly the "
          "layout's bytes")  # fmt: skip
    defaults = TrainingConfig(base_model="m", dataset="d")
    n, m, dtype, target = (
        defaults.inversion_steps, defaults.inversion_points_per_pair, defaults.inversion_cache_dtype,
        defaults.inversion_target,
    )  # fmt: skip
    kept = m if 0 < m < n else n
    print(f"defaults: target {target}, inversion_steps N={n}, inversion_points_per_pair M={m} (keeps {kept}), "
          f"inversion_cache_dtype {dtype}\n")  # fmt: skip
    models = {"SD1.5 512 px": latent_shape(SD15_UNET, SD_VAE), "SDXL 1024 px": latent_shape(SDXL_UNET, SDXL_VAE)}
    rows = []
    settings = [("before issue 20", None, None, n)] + [
        (f"{target} {d} M={k}", target, d, k) for target in ("paired", "x0", "step") for d in ("fp32", "fp16")
        for k in (n, 8, 5, 4, 2)
    ]  # fmt: skip
    header = f"{'setting':24s}" + "".join(f"{name + ' per pair':>22s}{'x 851,293 pairs':>17s}" for name in models)
    print(header)
    for label, tgt, d, k in settings:
        line = f"{label:24s}"
        row: dict = {"setting": label, "target": tgt, "dtype": d, "points": k}
        for name, shape in models.items():
            size = old_layout_bytes(k, shape) if tgt is None else layout_bytes(tgt, k, shape, DTYPES[d])
            row[name] = {"bytes_per_pair": size, "total_bytes": size * PICK_A_PIC_PAIRS, "latent_shape": shape}
            line += f"{size / 1024:>18,.1f} KiB{size * PICK_A_PIC_PAIRS / 1e12:>14.2f} TB"
        rows.append(row)
        print(line)
    default_sizes = {name: layout_bytes(target, kept, shape, DTYPES[dtype]) for name, shape in models.items()}
    sd15 = default_sizes["SD1.5 512 px"]
    print(
        f"\ndefault settings: SD1.5 512 px {sd15 / 1024:,.1f} KiB per pair (goal <= 256 KiB: "
        f"{'met' if sd15 <= GOAL else 'MISSED'}), {sd15 * PICK_A_PIC_PAIRS / 1e9:,.0f} GB for {PICK_A_PIC_PAIRS:,} "
        f"pairs; SDXL 1024 px {default_sizes['SDXL 1024 px'] / 1024:,.1f} KiB per pair, "
        f"{default_sizes['SDXL 1024 px'] * PICK_A_PIC_PAIRS / 1e9:,.0f} GB"
    )
    out = ROOT / "benchmarks" / "results" / "cache_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "tiny_checks": checks,
        "pairs": PICK_A_PIC_PAIRS,
        "defaults": {"target": target, "inversion_steps": n, "points_per_pair": m, "dtype": dtype},
        "default_bytes_per_pair": default_sizes,
        "goal_bytes_sd15": GOAL,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
