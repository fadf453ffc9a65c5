"""Dynamic batching of the model server: images/s and latency at concurrency 1, 4 and 8, batching on and off.

Drives the server's own batcher (services/serving/batching.py) and generation (ServedModel.generate, the call a
request ends in) on the tiny SD1.5-shaped model on the CPU: `concurrency` clients each send requests back to
back (one image, a fixed number of steps). "off" is max_batch_size 1 (one pipeline call per image); "on" is
max_batch_size 8 with max_wait_ms 20, the server's defaults. HTTP, JSON and the API key lookup are left out:
they cost the same with and without batching, and would be measured on the same two cores as the model.

    .venv/bin/python benchmarks/serving.py                    # 8 requests per client, 10 steps
    .venv/bin/python benchmarks/serving.py --requests 16 --steps 20 --threads 2

Prints a table (median round per setting) and the ratio on/off per concurrency; writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from invdpo_core.testing import build_tiny_pipeline  # noqa: E402
from services.serving.batching import Batcher  # noqa: E402
from services.serving.metrics import Metrics  # noqa: E402
from services.serving.models import ModelSlot, ServedModel  # noqa: E402

CONCURRENCY = (1, 4, 8)
MODES = {"off": (1, 0.0), "on": (8, 20.0)}  # (max_batch_size, max_wait_ms)


async def run(served: ServedModel, concurrency: int, batch_size: int, wait_ms: float, requests: int, steps: int):
    """(images/s, latencies in s, mean images per pipeline call, images per CPU second of this process) for
    `concurrency` clients of `requests` each."""
    metrics = Metrics()
    slot = ModelSlot("tiny", "champion", current=served)
    batcher = Batcher(slot, batch_size, wait_ms, max_queue=64, metrics=metrics)
    loop_task = asyncio.create_task(batcher.run())
    latencies: list[float] = []

    async def client(index: int) -> None:
        for i in range(requests):
            started = time.perf_counter()
            await batcher.submit(f"a red apple {index}-{i}", 1, index * 1000 + i, steps, served.resolution)
            latencies.append(time.perf_counter() - started)

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    loop_task.cancel()
    calls = metrics.registry.get_sample_value("invdpo_serving_batch_images_count", {"model": "tiny"}) or 1
    return len(latencies) / elapsed, latencies, len(latencies) / calls, len(latencies) / cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every setting; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_tiny_pipeline("sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    served = ServedModel(name="tiny", version=1, pipe=pipe, resolution=64, steps=args.steps, project_id=None)
    served.generate(["warm-up"] * 8, list(range(8)), 1, 64)

    # Rounds interleave the settings, so a change in the machine's load (shared cores) hits every one of them.
    runs: dict[tuple[int, str], list[tuple[float, list[float], float, float]]] = {}
    for _ in range(args.rounds):
        for concurrency in CONCURRENCY:
            for mode, (batch_size, wait_ms) in MODES.items():
                result = asyncio.run(run(served, concurrency, batch_size, wait_ms, args.requests, args.steps))
                runs.setdefault((concurrency, mode), []).append(result)
    rows = []
    print(
        f"tiny SD1.5-shaped model, CPU, {args.threads} torch thread(s), {args.steps} steps, 64x64, 1 image/request, "
        f"{args.requests} requests per client, median of {args.rounds} rounds"
    )
    print(
        f"{'concurrency':>11} {'batching':>8} {'images/s':>9} {'p50 s':>7} {'p99 s':>7} {'images/call':>11} "
        f"{'images/CPU-s':>12}"
    )
    for (concurrency, mode), results in runs.items():
        rate, latencies, per_call, per_cpu = sorted(results, key=lambda r: r[0])[len(results) // 2]
        row = {
            "concurrency": concurrency, "batching": mode, "images_per_s": rate,
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99),
            "images_per_call": per_call, "images_per_cpu_s": statistics.median(r[3] for r in results),
            "images_per_s_rounds": [r[0] for r in results],
        }  # fmt: skip
        rows.append(row)
        print(
            f"{concurrency:>11} {mode:>8} {rate:>9.2f} {row['p50_s']:>7.3f} {row['p99_s']:>7.3f} {per_call:>11.1f} "
            f"{row['images_per_cpu_s']:>12.2f}"
        )
    # The cores are shared with other jobs: wall-time rates swing between rounds. The ratio within each round (on
    # and off ran back to back) and the ratio of CPU time (what this process used) are steadier.
    print()
    for concurrency in CONCURRENCY:
        off, on = runs[(concurrency, "off")], runs[(concurrency, "on")]
        wall = statistics.median(a[0] / b[0] for a, b in zip(on, off, strict=True))
        cpu = statistics.median(r[3] for r in on) / statistics.median(r[3] for r in off)
        p50 = statistics.median(
            statistics.median(a[1]) / statistics.median(b[1]) for a, b in zip(on, off, strict=True)
        )
        print(
            f"concurrency {concurrency}: batching on/off throughput {wall:.2f}x (wall, median of per-round ratios), "
            f"{cpu:.2f}x (images per CPU second); p50 latency {p50:.2f}x"
        )
    out = ROOT / "benchmarks" / "results" / "serving.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
