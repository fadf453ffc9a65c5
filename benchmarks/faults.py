"""Faults of a real cluster injected into the real stack on loopback (API, Celery worker, PostgreSQL, Redis, moto
S3, MLflow; the tiny model, 30-40 steps of 64 px): for each fault during training, the job's outcome, the steps
trained twice (lost: trained after the last stored checkpoint) and the seconds from the fault until the job
reported a new step; for each cancel or SIGTERM, the seconds until the job was `cancelled` or queued again.

    python benchmarks/faults.py     # runs the fault-injection tests and prints their figures (~10-20 min)

It runs tests/worker/test_faults.py and the whole-worker SIGKILL test of tests/worker/test_worker_e2e.py with
INVDPO_FAULTS_REPORT set, so the figures are those of the asserted runs. The worker runs with the tests' short
timings (heartbeat every 1 s, presumed dead after 6 s, reconciler every 1 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/worker/test_faults.py",
    "tests/worker/test_worker_e2e.py::test_sigkill_of_the_worker_then_a_new_worker_resumes_from_the_last_checkpoint",
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "INVDPO_FAULTS_REPORT": str(report), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        status = subprocess.run([sys.executable, "-m", "pytest", "-m", "slow", "-q", *TESTS], cwd=ROOT, env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    print(f"\n{'fault':56} {'outcome':10} {'steps lost':>10} {'s to progress':>13} {'s to stopped':>12}")
    for row in rows:
        stopped = row.get("seconds_to_cancelled", row.get("seconds_to_requeued", ""))
        lost, progress = row.get("steps_lost", ""), row.get("seconds_to_progress", "")
        print(f"{row['fault']:56} {row['outcome']:10} {lost:>10} {progress:>13} {stopped:>12}")
    if status.returncode:
        print(f"\nsome fault tests failed (pytest exit {status.returncode}): see the output above", file=sys.stderr)
    return status.returncode


if __name__ == "__main__":
    sys.exit(main())
