import socket
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import constants

from invdpo_core.storage import (
    ModelReferenceError,
    check_model_reference,
    download_prefix,
    exists,
    is_s3,
    list_files,
    read_bytes,
    resolve_model,
    s3_client,
    split_s3,
    upload_dir,
)
from invdpo_core.testing import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_pipeline(kind="sd15", seed=0).save_pretrained(path)
    return path


def write_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)), "sub/deeper/c.json": b"{}"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.mark.parametrize(
    "uri, expected",
    [("s3://bucket/a/b", ("bucket", "a/b")), ("s3://bucket/a/b/", ("bucket", "a/b")), ("s3://bucket", ("bucket", ""))],
)
def test_split_s3(uri, expected):
    assert is_s3(uri) and split_s3(uri) == expected


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("http://b/k", "not an s3:// URI"),
        ("s3://Bad_Bucket/k", "invalid"),
    ],
)
def test_split_s3_rejects_malformed_uris(uri, message):
    with pytest.raises(ValueError, match=message):
        split_s3(uri)


def test_s3_client_follows_the_environment(s3_env, s3_server):
    client = s3_client()
    assert client.meta.endpoint_url == s3_server
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert s3_env in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_upload_list_read_exists_download_on_s3(s3_env, tmp_path):
    files = write_tree(tmp_path / "src")
    prefix = f"s3://{s3_env}/models/tiny"
    upload_dir(tmp_path / "src", prefix)
    upload_dir(tmp_path / "src", f"s3://{s3_env}/models/tiny2")  # a sibling that shares the key prefix
    expected = sorted(f"{prefix}/{rel}" for rel in files)
    assert list_files(prefix) == expected and list_files(prefix + "/") == expected
    assert list_files(f"{prefix}/sub/b.bin") == [f"{prefix}/sub/b.bin"]
    assert list_files(f"{prefix}/nothing") == []
    assert read_bytes(f"{prefix}/sub/b.bin", max_bytes=1 << 20) == files["sub/b.bin"]
    assert exists(f"{prefix}/a.txt") and exists(prefix) and exists(f"s3://{s3_env}")
    assert not exists(f"{prefix}/missing.txt") and not exists("s3://no-such-bucket-zz/x")
    assert not exists("s3://no-such-bucket-zz")
    out = download_prefix(prefix, tmp_path / "dest")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    single = download_prefix(f"{prefix}/sub/b.bin", tmp_path / "one")
    assert (single / "b.bin").read_bytes() == files["sub/b.bin"]


def test_missing_s3_objects_raise_file_not_found(s3_env, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_env}/nope.txt: no such object"):
        read_bytes(f"s3://{s3_env}/nope.txt", max_bytes=10)
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        read_bytes("s3://no-such-bucket-zz/nope.txt", max_bytes=10)
    with pytest.raises(FileNotFoundError, match="no objects under this prefix"):
        download_prefix(f"s3://{s3_env}/nothing", tmp_path)


def test_local_paths_use_the_same_functions(tmp_path):
    files = write_tree(tmp_path / "src")
    assert list_files(str(tmp_path / "src")) == sorted(str(tmp_path / "src" / rel) for rel in files)
    assert read_bytes(str(tmp_path / "src" / "a.txt"), max_bytes=10) == b"alpha" and exists(str(tmp_path / "src"))
    upload_dir(tmp_path / "src", str(tmp_path / "copy"))
    download_prefix(str(tmp_path / "copy"), tmp_path / "copy2")
    assert (tmp_path / "copy2" / "sub" / "deeper" / "c.json").read_bytes() == b"{}"
    assert list_files(str(tmp_path / "missing")) == [] and not exists(str(tmp_path / "missing"))


def test_check_model_reference_local(tiny_model, tmp_path):
    check_model_reference(str(tiny_model))
    for uri, code, message in [
        (str(tmp_path), "model_not_found", "directory has no model_index.json"),
        (str(tmp_path / "a" / "b"), "model_not_found", "no such directory, and not a hub id"),
        (" ", "bad_model_reference", "base model is empty"),
    ]:
        with pytest.raises(ModelReferenceError, match=message) as info:
            check_model_reference(uri)
        assert info.value.code == code


def test_check_model_reference_hub_id_offline_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelReferenceError, match="not in the local Hugging Face cache") as info:
        check_model_reference("org/name")
    assert info.value.code == "model_not_cached"
    # The hub cache layout: refs/main names the snapshot that holds the files.
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "model_index.json").write_text("{}")
    check_model_reference("org/name")
    assert resolve_model("org/name", tmp_path / "cache") == "org/name"


def test_check_model_reference_s3(s3_env, tiny_model):
    upload_dir(tiny_model, f"s3://{s3_env}/models/tiny")
    check_model_reference(f"s3://{s3_env}/models/tiny")
    for uri, code, message in [
        (f"s3://{s3_env}/models", "model_not_found", "no model_index.json under this prefix"),
        ("s3://no-such-bucket-zz/m", "model_not_found", "no model_index.json"),
        ("s3://", "bad_model_reference", "no bucket"),
    ]:
        with pytest.raises(ModelReferenceError, match=message) as info:
            check_model_reference(uri)
        assert info.value.code == code


def test_unreachable_store_is_one_line_without_secrets(s3_env, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    with pytest.raises(ModelReferenceError) as info:
        check_model_reference(f"s3://{s3_env}/models/tiny")
    assert info.value.code == "model_unreachable"
    assert (
        str(info.value)
        == f"base model s3://{s3_env}/models/tiny/model_index.json: cannot reach S3 (EndpointConnectionError)"
    )


def test_resolve_model_downloads_an_s3_model_once(s3_env, tiny_model, tmp_path):
    uri = f"s3://{s3_env}/models/tiny"
    upload_dir(tiny_model, uri)
    path = resolve_model(uri, tmp_path / "cache")
    assert isinstance(DiffusionPipeline.from_pretrained(path), StableDiffusionPipeline)
    marker = Path(path) / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert resolve_model(uri, tmp_path / "cache") == path and marker.stat().st_mtime_ns == stamp  # cached
    s3_client().put_object(Bucket=s3_env, Key="models/tiny/README.md", Body=b"changed")
    fresh = resolve_model(uri, tmp_path / "cache")
    assert fresh != path and (Path(fresh) / "README.md").read_bytes() == b"changed"
    assert resolve_model(str(tiny_model), tmp_path / "cache") == str(tiny_model)  # local: used in place
    with pytest.raises(ModelReferenceError):
        resolve_model(f"s3://{s3_env}/models/none", tmp_path / "cache")


def test_the_upload_command_copies_a_directory_to_s3_and_names_bad_arguments(s3_env, tmp_path, capsys):
    from invdpo_core.cli import main

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "manifest.jsonl").write_text("{}\n")
    (tmp_path / "data" / "images" / "a.png").write_bytes(b"png")
    assert main(["upload", str(tmp_path / "data"), f"s3://{s3_env}/toy"]) == 0
    assert capsys.readouterr().out == f"uploaded 2 file(s) from {tmp_path / 'data'} to s3://{s3_env}/toy/\n"
    assert sorted(list_files(f"s3://{s3_env}/toy")) == [
        f"s3://{s3_env}/toy/images/a.png",
        f"s3://{s3_env}/toy/manifest.jsonl",
    ]

    assert main(["upload", str(tmp_path / "data"), str(tmp_path / "elsewhere")]) == 2
    assert "not an s3:// URI" in capsys.readouterr().err
    assert main(["upload", str(tmp_path / "missing"), f"s3://{s3_env}/x"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such directory\n"
