"""Bad input: every error names the file and the problem, and finished shards stay intact."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from shards.loader import ShardReadError, make_loader
from shards.reader import DataError, open_nuscenes, plan_split
from shards.writer import build_shards

REPO = Path(__file__).resolve().parents[1]


def linked_copy(src, dst: Path) -> Path:
    """Copy a dataroot with hard links (cheap); replace a file before modifying it (never write in place)."""
    shutil.copytree(str(src), str(dst), copy_function=os.link)
    return dst


def replace_file(path: Path, data: bytes | None) -> None:
    """Break the hard link and write ``data`` (None: delete the file)."""
    path.unlink()
    if data is not None:
        path.write_bytes(data)


def records(root: Path, version: str, split: str):
    return plan_split(open_nuscenes(str(root), version), split, check_files=False).records


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def build(root: Path, out: Path, splits=("train", "val"), **kw) -> dict:
    return build_shards(str(root), ["v1.0-mini"], list(splits), str(out), samples_per_shard=2, progress=False,
                        **kw)


def run_cli(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("build_shards_cli", REPO / "scripts" / "build_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_unknown_split_and_version_name_the_allowed_ones(synthetic_root, tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError, match=r"'bogus'.*v1.0-mini: train, val.*v1.0-test: test"):
        build_shards(str(synthetic_root), ["v1.0-mini"], ["bogus"], str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=r"'test'.*v1.0-test: test"):
        build_shards(str(synthetic_root), ["v1.0-mini"], ["test"], str(tmp_path / "o"), progress=False)
    with pytest.raises(DataError, match=r"unknown nuScenes version 'v2'"):
        build_shards(str(synthetic_root), ["v2"], ["train"], str(tmp_path / "o"), progress=False)
    rc = run_cli(["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "trian",
                  "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_jpeg", "truncated_pcd", "missing_lidarseg", "short_lidarseg"])
def test_bad_input_names_the_file_and_keeps_finished_shards(synthetic_root, tmp_path: Path, case: str) -> None:
    root = linked_copy(synthetic_root, tmp_path / "data")
    out = tmp_path / "out"
    build(root, out)
    before = digests(out)
    manifest_before = (out / "manifest.json").read_bytes()

    rec = records(root, "v1.0-mini", "val")[-1]
    if case == "missing_jpeg":
        bad = root / rec.cam_files[3]
        replace_file(bad, None)
        pattern = "camera JPEG is missing"
    elif case == "truncated_pcd":
        bad = root / rec.lidar_file
        replace_file(bad, bad.read_bytes()[:-7])
        pattern = "truncated"
    elif case == "missing_lidarseg":
        bad = root / rec.lidarseg_file
        replace_file(bad, None)
        pattern = "missing lidarseg"
    else:
        bad = root / rec.lidarseg_file
        replace_file(bad, bad.read_bytes()[:-3])
        pattern = "labels but"
    with pytest.raises(DataError) as info:
        build(root, out)
    msg = str(info.value)
    assert str(bad) in msg and pattern in msg, msg
    assert digests(out) == before and (out / "manifest.json").read_bytes() == manifest_before
    assert not list(out.glob("*.tmp-*"))


def test_error_while_writing_keeps_earlier_shards_and_resume_finishes(synthetic_root, shard_root: str,
                                                                     tmp_path: Path) -> None:
    root = linked_copy(synthetic_root, tmp_path / "data")
    out = tmp_path / "out"
    rec = records(root, "v1.0-mini", "train")[-1]  # last sample of train: in the last train shard
    bad = root / rec.cam_files[0]
    good = bad.read_bytes()
    replace_file(bad, b"GIF89a not a jpeg")  # passes the stat checks, fails when read
    with pytest.raises(DataError, match="not a JPEG") as info:
        build(root, out, splits=("train",))
    assert str(bad) in str(info.value)
    assert (out / "train-000000.tar").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp-*"))
    kept = (out / "train-000000.tar").stat().st_ino
    replace_file(bad, good)
    m = build(root, out, splits=("train",))
    ref = json.loads(Path(shard_root, "manifest.json").read_text())["splits"]["train"]
    assert m["splits"]["train"] == ref
    assert (out / "train-000000.tar").stat().st_ino == kept


def test_skip_bad_counts_and_reports(synthetic_root, tmp_path: Path) -> None:
    root = linked_copy(synthetic_root, tmp_path / "data")
    recs = records(root, "v1.0-mini", "train")
    replace_file(root / recs[0].lidar_file, (root / recs[0].lidar_file).read_bytes()[:-4])  # stat-time problem
    replace_file(root / recs[-1].cam_files[2], b"not a jpeg")  # read-time problem
    m = build(root, tmp_path / "out", splits=("train",), skip_bad=True)
    s = m["splits"]["train"]
    assert s["num_skipped"] == 2 and m["totals"]["num_skipped"] == 2
    assert {x["sample_token"] for x in s["skipped"]} == {recs[0].token, recs[-1].token}
    text = json.dumps(s["skipped"])
    assert recs[0].lidar_file in text and recs[-1].cam_files[2] in text
    assert s["num_samples"] == len(recs) - 2
    loaded = [t for b in make_loader(str(tmp_path / "out"), "train", eval_gt=False) for t in b["tokens"]]
    assert sorted(loaded) == sorted(r.token for r in recs[1:-1])


def test_output_dir_of_another_schema_version(synthetic_root, shard_root: str, tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(shard_root, out)
    man = json.loads((out / "manifest.json").read_text())
    man["schema_version"] = 0
    (out / "manifest.json").write_text(json.dumps(man))
    before = digests(out)
    with pytest.raises(DataError, match="schema version 0") as info:
        build(synthetic_root, out)
    assert str(out / "manifest.json") in str(info.value)
    assert digests(out) == before
    # without manifest: the progress records (and the shards themselves) carry the version too
    (out / "manifest.json").unlink()
    side = out / ".progress" / "train-000000.tar.json"
    rec = json.loads(side.read_text())
    rec["schema_version"] = 0
    side.write_text(json.dumps(rec))
    with pytest.raises(DataError, match=str(side)):
        build(synthetic_root, out)
    assert digests(out) == before


def _first_sample_end(path: Path) -> int:
    """Byte offset just after the last member of the first sample of a tar."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    key = members[0].name.split(".")[0]
    last = [m for m in members if m.name.split(".")[0] == key][-1]
    return last.offset_data + (last.size + 511) // 512 * 512


@pytest.mark.parametrize("cut", ["mid_member", "sample_boundary", "boundary_with_end_marker"])
@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_shard_fails_loudly_naming_the_shard(shard_root: str, tmp_path: Path, cut: str,
                                                       workers: int) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    shard = out / "val-000000.tar"
    data = shard.read_bytes()
    end = _first_sample_end(shard)
    if cut == "mid_member":
        data = data[: len(data) // 2 + 100]
    elif cut == "sample_boundary":
        data = data[:end]  # a valid tar prefix: plain tarfile reading would silently stop here
    else:
        data = data[:end] + b"\0" * 1024  # a well-formed tar with one sample less than the manifest says
    shard.write_bytes(data)
    with pytest.raises(Exception) as info:
        for _ in make_loader(str(out), "val", batch_size=1, num_workers=workers, eval_gt=False):
            pass
    assert str(shard) in str(info.value)
    if workers == 0:
        assert isinstance(info.value, ShardReadError)
