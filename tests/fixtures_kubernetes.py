"""Kubernetes for tests, without a cluster: the TrainJob CRD's own schema, and a small API server that speaks it.

- `validate_trainjob(obj)` checks a TrainJob against the openAPIV3Schema of Kubeflow Trainer v2.3.0's CRD
  (tests/crds/, copied from the kubeflow/trainer repository at tag v2.3.0, Apache-2.0) with `jsonschema`, strictly:
  an unknown field is an error (as `kubectl apply --validate=strict` / fieldValidation=Strict makes it), and the
  CRD's CEL rules on metadata.name are checked by hand. Label keys and values are checked as the API server does.
- `FakeKubernetes` is a real HTTP server on loopback implementing just the CustomObjects endpoints of trainjobs
  (create, get, list with labelSelector, merge-patch, delete), storing objects in memory and validating every
  body against the CRD. The official `kubernetes` client talks to it through a kubeconfig (`write_kubeconfig`).
  What it does not do: run pods, admit through Kueue, set conditions (tests set them with `set_conditions`).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import datetime, timezone
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

CRD = Path(__file__).parent / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties (unless it keeps
    unknown fields): the API server would prune an unknown field silently; a test must see it."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache
def trainjob_schema() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = [v for v in documents[0]["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return schema


def validate_trainjob(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError or ValueError if the API server would refuse (or prune part of) `obj`."""
    jsonschema.Draft202012Validator(trainjob_schema()).validate(obj)
    if obj["apiVersion"] != "trainer.kubeflow.org/v1alpha1" or obj["kind"] != "TrainJob":
        raise ValueError(f"not a TrainJob: {obj['apiVersion']} {obj['kind']}")
    meta = obj["metadata"]
    unknown = set(meta) - {"name", "namespace", "labels", "annotations", "uid", "resourceVersion",
                           "creationTimestamp", "deletionTimestamp", "generation", "finalizers"}  # fmt: skip
    if unknown:
        raise ValueError(f"metadata: unknown fields {sorted(unknown)}")
    # The CRD's CEL rules on the name (x-kubernetes-validations at the top level).
    if not _DNS_1035.match(meta.get("name", "")) or len(meta["name"]) > 63:
        raise ValueError(f"metadata.name {meta.get('name')!r}: must be an RFC 1035 label of at most 63 characters")
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_1123_SUBDOMAIN.match(prefix))) or len(name) > 63:
            raise ValueError(f"label key {key!r} is invalid")
        if not _LABEL_NAME.match(name) or not isinstance(value, str) or len(value) > 63:
            raise ValueError(f"label {key}={value!r} is invalid")
        if not _LABEL_VALUE.match(value):
            raise ValueError(f"label value {value!r} is invalid")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


class FakeKubernetes:
    """In-memory trainjobs behind a real HTTP server on 127.0.0.1; `requests` logs (method, path) in order."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.forbidden = False  # answer 403 to everything, as without the chart's Role
        self._version = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, url.path))
                if not url.path.startswith(PREFIX):
                    return self._send(404, _status(404, "NotFound", f"{url.path}: not served here"))
                parts = url.path[len(PREFIX) :].split("/")
                if len(parts) not in (2, 3) or parts[1] != "trainjobs":
                    return self._send(404, _status(404, "NotFound", f"{url.path}: not served here"))
                namespace, name = parts[0], (parts[2] if len(parts) == 3 else None)
                if fake.forbidden:
                    return self._send(403, _status(403, "Forbidden", "trainjobs is forbidden"))
                with fake.lock:
                    code, body = fake.serve(method, namespace, name, parse_qs(url.query), self._body)
                self._send(code, body)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the API

    def serve(self, method: str, namespace: str, name: str | None, query: dict[str, list[str]], body: Any) -> Any:
        key = (namespace, name or "")
        if method == "POST" and name is None:
            obj = body()
            obj.setdefault("metadata", {}).setdefault("namespace", namespace)
            try:
                validate_trainjob(obj)
            except (jsonschema.ValidationError, ValueError) as exc:
                message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
                return 422, _status(422, "Invalid", f"TrainJob is invalid: {message}")
            key = (namespace, obj["metadata"]["name"])
            if key in self.objects:
                return 409, _status(409, "AlreadyExists", f'trainjobs "{key[1]}" already exists')
            self._version += 1
            obj["metadata"].update(
                uid=str(uuid.uuid4()),
                resourceVersion=str(self._version),
                creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            self.objects[key] = obj
            return 201, obj
        if method == "GET" and name is None:
            items = [o for (ns, _), o in self.objects.items() if ns == namespace]
            for term in (query.get("labelSelector") or [""])[0].split(","):
                if term:
                    label, _, value = term.partition("=")
                    items = [o for o in items if (o["metadata"].get("labels") or {}).get(label) == value]
            return 200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": items,
                         "metadata": {"resourceVersion": str(self._version)}}  # fmt: skip
        if key not in self.objects:
            return 404, _status(404, "NotFound", f'trainjobs "{name}" not found')
        if method == "GET":
            return 200, self.objects[key]
        if method == "PATCH":
            patched = _merge_patch(self.objects[key], body())
            try:
                validate_trainjob(patched)
            except (jsonschema.ValidationError, ValueError) as exc:
                return 422, _status(422, "Invalid", f"TrainJob is invalid: {exc}")
            self._version += 1
            patched["metadata"]["resourceVersion"] = str(self._version)
            self.objects[key] = patched
            return 200, patched
        if method == "DELETE":
            return 200, self.objects.pop(key)
        return 405, _status(405, "MethodNotAllowed", method)

    # ---- what a cluster's controllers would do

    def trainjobs(self, namespace: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(json.dumps(o)) for (ns, _), o in self.objects.items() if ns == namespace]

    def set_conditions(self, namespace: str, name: str, *conditions: dict[str, str]) -> None:
        """What Trainer's controller writes to status (Created, Suspended, Complete, Failed)."""
        with self.lock:
            self.objects[(namespace, name)]["status"] = {"conditions": [{"status": "True", **c} for c in conditions]}

    def creates(self) -> int:
        return sum(1 for method, path in self.requests if method == "POST")


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig pointing the official client at `server` (plain HTTP on loopback, a dummy token)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "worker", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "worker", "namespace": namespace}}],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(config))
    return path
