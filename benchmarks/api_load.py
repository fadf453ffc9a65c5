"""Load on the job API: create and get at a fixed concurrency against PostgreSQL, on loopback.

Starts its own redis-server and uvicorn (the real `services.api.main:app`) on free ports, against a fresh
PostgreSQL database it drops afterwards, then drives POST /v1/fine_tuning/jobs and GET /v1/fine_tuning/jobs/{id}
with `--concurrency` client tasks (httpx, async) for `--seconds`, and prints req/s and p50/p99 per endpoint.

    .venv/bin/python benchmarks/api_load.py                      # 32 clients, 20 s, 1 uvicorn worker
    .venv/bin/python benchmarks/api_load.py --workers 2 --create-share 0.1
    .venv/bin/python benchmarks/api_load.py --rate 300                   # latency at a given throughput

Each create really validates its files (a model directory with model_index.json and a two-image JSONL dataset)
and enqueues to Redis, as in production. The load generator runs on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.admin import create_api_key  # noqa: E402
from services.jobs.db import make_engine, make_session_factory, migrate  # noqa: E402

JOBS = "/v1/fine_tuning/jobs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_inputs(root: Path) -> tuple[str, str]:
    """A model reference that resolves (model_index.json) and a valid one-pair JSONL dataset."""
    model = root / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "a.png")
    Image.new("RGB", (64, 64), (40, 40, 200)).save(root / "b.png")
    (root / "manifest.jsonl").write_text('{"prompt": "red", "chosen": "a.png", "rejected": "b.png"}\n')
    return str(model), str(root / "manifest.jsonl")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far, from /proc (Linux)."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"uvicorn exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the API did not become ready")


async def drive(
    url: str, headers: dict[str, str], body: dict, job_ids: list[str], args: argparse.Namespace
) -> tuple[dict[str, list[float]], float]:
    """Closed loop (each of `concurrency` clients sends its next request when the last one answers), or with
    --rate an open loop: requests are due at a fixed rate, at most `concurrency` in flight, and latency counts from
    when a request was due (so a slow server cannot hide its queueing: no coordinated omission)."""
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: Counter[tuple[str, int]] = Counter()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:

        async def one_request(due: float) -> None:
            if rng.random() < args.create_share:
                name, r = "POST /jobs", await client.post(JOBS, json=body)
                if r.status_code == 201:
                    job_ids.append(r.json()["id"])
            else:
                name, r = "GET /jobs/{id}", await client.get(f"{JOBS}/{rng.choice(job_ids)}")
            latencies[name].append(time.perf_counter() - due)
            statuses[(name, r.status_code)] += 1

        began = time.perf_counter()
        deadline = began + args.seconds
        if args.rate is None:

            async def one_client() -> None:
                while time.perf_counter() < deadline:
                    await one_request(time.perf_counter())

            await asyncio.gather(*(one_client() for _ in range(args.concurrency)))
        else:
            in_flight = asyncio.Semaphore(args.concurrency)
            tasks = []

            async def bounded(due: float) -> None:
                async with in_flight:
                    await one_request(due)

            start = time.perf_counter()
            for i in range(int(args.rate * args.seconds)):
                due = start + i / args.rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.create_task(bounded(due)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began  # longer than --seconds when the server fell behind the rate
    for (name, status), n in sorted(statuses.items()):
        print(f"  {name:16s} HTTP {status}: {n}")
    return latencies, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--create-share", type=float, default=0.2, help="share of requests that create a job")
    parser.add_argument("--rate", type=float, help="open loop: requests per second (default: closed loop)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432", help="server URL, no db")
    parser.add_argument("--log-level", default="INFO", help="INVDPO_LOG_LEVEL of the server (INFO: access logs on)")
    args = parser.parse_args()

    db_name = f"invdpo_api_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{args.pg}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    redis_port, api_port = free_port(), free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    api_proc = None
    try:
        with tempfile.TemporaryDirectory(prefix="invdpo-bench-") as tmp:
            model, dataset = write_inputs(Path(tmp))
            db_url = f"{args.pg}/{db_name}"
            engine = make_engine(db_url)
            migrate(engine)
            with make_session_factory(engine)() as session:
                key, _ = create_api_key(session, "bench")
            engine.dispose()
            env = {
                **os.environ,
                "INVDPO_DATABASE_URL": db_url,
                "INVDPO_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
                "INVDPO_MAX_ACTIVE_JOBS_PER_PROJECT": "10000000",
                "INVDPO_RECONCILE_INTERVAL_SECONDS": "0",
                "INVDPO_LOG_LEVEL": args.log_level,
            }
            cmd = [sys.executable, "-m", "uvicorn", "services.api.main:app", "--host", "127.0.0.1"]
            cmd += ["--port", str(api_port), "--workers", str(args.workers), "--no-access-log"]
            api_proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{api_port}"
            wait_ready(url, api_proc)
            headers = {"Authorization": f"Bearer {key}"}
            body = {
                "model": model,
                "training_file": dataset,
                "method": {"type": "inversion_dpo", "hyperparameters": {"max_steps": 100}},
            }
            job_ids = [httpx.post(f"{url}{JOBS}", json=body, headers=headers).json()["id"] for _ in range(50)]
            loop = "closed loop" if args.rate is None else f"open loop at {args.rate:.0f} req/s"
            print(
                f"{args.concurrency} clients ({loop}) for {args.seconds:.0f} s, {args.create_share:.0%} creates, "
                f"{args.workers} uvicorn worker(s), PostgreSQL + Redis on loopback, {os.cpu_count()} CPUs "
                "(shared with the load generator and anything else running)"
            )
            cpu_before = cpu_seconds(api_proc.pid)
            latencies, elapsed = asyncio.run(drive(url, headers, body, job_ids, args))
            server_cpu = cpu_seconds(api_proc.pid) - cpu_before
            print(f"{'endpoint':16s} {'requests':>9s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
            for name, values in sorted(latencies.items()):
                values.sort()
                p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
                print(
                    f"{name:16s} {len(values):9d} {len(values) / elapsed:8.1f} "
                    f"{statistics.median(values) * 1000:8.1f} {p99 * 1000:8.1f}"
                )
            total = sum(len(v) for v in latencies.values())
            print(f"{'all':16s} {total:9d} {total / elapsed:8.1f}   ({elapsed:.1f} s)")
            # Independent of how busy the machine was: what one request costs the server.
            share = server_cpu / elapsed
            per_request = server_cpu / total * 1000
            print(f"server CPU: {server_cpu:.1f} s ({share:.0%} of one core), {per_request:.2f} ms/request")
    finally:
        if api_proc is not None:
            api_proc.terminate()
            api_proc.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
