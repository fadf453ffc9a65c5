"""API keys: only their sha256 is stored (services.jobs.keys, shared with the model server). (Masking credentials in
what we print or return: services.jobs.logs.)"""

from __future__ import annotations

import secrets

from services.jobs.keys import hash_key
from services.jobs.logs import KEY_PREFIX


def generate_key() -> tuple[str, str, str]:
    """A new key as (key, prefix, sha256). The key is shown once; the prefix names it in listings."""
    prefix = f"{KEY_PREFIX}-{secrets.token_hex(4)}"
    key = f"{prefix}-{secrets.token_urlsafe(32)}"
    return key, prefix, hash_key(key)
