"""Print the installed `invdpo` package's requirements for the given extras, minus the GPU training stack.

The API image validates jobs with the torch-free core (config, data, storage), so it installs everything the
package needs except torch and the libraries built on it. Reading the requirements from the package metadata
keeps pyproject.toml the only list of dependencies. Run after `pip install --no-deps .`:

    python deploy/docker/service_requirements.py service > requirements.txt
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

# The GPU training stack: only the worker image installs it.
GPU_STACK = {"torch", "diffusers", "transformers", "accelerate", "peft"}
EXTRA_CLAUSE = re.compile(r"""(\s+and\s+)?extra\s*==\s*["']([^"']+)["'](\s+and\s+)?""")


def service_requirements(extras: list[str]) -> list[str]:
    """Requirement lines of the base package plus `extras`, without the GPU stack; other markers are kept."""
    kept = []
    for requirement in requires("invdpo") or []:
        spec, _, marker = (part.strip() for part in requirement.partition(";"))
        extra = EXTRA_CLAUSE.search(marker)
        if extra:
            if extra.group(2) not in extras:
                continue
            marker = EXTRA_CLAUSE.sub("", marker, count=1).strip()
        name = re.match(r"[A-Za-z0-9._-]+", spec)
        if name is None or re.sub(r"[-_.]+", "-", name.group(0)).lower() in GPU_STACK:
            continue
        kept.append(f"{spec}; {marker}" if marker else spec)
    return kept


if __name__ == "__main__":
    print("\n".join(service_requirements(sys.argv[1:])))
