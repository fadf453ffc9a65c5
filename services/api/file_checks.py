"""The checks of a job's files, run by services/api/validation.py in a child process of their own:

    echo '{"model": ..., "training_file": ..., "validation_file": ..., "sample": 8, "memory_bytes": N}' \\
        | python -m services.api.file_checks

prints the first problem as a job error {code, message, param}, or null. The process limits its own address space
to `memory_bytes` first. It imports only the core's readers (no Celery, no database): it starts in well under a
second on an idle machine.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from typing import Any

from services.api.security import mask_secrets

OUT_OF_MEMORY = 3  # the exit status for a MemoryError


def check_files(
    model: str,
    training_file: str,
    validation_file: str | None,
    sample: int,
    *,
    allow_local: bool = True,
    max_image_bytes: int | None = None,
) -> dict[str, Any] | None:
    """The first problem found as a job error, or None if the model and the datasets look right."""
    # Imported here: the API imports this module for OUT_OF_MEMORY and never needs pyarrow or PIL itself.
    from invdpo_core.data import DatasetError, inspect_dataset
    from invdpo_core.storage import ModelReferenceError, check_model_reference

    checks: list[tuple[str, Callable[[], object]]] = [
        ("model", lambda: check_model_reference(model, allow_local=allow_local))
    ]
    checks.append(
        ("training_file", lambda: inspect_dataset(training_file, sample=sample, max_image_bytes=max_image_bytes))
    )
    if validation_file is not None:
        checks.append(
            (
                "validation_file",
                lambda: inspect_dataset(validation_file, sample=sample, max_image_bytes=max_image_bytes),
            )
        )
    for param, check in checks:
        try:
            check()
        except (DatasetError, ModelReferenceError) as exc:
            return {"code": str(exc.code), "message": mask_secrets(str(exc)), "param": param}
    return None


def main() -> int:
    request = json.loads(sys.stdin.read())
    limit = int(request.pop("memory_bytes"))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        verdict = check_files(**request)
    except MemoryError:
        return OUT_OF_MEMORY
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
