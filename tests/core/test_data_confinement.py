"""A manifest reads only what lies beside it, and no read is unbounded (moto S3 server and local files)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from fixtures_s3 import s3_test_client
from PIL import Image

from invdpo_core.data import DatasetError, inspect_dataset, iter_pairs
from invdpo_core.storage import ModelReferenceError, TooLargeError, check_model_reference, is_hub_id, read_bytes


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def put(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    client = s3_test_client(endpoint)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def manifest(chosen: str, rejected: str = "b.png") -> bytes:
    return (json.dumps({"prompt": "p", "chosen": chosen, "rejected": rejected}) + "\n").encode()


@pytest.mark.parametrize(
    ("chosen", "reason"),
    [
        ("/dev/zero", "is absolute or a URI"),
        ("/etc/passwd", "is absolute or a URI"),
        ("../other/a.png", "contains '..'"),
        ("imgs/../../other/a.png", "contains '..'"),
        ("s3://other-bucket/a.png", "is absolute or a URI"),
        ("file:///etc/passwd", "is absolute or a URI"),
        ("", "is empty"),
    ],
)
def test_s3_manifest_paths_outside_its_prefix_are_refused_naming_record_and_field(
    s3_env: str, s3_server: str, chosen: str, reason: str
) -> None:
    put(s3_server, s3_env, {"team/m.jsonl": manifest(chosen), "team/b.png": png((0, 0, 255))})
    uri = f"s3://{s3_env}/team/m.jsonl"
    with pytest.raises(DatasetError) as err:
        inspect_dataset(uri)
    assert err.value.code == "bad_image_path"
    assert f"{uri} line 1: field 'chosen'" in str(err.value) and reason in str(err.value)
    with pytest.raises(DatasetError, match="bad_image_path|field 'chosen'"):
        list(iter_pairs(uri))


def test_relative_paths_resolve_inside_the_manifest_prefix(s3_env: str, s3_server: str) -> None:
    put(
        s3_server,
        s3_env,
        {
            "team/m.jsonl": manifest("imgs/./a.png", "imgs/b.png"),
            "team/imgs/a.png": png((255, 0, 0)),
            "team/imgs/b.png": png((0, 0, 255)),
        },
    )
    (pair,) = iter_pairs(f"s3://{s3_env}/team/m.jsonl")
    assert Image.open(io.BytesIO(pair.chosen)).getpixel((0, 0)) == (255, 0, 0)


def test_local_manifest_symlink_out_of_its_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(png((1, 2, 3)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.png").write_bytes(png((0, 0, 255)))
    os.symlink(tmp_path / "secret.png", data / "a.png")
    (data / "m.jsonl").write_bytes(manifest("a.png"))
    with pytest.raises(DatasetError, match="field 'chosen' 'a.png' leads out of the manifest's directory"):
        inspect_dataset(str(data / "m.jsonl"))


def test_images_over_the_size_cap_are_never_read_whole(s3_env: str, s3_server: str) -> None:
    big = png((255, 0, 0)) + b"\0" * 4096  # a valid PNG with trailing bytes: readable if the cap allowed it
    put(s3_server, s3_env, {"d/m.jsonl": manifest("a.png"), "d/a.png": big, "d/b.png": png((0, 0, 255))})
    uri = f"s3://{s3_env}/d/m.jsonl"
    assert inspect_dataset(uri, max_image_bytes=len(big)).pairs == 1
    with pytest.raises(DatasetError) as err:
        inspect_dataset(uri, max_image_bytes=4096)
    assert err.value.code == "too_many_bad_images"
    assert "line 1 chosen: unreadable image (larger than the 4 KiB limit per image)" in str(err.value)
    # The trainer's reader has the same cap, from INVDPO_MAX_IMAGE_BYTES when not given.
    os.environ["INVDPO_MAX_IMAGE_BYTES"] = "4096"
    try:
        with pytest.raises(DatasetError, match="larger than the 4 KiB limit per image"):
            list(iter_pairs(uri))
    finally:
        del os.environ["INVDPO_MAX_IMAGE_BYTES"]


def test_read_bytes_is_bounded_and_refuses_non_regular_files(s3_env: str, s3_server: str, tmp_path: Path) -> None:
    put(s3_server, s3_env, {"x.bin": b"a" * 100, "empty.bin": b""})
    assert read_bytes(f"s3://{s3_env}/x.bin", max_bytes=100) == b"a" * 100
    assert read_bytes(f"s3://{s3_env}/empty.bin", max_bytes=100) == b""
    with pytest.raises(TooLargeError, match="x.bin: larger than the 99 bytes limit"):
        read_bytes(f"s3://{s3_env}/x.bin", max_bytes=99)
    with pytest.raises(OSError, match="not a regular file"):
        read_bytes("/dev/zero", max_bytes=1 << 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # and does not wait for a writer
        read_bytes(str(fifo), max_bytes=10)


def test_record_lines_are_capped(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b'{"prompt": "' + b"x" * (2 << 20) + b'"}\n')
    with pytest.raises(DatasetError, match="line 1: longer than the 1 MiB limit per record"):
        inspect_dataset(str(tmp_path / "m.jsonl"))


def test_hub_ids_never_look_like_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("org/name") and is_hub_id("runwayml/stable-diffusion-v1-5")
    for path in ("../data", "./models", "a/..", "../..", "-x/y", ".x/y", "a/b/c"):
        assert not is_hub_id(path), path
    # A hub-shaped name that is also a local directory: without local files, the disk is not looked at.
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelReferenceError, match="directory has no model_index.json"):
        check_model_reference("org/name")
    with pytest.raises(ModelReferenceError) as err:
        check_model_reference("org/name", allow_local=False)
    assert err.value.code == "model_not_cached"
    with pytest.raises(ModelReferenceError, match="not an s3:// URI nor a hub id"):
        check_model_reference("../data", allow_local=False)


def test_s3_manifests_are_capped_before_download(s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from invdpo_core import data

    put(s3_server, s3_env, {"d/m.jsonl": manifest("a.png")})
    monkeypatch.setattr(data, "MAX_MANIFEST_BYTES", 16)
    with pytest.raises(DatasetError) as err:
        inspect_dataset(f"s3://{s3_env}/d/m.jsonl")
    assert err.value.code == "manifest_too_large"
    assert "bytes, above the 16 bytes limit per manifest" in str(err.value)
