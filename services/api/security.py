"""API keys (only their sha256 is stored) and the masking of credentials in anything we print or return."""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "invdpo"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key() -> tuple[str, str, str]:
    """A new key as (key, prefix, sha256). The key is shown once; the prefix names it in listings."""
    prefix = f"{KEY_PREFIX}-{secrets.token_hex(4)}"
    key = f"{prefix}-{secrets.token_urlsafe(32)}"
    return key, prefix, hash_key(key)


# Each pattern keeps its first group and replaces the secret after it with ***.
_SECRET_PATTERNS = [
    # scheme://user:password@host (database, broker and S3 URLs)
    re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+(?=@)"),
    # signed URLs and query-string credentials
    re.compile(
        r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token"
        r"|password|secret|api_key|apikey|key)=)[^&\s\"']+"
    ),
    # key=value / key: value in messages and reprs (aws_secret_access_key, password, token, ...)
    re.compile(
        r"(?i)((?:aws_secret_access_key|aws_session_token|secret_access_key|secret|password|passwd|token"
        r"|authorization)[\"']?\s*[=:]\s*[\"']?(?:bearer\s+)?)[^\s\"',;&}]+"
    ),
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    # AWS access key ids and our own API keys
    re.compile(r"((?:AKIA|ASIA))[0-9A-Z]{16}"),
    re.compile(rf"({KEY_PREFIX}-[0-9a-f]{{8}}-)[A-Za-z0-9_\-]+"),
]


# Every pattern above needs one of these (lower-cased); most log lines have none, and skip the regexes.
_TRIGGERS = ("@", "=", "secret", "passw", "token", "authorization", "bearer", "akia", "asia", f"{KEY_PREFIX}-")


def mask_secrets(text: str) -> str:
    """`text` with every credential-looking value replaced by ***; used on log lines and user-facing errors."""
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def has_credentials(uri: str) -> bool:
    """True if `uri` embeds a password (scheme://user:pass@host): workers bring their own credentials."""
    return bool(_SECRET_PATTERNS[0].search(uri)) or bool(_SECRET_PATTERNS[1].search(uri))
