"""Where models and datasets live: local paths, s3:// prefixes (any S3-compatible store) and Hugging Face hub ids.

No torch here: the API checks a job's references with this module before any GPU is spent.
The S3 endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION...), which boto3 reads itself. An s3:// URI without a file name is a
"directory": `s3://bucket/models/tiny` means every key under `models/tiny/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# S3 bucket naming rules (3-63 chars, lower case, digits, dots, hyphens), loosely: the store has the final say.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# A hub id is `org/name`; diffusers' from_pretrained accepts the same form. Like the hub, neither part starts with
# a dot or a hyphen, so `../data` or `./models` is never taken for one.
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.\-]*/[A-Za-z0-9_][\w.\-]*$")
# Env variables that change which store a client talks to; the client cache is keyed on them.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


class ModelReferenceError(ValueError):
    """The base model does not resolve. `code` is machine-readable, the message is one user-facing line."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class StorageError(OSError):
    """An S3 request failed for a reason other than a missing object. `code`: "forbidden", "unreachable" or
    "s3_error". A missing object or bucket raises FileNotFoundError instead."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"). The key prefix may be empty (the bucket root)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    return bucket, key.strip("/")


def normalise_prefix(prefix: str) -> str:
    """`s3://bucket/a/b/` -> `s3://bucket/a/b`: how allowed prefixes are stored and compared. ValueError unless
    it is an s3:// URI with a valid bucket and no `..`."""
    bucket, key = split_s3(prefix.strip())
    if ".." in key.split("/"):
        raise ValueError(f"prefix must not contain '..': {prefix!r}")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def within_prefixes(uri: str, prefixes: list[str]) -> bool:
    """True if the s3 URI `uri` lies under one of `prefixes` (whole path segments: `s3://b/team` admits
    `s3://b/team/x`, never `s3://b/team2/x`). Local paths and URIs with `..` are never within."""
    if not is_s3(uri):
        return False
    try:
        bucket, key = split_s3(uri)
    except ValueError:
        return False
    if ".." in key.split("/"):
        return False
    for prefix in prefixes:
        p_bucket, p_key = split_s3(normalise_prefix(prefix))
        if bucket == p_bucket and (not p_key or key == p_key or key.startswith(p_key + "/")):
            return True
    return False


def _join(uri: str, name: str) -> str:
    return posixpath.join(uri, name) if is_s3(uri) else str(Path(uri) / name)


@lru_cache(maxsize=8)
def _client(env: tuple[str | None, ...]) -> Any:
    # `env` is only the cache key: boto3 reads the variables itself. Creating a client costs ~50 ms, and the
    # JSONL reader fetches one object per image, so one client per configuration is reused (clients are
    # thread-safe).
    config = Config(
        s3={"addressing_style": "path"},  # local stores (moto, MinIO, Ceph) have no per-bucket DNS names
        # boto3 >= 1.36 adds CRC checksums by default, which several S3-compatible stores reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Ride out store outages of about a minute (connection refused or reset, 5xx, throttling): standard mode
        # retries them with jittered exponential backoff up to 20 s apart; max_attempts counts the first try.
        retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "12"))},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


def s3_client() -> Any:
    """A boto3 S3 client for the store named by the AWS environment variables (path-style, no default CRCs)."""
    return _client(tuple(os.environ.get(k) for k in _CLIENT_ENV))


def _storage_error(uri: str, exc: Exception) -> OSError:
    """Map a boto error to FileNotFoundError or StorageError, one line naming the URI only (never credentials)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            what = "bucket does not exist" if code == "NoSuchBucket" else "no such object"
            return FileNotFoundError(f"{uri}: {what}")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError("forbidden", f"{uri}: access denied ({code})")
        return StorageError("s3_error", f"{uri}: S3 error {code}")
    # BotoCoreError: endpoint unreachable, no credentials... The class name says which without any secret.
    return StorageError("unreachable", f"{uri}: cannot reach S3 ({type(exc).__name__})")


def _list_keys(bucket: str, prefix: str) -> list[dict[str, Any]]:
    paginator = s3_client().get_paginator("list_objects_v2")
    objects: list[dict[str, Any]] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        objects.extend(o for o in page.get("Contents", []) if not o["Key"].endswith("/"))  # skip folder markers
    return objects


def _list_s3(uri: str) -> tuple[str, str, list[dict[str, Any]]]:
    """Objects under an s3 "directory" (never `models/tiny2/` for `models/tiny`), or the single object named."""
    bucket, key = split_s3(uri)
    try:
        objects = _list_keys(bucket, key + "/" if key else "")
        if not objects and key:
            head = s3_client().head_object(Bucket=bucket, Key=key)
            objects = [{"Key": key, "Size": head["ContentLength"], "ETag": head.get("ETag", "")}]
            key = posixpath.dirname(key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return bucket, key, []
        raise _storage_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _storage_error(uri, exc) from None
    return bucket, key, objects


def list_files(uri: str) -> list[str]:
    """Every file under a local directory or s3 prefix (full paths / s3:// URIs, sorted); [uri] for one file;
    [] if nothing is there."""
    if is_s3(uri):
        bucket, _, objects = _list_s3(uri)
        return sorted(f"s3://{bucket}/{o['Key']}" for o in objects)
    path = Path(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    return []


def exists(uri: str) -> bool:
    """A local file/dir, an s3 object, or a non-empty s3 prefix."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    if not key:
        try:
            s3_client().head_bucket(Bucket=bucket)
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise _storage_error(uri, exc) from None
        except BotoCoreError as exc:
            raise _storage_error(uri, exc) from None
    try:
        return bool(_list_s3(uri)[2])
    except FileNotFoundError:  # the bucket itself is missing
        return False


class TooLargeError(ValueError):
    """An object is larger than the caller's read limit; the message names the object and the limit."""


def format_bytes(n: int) -> str:
    """1 GiB, 32 MiB, 512 KiB or 100 bytes: how limits are named in messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _too_large(uri: str, max_bytes: int) -> TooLargeError:
    return TooLargeError(f"{uri}: larger than the {format_bytes(max_bytes)} limit")


def read_bytes(uri: str, *, max_bytes: int) -> bytes:
    """The content of a local file or an s3 object, at most `max_bytes` (TooLargeError beyond: never an unbounded
    read, whatever the object's size). Local paths must be regular files (not /dev/zero, a FIFO or a directory).
    Raises FileNotFoundError, StorageError for S3, OSError for local files."""
    if not is_s3(uri):
        # O_NONBLOCK: opening a FIFO must not wait for a writer; a non-regular file is refused before any read.
        fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{uri}: not a regular file")
            data = f.read(max_bytes + 1)
    else:
        bucket, key = split_s3(uri)
        try:
            # One byte past the limit tells "exactly at the limit" from "larger" without asking for the size.
            response = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            data = response["Body"].read(max_bytes + 1)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) == "InvalidRange":  # an empty object
                return b""
            raise _storage_error(uri, exc) from None
        except BotoCoreError as exc:
            raise _storage_error(uri, exc) from None
    if len(data) > max_bytes:
        raise _too_large(uri, max_bytes)
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write a local file atomically (a reader sees the whole file or none: a unique temporary name, then a rename)
    or put an s3 object (atomic in S3). Parent directories are made. Raises StorageError for S3, OSError locally."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(uri, exc) from None
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _S3RangeReader(io.RawIOBase):
    """A seekable read-only view of one s3 object: every read is one ranged GET, unbuffered, so pyarrow fetches a
    parquet footer or one row group's column chunks and nothing else."""

    def __init__(self, uri: str, size: int | None = None):
        self.uri = uri
        self._bucket, self._key = split_s3(uri)
        if size is None:
            try:
                size = int(s3_client().head_object(Bucket=self._bucket, Key=self._key)["ContentLength"])
            except (ClientError, BotoCoreError) as exc:
                raise _storage_error(uri, exc) from None
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        # One GET for the whole request (RawIOBase's default readall would loop in 8 KB requests).
        n = self.size - self._pos if size is None or size < 0 else min(size, self.size - self._pos)
        if n <= 0:
            return b""
        try:
            response = s3_client().get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{self._pos + n - 1}"
            )
            data: bytes = response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(self.uri, exc) from None
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_s3(uri: str, size: int | None = None) -> io.RawIOBase:
    """A seekable binary file over an s3 object, fetched lazily: each read is one ranged GET. Pass `size` if known
    to save the HEAD request."""
    return _S3RangeReader(uri, size)


def download_prefix(uri: str, dest_dir: str | Path) -> Path:
    """Copy every file under `uri` (s3 prefix or local directory) into `dest_dir`, keeping relative paths.
    Returns `dest_dir`. Raises FileNotFoundError if there is nothing under `uri`."""
    dest = Path(dest_dir)
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        shutil.copytree(uri, dest, dirs_exist_ok=True)
        return dest
    bucket, key, objects = _list_s3(uri)
    if not objects:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    client = s3_client()
    for obj in objects:
        rel = posixpath.relpath(obj["Key"], key) if key else obj["Key"]
        if rel.startswith("..") or rel.startswith("/"):  # a hostile key must not write outside dest
            raise StorageError("s3_error", f"s3://{bucket}/{obj['Key']}: key escapes the download directory")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(bucket, obj["Key"], str(target))
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"s3://{bucket}/{obj['Key']}", exc) from None
    return dest


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Upload every file under `local_dir` to the s3 prefix `uri` (or copy it to a local directory)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    if not is_s3(uri):
        shutil.copytree(src, uri, dirs_exist_ok=True)
        return
    bucket, key = split_s3(uri)
    client = s3_client()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = posixpath.join(key, path.relative_to(src).as_posix()) if key else path.relative_to(src).as_posix()
        try:
            client.upload_file(str(path), bucket, target)
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"s3://{bucket}/{target}", exc) from None
        except S3UploadFailedError as exc:  # upload_file wraps ClientError in this
            raise StorageError(
                "s3_error", f"s3://{bucket}/{target}: upload failed ({str(exc).split(':')[0]})"
            ) from None


def delete_prefix(uri: str) -> None:
    """Delete every file under the s3 prefix `uri` taken as a directory (never `ckpt-10/` for `ckpt-1`), or the
    local directory. Nothing there is not an error."""
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"{uri}: refusing to delete a whole bucket")
    try:
        objects = _list_keys(bucket, key.rstrip("/") + "/")
        for start in range(0, len(objects), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": o["Key"]} for o in objects[start : start + 1000]]
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    except (ClientError, BotoCoreError) as exc:
        raise _storage_error(uri, exc) from None


def is_hub_id(uri: str) -> bool:
    """`org/name` as the Hugging Face hub spells repository ids (no `..`, no leading dot or hyphen)."""
    return bool(_HUB_ID.match(uri)) and ".." not in uri


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_reference(uri: str, *, allow_local: bool = True) -> None:
    """Raise ModelReferenceError unless `uri` names a diffusers pipeline: a local directory or s3 prefix that
    holds model_index.json, or a hub id `org/name` (looked up on the hub, or in the local cache when
    HF_HUB_OFFLINE is set). With allow_local=False the local disk is never looked at: a hub-id-shaped name is a hub
    id even if a directory of that name exists, so a job cannot probe which directories the host has."""
    if not uri or not uri.strip():
        raise ModelReferenceError("bad_model_reference", "base model is empty")
    if is_s3(uri):
        try:
            split_s3(uri)
            found = exists(_join(uri, "model_index.json"))
        except ValueError as exc:
            raise ModelReferenceError("bad_model_reference", f"base model: {exc}") from None
        except StorageError as exc:
            code = "model_forbidden" if exc.code == "forbidden" else "model_unreachable"
            raise ModelReferenceError(code, f"base model {exc}") from None
        if not found:
            raise ModelReferenceError("model_not_found", f"base model {uri}: no model_index.json under this prefix")
        return
    path = Path(uri).expanduser()
    # A local directory wins over a hub id of the same spelling, as in diffusers' from_pretrained.
    if allow_local and path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelReferenceError(
                "model_not_found", f"base model {uri}: directory has no model_index.json (not a diffusers pipeline)"
            )
        return
    if not is_hub_id(uri):
        where = "no such directory, and not" if allow_local else "not an s3:// URI nor"
        raise ModelReferenceError("model_not_found", f"base model {uri}: {where} a hub id of the form org/name")
    from huggingface_hub import file_exists, try_to_load_from_cache

    if _hub_offline():
        if not isinstance(try_to_load_from_cache(uri, "model_index.json"), str):
            raise ModelReferenceError(
                "model_not_cached", f"base model {uri}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            )
        return
    try:
        found = file_exists(uri, "model_index.json")
    except Exception as exc:  # network, gated repo, rate limit...: the class name says which, without secrets
        raise ModelReferenceError(
            "model_unreachable", f"base model {uri}: hub lookup failed ({type(exc).__name__})"
        ) from None
    if not found:
        raise ModelReferenceError("model_not_found", f"base model {uri}: no diffusers pipeline on the hub")


def read_scheduler_config(uri: str) -> dict[str, Any] | None:
    """The pipeline's scheduler/scheduler_config.json (local directory or s3 prefix); None for a hub id or when
    the pipeline has none (the trainer checks it again once loaded)."""
    name = "scheduler/scheduler_config.json"
    try:
        if is_s3(uri):
            # A scheduler config is a few hundred bytes: 1 MiB bounds a hostile object.
            return json.loads(read_bytes(_join(uri, name), max_bytes=1 << 20)) if exists(_join(uri, name)) else None
        path = Path(uri).expanduser() / name
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:
        raise ModelReferenceError("bad_model_reference", f"base model {uri}: {name}: {exc}") from None


def resolve_model(uri: str, cache_dir: str | Path) -> str:
    """A local directory or hub id for `DiffusionPipeline.from_pretrained`. An s3 prefix is downloaded once into
    `cache_dir` (keyed by bucket, prefix and the objects' ETags, so a changed model is fetched again)."""
    check_model_reference(uri)
    if not is_s3(uri):
        path = Path(uri).expanduser()
        return str(path) if path.is_dir() else uri
    try:
        bucket, key, objects = _list_s3(uri)
        listing = "\n".join(
            f"{o['Key']} {o.get('ETag', '')} {o['Size']}" for o in sorted(objects, key=lambda o: o["Key"])
        )
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        target = Path(cache_dir) / "s3" / bucket / (key or "_root") / digest
        if (target / ".complete").is_file():
            return str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download next to the target and rename, so a crashed or concurrent download never leaves a half model
        # that looks complete.
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            download_prefix(uri, tmp)
            (tmp / ".complete").write_text(listing)
            try:
                tmp.rename(target)
            except OSError:
                if not (target / ".complete").is_file():  # not a concurrent winner: a stale partial dir
                    shutil.rmtree(target, ignore_errors=True)
                    tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    except StorageError as exc:  # the store failed between the check and the download; local disk errors propagate
        raise ModelReferenceError("model_unreachable", f"base model {exc}") from None
