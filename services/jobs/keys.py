"""API keys are stored as their sha256 only: the API checks a key by it, and so does the model server."""

from __future__ import annotations

import hashlib


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
