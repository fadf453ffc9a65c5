"""The checks of a job's files, run by services/jobs/validation.py in a process of their own (forked from a fork
server that has imported the core's readers once), which limits its own address space first and sends back the first
problem as a job error {code, message, param}, or None. No Celery, no database here.
"""

from __future__ import annotations

import os
import resource
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from services.jobs.logs import mask_secrets

OUT_OF_MEMORY = 3  # the exit status for a MemoryError


def check_files(
    model: str,
    training_file: str,
    validation_file: str | None,
    sample: int,
    *,
    allow_local: bool = True,
    max_image_bytes: int | None = None,
    method: str = "inversion_dpo",
    inversion_steps: int | None = None,
    max_bad_share: float = 0.01,
    read: list[str] | None = None,
) -> dict[str, Any] | None:
    """The first problem found as a job error, or None if the model and the datasets look right (its scheduler
    too: a schedule `method` cannot train, or an inversion grid of `inversion_steps` past the model's timesteps, is
    refused here, before any GPU). The first `sample` records of each dataset are read, judged by the job's
    max_bad_share; `read` gets one line per dataset saying how many."""
    # Imported here: the API imports this module and never needs pyarrow or PIL itself (the fork server preloads them).
    from invdpo_core.config import schedule_problem
    from invdpo_core.data import DatasetError, inspect_dataset
    from invdpo_core.storage import ModelReferenceError, check_model_reference, read_scheduler_config

    def check_model() -> None:
        check_model_reference(model, allow_local=allow_local)
        scheduler = read_scheduler_config(model)
        problem = schedule_problem(scheduler, method, inversion_steps) if scheduler is not None else None
        if problem is not None:
            raise ModelReferenceError("unsupported_model", f"base model {model}: {problem}")

    def check_dataset(param: str, uri: str) -> None:
        report = inspect_dataset(uri, sample=sample, max_bad_share=max_bad_share, max_image_bytes=max_image_bytes)
        skipped = f", {report.skipped_pairs} with unreadable images skipped" if report.skipped_pairs else ""
        if read is not None:
            read.append(f"{param}: {report.records} of {report.total_records} records read{skipped}")

    checks: list[tuple[str, Callable[[], object]]] = [("model", check_model)]
    checks.append(("training_file", lambda: check_dataset("training_file", training_file)))
    if validation_file is not None:
        checks.append(("validation_file", lambda: check_dataset("validation_file", validation_file)))
    for param, check in checks:
        try:
            check()
        except (DatasetError, ModelReferenceError) as exc:
            return {"code": str(exc.code), "message": mask_secrets(str(exc)), "param": param}
    return None


def run_in_child(conn: Connection, request: dict[str, Any], memory_bytes: int, env: dict[str, str], cwd: str) -> None:
    """The target of the validation process (forked from the fork server, see validation.py): take the API's
    current environment and directory, limit the address space, check, send ("verdict", (error or None, lines
    saying what was read)) or ("crash", traceback)."""
    os.environ.clear()
    os.environ.update(env)  # the fork server's own is from when it started
    os.chdir(cwd)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        read: list[str] = []
        conn.send(("verdict", (check_files(**request, read=read), read)))
    except MemoryError:
        sys.exit(OUT_OF_MEMORY)
    except Exception:  # a bug, not the data: the parent logs it with the job id (masked)
        conn.send(("crash", traceback.format_exc()))
