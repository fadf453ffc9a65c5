import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from invdpo_core import storage
from invdpo_core.cli import main
from invdpo_core.data import DatasetError, PreferencePair, inspect_dataset, iter_pairs, load_image
from invdpo_core.storage import upload_dir
from invdpo_core.toy import make_toy_dataset, toy_image_reward


def jpg(value: int) -> bytes:
    """A small solid-grey JPEG whose grey level identifies it."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def grey(data: bytes) -> int:
    return int(round(np.asarray(Image.open(io.BytesIO(data))).mean()))


def write_pickapic(path: Path, labels: list, *, row_group_size: int = 4, bad: dict | None = None, **overrides):
    """A Pick-a-Pic-shaped parquet; row i has jpg_0 grey 2i+1 and jpg_1 grey 2i+2 (i < 100), so pairs are traceable.
    `bad` maps (row, column) to replacement bytes; `overrides` replace or drop (None) whole columns."""
    rows = len(labels)
    columns = {
        "caption": [f"prompt {i}" for i in range(rows)],
        "jpg_0": [jpg(2 * i + 1) for i in range(rows)],
        "jpg_1": [jpg(2 * i + 2) for i in range(rows)],
        "label_0": labels,
        "label_1": [1 - lab for lab in labels],
        "user_id": list(range(rows)),
    }
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    for (row, column), data in (bad or {}).items():
        columns[column][row] = data
    for name, value in overrides.items():
        if value is None:
            del columns[name]
        else:
            columns[name] = value
    arrays = {name: pa.array(values, type=types.get(name, pa.float64())) for name, values in columns.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)
    return path


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def run_validate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["dataset", "validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- parquet -----------------------------------------------------------------------------------------------------


def test_parquet_pairs_follow_label_0(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [1, 0, 1.0, 0.0])
    pairs = sorted(iter_pairs(str(path)), key=lambda p: p.prompt)
    assert [p.prompt for p in pairs] == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]
    assert [(grey(p.chosen), grey(p.rejected)) for p in pairs] == [(1, 2), (4, 3), (5, 6), (8, 7)]
    assert pairs[1].source == f"{path} row 1" and not any(p.tie for p in pairs)


def test_ties_drop_and_keep_counts(tmp_path):
    labels = [1, 0.5, 0, 0.5, 1, 1, 0.5, 0, 1, 0]
    path = str(write_pickapic(tmp_path / "d.parquet", labels))
    dropped = inspect_dataset(path)
    assert (dropped.records, dropped.pairs, dropped.ties, dropped.ties_dropped) == (10, 7, 3, 3)
    assert len(list(iter_pairs(path))) == 7
    kept = inspect_dataset(path, tie_policy="keep")
    assert (kept.pairs, kept.ties, kept.ties_dropped) == (10, 3, 0)
    ties = [p for p in iter_pairs(path, tie_policy="keep") if p.tie]
    assert sorted(p.prompt for p in ties) == ["prompt 1", "prompt 3", "prompt 6"]
    assert all(grey(p.chosen) % 2 == 1 for p in ties)  # a kept tie has jpg_0 as chosen


def test_order_is_deterministic_per_seed_and_covers_every_record(tmp_path):
    write_pickapic(tmp_path / "d" / "a.parquet", [1, 0] * 15, row_group_size=4)
    write_pickapic(tmp_path / "d" / "b.parquet", [0, 1] * 10, row_group_size=3)
    uri = str(tmp_path / "d")
    run = [p.source for p in iter_pairs(uri, seed=7)]
    assert run == [p.source for p in iter_pairs(uri, seed=7)]
    assert run != [p.source for p in iter_pairs(uri, seed=8)]
    assert len(run) == 50 and len(set(run)) == 50
    assert run != sorted(run, key=lambda s: (s.split(" row ")[0], int(s.split(" row ")[1])))


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    path = write_pickapic(tmp_path / "d.parquet", [1] * 20, row_group_size=4)
    reads: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        reads.append(i)
        table = real(self, i, *args, **kwargs)
        assert table.num_rows == 4 and "user_id" not in table.column_names  # one group, only needed columns
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    pairs = iter_pairs(str(path), seed=1)
    first = [next(pairs) for _ in range(4)]
    assert len(reads) == 1  # the first row group is enough for its 4 rows...
    assert len({int(p.source.split(" row ")[1]) // 4 for p in first}) == 1  # ...which come from that group
    rest = list(pairs)
    assert len(rest) == 16 and sorted(reads) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_start_resumes_exactly(tmp_path, fmt):
    labels = [1, 0, 0.5, 1, 0, 1, 0.5, 1, 0, 1, 1, 0]
    if fmt == "parquet":
        uri = str(write_pickapic(tmp_path / "d.parquet", labels, row_group_size=5, bad={(4, "jpg_1"): b"junk"}))
    else:
        uri = str(write_manifest(tmp_path / "m", 12, bad={4: "rejected"}))
    full = list(iter_pairs(uri, seed=3, max_bad_share=0.2))
    assert len(full) == (9 if fmt == "parquet" else 11)  # ties dropped and the unreadable pair skipped
    for k in (0, 1, 4, 5, len(full) - 1, len(full), len(full) + 3):
        assert list(iter_pairs(uri, seed=3, start=k, max_bad_share=0.2)) == full[k:]


def test_unreadable_images_up_to_the_share_are_skipped_then_fail(tmp_path):
    labels = [1] * 100
    one = write_pickapic(tmp_path / "one.parquet", labels, bad={(10, "jpg_0"): truncated(jpg(21))})
    report = inspect_dataset(str(one))
    assert (report.pairs, report.unreadable_images, report.skipped_pairs) == (99, 1, 1)
    assert report.first_unreadable.startswith(f"{one} row 10 jpg_0: unreadable image (")
    assert len(list(iter_pairs(str(one)))) == 99

    two = write_pickapic(tmp_path / "two.parquet", labels, bad={(10, "jpg_0"): b"not an image", (60, "jpg_1"): b""})
    with pytest.raises(DatasetError) as info:
        inspect_dataset(str(two))
    assert info.value.code == "too_many_bad_images"
    assert f"{two} row 60 jpg_1" in str(info.value) and "2 of 100 records" in str(info.value)
    with pytest.raises(DatasetError, match="2 of 100 records have unreadable images"):
        list(iter_pairs(str(two), seed=0))
    assert inspect_dataset(str(two), max_bad_share=0.02).pairs == 98


def test_sample_checks_only_the_first_records(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [1] * 30, bad={(20, "jpg_0"): b"junk"})
    report = inspect_dataset(str(path), sample=8)
    assert (report.records, report.pairs, report.sampled) == (8, 8, True)
    assert inspect_dataset(str(path), sample=100, max_bad_share=0.1).sampled is False


def test_glob_picks_one_split(tmp_path):
    write_pickapic(tmp_path / "data" / "train-00000.parquet", [1] * 6)
    write_pickapic(tmp_path / "data" / "validation-00000.parquet", [1] * 2)
    assert inspect_dataset(str(tmp_path / "data")).pairs == 8
    assert inspect_dataset(str(tmp_path / "data" / "train-*.parquet")).pairs == 6


# --- JSONL manifest ----------------------------------------------------------------------------------------------


def write_manifest(directory: Path, n: int, *, bad: dict | None = None) -> Path:
    """manifest.jsonl with images in images/ (relative paths); `bad` maps a record to a field whose file is missing."""
    (directory / "images").mkdir(parents=True)
    with open(directory / "manifest.jsonl", "w") as f:
        for i in range(n):
            for role, value in (("chosen", 2 * i + 1), ("rejected", 2 * i + 2)):
                if (bad or {}).get(i) != role:
                    (directory / "images" / f"{i}_{role}.jpg").write_bytes(jpg(value))
            record = {"prompt": f"p{i}", "chosen": f"images/{i}_chosen.jpg", "rejected": f"images/{i}_rejected.jpg"}
            f.write(json.dumps(record))
            f.write("\n\n" if i == 0 else "\n")  # a blank line is allowed and does not shift line numbers
    return directory / "manifest.jsonl"


def test_jsonl_paths_are_relative_to_the_manifest(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "ds", 3)
    monkeypatch.chdir(tmp_path)  # not the manifest's directory
    pairs = sorted(iter_pairs(str(manifest)), key=lambda p: p.prompt)
    assert [(p.prompt, grey(p.chosen), grey(p.rejected)) for p in pairs] == [("p0", 1, 2), ("p1", 3, 4), ("p2", 5, 6)]
    assert pairs[1].source == f"{manifest} line 3"
    assert inspect_dataset(str(tmp_path / "ds")).format == "jsonl"  # a directory with manifest.jsonl


def test_jsonl_missing_image_is_counted_as_unreadable(tmp_path):
    manifest = write_manifest(tmp_path / "ds", 4, bad={2: "chosen"})
    report = inspect_dataset(str(manifest), max_bad_share=0.25)
    assert (report.pairs, report.unreadable_images) == (3, 1)
    assert "line 4 chosen: unreadable image (no such file" in report.first_unreadable


def test_jsonl_bad_records_name_the_line(tmp_path):
    manifest = write_manifest(tmp_path / "ds", 2)
    with open(manifest, "a") as f:
        f.write(json.dumps({"prompt": "x", "chosen": "images/0_chosen.jpg"}) + "\n")
    with pytest.raises(DatasetError, match=r"manifest.jsonl line 4: missing field 'rejected'") as info:
        inspect_dataset(str(manifest))
    assert info.value.code == "missing_column"
    manifest.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"line 1: not valid JSON") as info:
        inspect_dataset(str(manifest))
    assert info.value.code == "bad_record"


# --- CLI: one line naming file and row, non-zero exit ------------------------------------------------------------


def test_cli_validate_reports_counts(tmp_path, capsys):
    path = write_pickapic(tmp_path / "d.parquet", [1, 0.5, 0, 1])
    code, out, _ = run_validate(capsys, str(path))
    assert code == 0
    assert "pairs: 3" in out and "ties: 1 (1 dropped)" in out and "unreadable images: 0" in out
    assert "image sizes: 16x16 x6" in out
    code, out, _ = run_validate(capsys, str(path), "--tie-policy", "keep", "--sample", "2")
    assert code == 0 and "pairs: 2" in out and "first 2 records only" in out


def _case_missing_column(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [1, 0], label_0=None)
    return path, [f"{path}: missing column 'label_0'"]


def _case_bad_label(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [1.0, 0.0, 0.0, 1.0, 0.0, 2.0])
    return path, [f"{path} row 5: label_0 must be 1, 0 or 0.5 (tie), got 2.0"]


def _case_truncated_jpeg(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [1, 0, 1], bad={(2, "jpg_1"): truncated(jpg(99))})
    return path, [f"{path} row 2 jpg_1: unreadable image (", "1 of 3 records"]


def _case_empty_file(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"")
    return tmp_path / "d.parquet", [f"{tmp_path / 'd.parquet'}: file is empty"]


def _case_no_rows(tmp_path):
    path = write_pickapic(tmp_path / "d.parquet", [])
    return path, [f"{path}: no records"]


def _case_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", [f"{tmp_path / 'empty'}: no *.parquet shards or manifest.jsonl"]


def _case_empty_manifest(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("\n")
    return tmp_path / "manifest.jsonl", ["manifest.jsonl: no records"]


def _case_not_parquet(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 but not really")
    return tmp_path / "d.parquet", [f"{tmp_path / 'd.parquet'}: not a readable parquet file (Parquet"]


def _case_missing_path(tmp_path):
    return tmp_path / "nope.parquet", [f"{tmp_path / 'nope.parquet'}: no such file"]


@pytest.mark.parametrize(
    "case",
    [
        _case_missing_column,
        _case_bad_label,
        _case_truncated_jpeg,
        _case_empty_file,
        _case_no_rows,
        _case_empty_dir,
        _case_empty_manifest,
        _case_not_parquet,
        _case_missing_path,
    ],
)
def test_cli_validate_fails_with_one_line_reason(tmp_path, capsys, case):
    path, expected = case(tmp_path)
    code, out, err = run_validate(capsys, str(path))
    assert code != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for text in expected:
        assert text in err


# --- images ------------------------------------------------------------------------------------------------------


def test_load_image_resizes_the_shorter_side_and_centre_crops():
    image = np.zeros((64, 128, 3), dtype=np.uint8)  # (H, W): wide; left half red, right half blue
    image[:, :64, 0] = 255
    image[:, 64:, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    x = load_image(buf.getvalue(), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # 128x64 -> 64x32, the centre 32 columns: red on the left quarter of the original's middle, blue on the right.
    assert x[0, 16, 2] == 1 and x[2, 16, 2] == -1 and x[2, 16, 29] == 1 and x[0, 16, 29] == -1
    with pytest.raises(DatasetError, match=r"row 3: unreadable image \(not a recognised image format\)$") as info:
        load_image(b"junk", 32, source="d.parquet row 3")
    assert info.value.code == "unreadable_image"


def test_data_module_imports_no_torch():
    code = "import sys, invdpo_core.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_toy_image_reward_is_red_minus_blue():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    assert toy_image_reward(red) == 1.0
    assert toy_image_reward(np.full((8, 8, 3), (0, 0, 255), dtype=np.uint8)) == -1.0
    assert toy_image_reward(Image.new("RGB", (8, 8), (128, 30, 128))) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        toy_image_reward(np.zeros((8, 8, 3)))


# --- toy datasets, and everything again from S3 ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_make_toy_writes_n_pairs_that_validate(tmp_path, capsys, fmt):
    assert main(["dataset", "make-toy", str(tmp_path / "toy"), "--pairs", "5", "--format", fmt, "--seed", "1"]) == 0
    assert "wrote 5 toy pairs" in capsys.readouterr().out
    code, out, _ = run_validate(capsys, str(tmp_path / "toy"))
    assert code == 0 and "pairs: 5" in out and "64x64 x10" in out
    pairs = list(iter_pairs(str(tmp_path / "toy")))
    # The redder image wins every pair, and the pairs differ clearly in reward.
    margins = [
        toy_image_reward(Image.open(io.BytesIO(p.chosen))) - toy_image_reward(Image.open(io.BytesIO(p.rejected)))
        for p in pairs
    ]
    assert min(margins) > 0
    assert {p.prompt for p in pairs} == {
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow star",
        "a purple heart",
    }
    if fmt == "jsonl":
        assert len(list((tmp_path / "toy" / "images").glob("*.png"))) == 10
    else:
        names = pq.read_schema(tmp_path / "toy" / "train-00000.parquet").names
        assert {"image_0_uid", "label_1", "model_0", "best_image_uid"} <= set(names)


def test_make_toy_with_a_model_dir(tmp_path, capsys):
    from invdpo_core.testing import build_tiny_pipeline

    build_tiny_pipeline(kind="sd15", seed=4).save_pretrained(tmp_path / "model")
    argv = ["dataset", "make-toy", str(tmp_path / "toy"), "--pairs", "2", "--model-dir", str(tmp_path / "model")]
    assert main(argv) == 0
    assert len(list(iter_pairs(str(tmp_path / "toy")))) == 2
    (tmp_path / "file").write_text("")
    for argv, message in [
        (["--pairs", "2", "--model-dir", str(tmp_path)], "no model_index.json"),
        (["--pairs", "0"], "--pairs must be >= 1"),
    ]:
        capsys.readouterr()
        assert main(["dataset", "make-toy", str(tmp_path / "toy2"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def toy_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root / "jsonl", 6, fmt="jsonl", seed=2)
    make_toy_dataset(root / "parquet", 20, fmt="parquet", seed=2)
    return root


def _same(a: list[PreferencePair], b: list[PreferencePair]) -> bool:
    return [(p.prompt, p.chosen, p.rejected) for p in a] == [(p.prompt, p.chosen, p.rejected) for p in b]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_s3_datasets_read_like_local_ones(s3_env, toy_datasets, fmt, capsys):
    local = toy_datasets / fmt
    uri = f"s3://{s3_env}/datasets/{fmt}"
    upload_dir(local, uri)
    assert _same(list(iter_pairs(uri, seed=5)), list(iter_pairs(str(local), seed=5)))
    tail = list(iter_pairs(uri, seed=5, start=3))
    assert _same(tail, list(iter_pairs(str(local), seed=5))[3:])
    report = inspect_dataset(uri)
    assert report.format == fmt and report.pairs == (6 if fmt == "jsonl" else 20)
    if fmt == "jsonl":
        assert inspect_dataset(f"{uri}/manifest.jsonl").pairs == 6
        assert tail[0].source.startswith(f"{uri}/manifest.jsonl line ")
    else:
        assert inspect_dataset(f"{uri}/train-00000.parquet", sample=5).records == 5
    code, out, _ = run_validate(capsys, uri)
    assert code == 0 and f"pairs: {report.pairs}" in out


def test_s3_dataset_errors_are_one_line(s3_env, tmp_path, capsys, monkeypatch):
    code, _, err = run_validate(capsys, f"s3://{s3_env}/nothing/here")
    assert code == 2 and err == f"error: s3://{s3_env}/nothing/here: no such file, directory or s3 prefix\n"
    code, _, err = run_validate(capsys, "s3://no-such-bucket-xyz/data.parquet")
    assert code == 2 and "no-such-bucket-xyz" in err and err.count("\n") == 1
    code, _, err = run_validate(capsys, "s3:///data")
    assert code == 2 and "no bucket" in err
    write_pickapic(tmp_path / "bad" / "d.parquet", [1, 1, 7])
    upload_dir(tmp_path / "bad", f"s3://{s3_env}/bad")
    code, _, err = run_validate(capsys, f"s3://{s3_env}/bad")
    assert code == 2 and f"s3://{s3_env}/bad/d.parquet row 2: label_0 must be" in err
    assert "testing" not in err  # never a credential
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(DatasetError, match=r"cannot reach S3 \(EndpointConnectionError\)$") as info:
        inspect_dataset(f"s3://{s3_env}/bad")
    assert info.value.code == "storage_error"


def test_s3_parquet_is_fetched_by_ranged_reads(s3_env, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(600)]  # incompressible images
    images = []
    for pixels in noise:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        images.append(buf.getvalue())
    path = write_pickapic(
        tmp_path / "big" / "d.parquet", [1] * 300, row_group_size=30, jpg_0=images[:300], jpg_1=images[300:]
    )
    upload_dir(tmp_path / "big", f"s3://{s3_env}/big")
    fetched: list[int] = []
    real = storage._S3RangeReader.read

    def spy(self, size=-1):
        data = real(self, size)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(storage._S3RangeReader, "read", spy)
    pairs = iter_pairs(f"s3://{s3_env}/big", seed=0)
    assert len([next(pairs) for _ in range(10)]) == 10
    assert sum(fetched) < path.stat().st_size / 3  # the footer and one row group, not the file
    assert len(list(pairs)) == 290 and sum(fetched) < 1.5 * path.stat().st_size
