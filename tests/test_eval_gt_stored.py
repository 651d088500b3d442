"""Stored evaluation GT (schema 3): the builder stores eval_gt.npy + voxel_label.npy for the eval-GT splits, the
loader reads them for exactly the recorded grid (byte for byte what it would compute), computes them otherwise
with one log line, still reads schema-2 shards, and names a damaged stored member.

The schema-2 copies are written here with tarfile/hashlib/json only (independent of shards/ code).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _damage import rewrite_member
from _schema2 import members as _members
from _schema2 import write_v2_copy

import shards.sample as sample_mod
from shards import evalgt
from shards.errors import ShardReadError
from shards.geometry import GridSpec
from shards.loader import make_loader
from shards.reader import DataError
from shards.writer import build_shards

REPO = Path(__file__).resolve().parents[1]
PAPER = GridSpec()
TINY = GridSpec(size=(25, 25, 4))


@pytest.fixture(autouse=True)
def _fresh_log_state():
    evalgt._NOTED.clear()
    yield
    evalgt._NOTED.clear()


def val_batches(source: str, grid: GridSpec = PAPER) -> list[dict]:
    return list(make_loader(source, "val", batch_size=1, num_workers=0, grid=grid, shuffle=False, eval_gt=True))


def computed_batches(source: str, grid: GridSpec, monkeypatch) -> list[dict]:
    """The loader forced to compute the eval GT (stored members ignored)."""
    with monkeypatch.context() as m:
        m.setattr(sample_mod, "stored_eval_targets", lambda *a, **k: None)
        return val_batches(source, grid)


def assert_same_gt(a: list[dict], b: list[dict]) -> None:
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b] and a
    for x, y in zip(a, b):
        for k in ("eval_gt", "voxel_label"):
            assert x[k].dtype == y[k].dtype and x[k].numpy().tobytes() == y[k].numpy().tobytes(), k


def eval_gt_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shards.evalgt"]


# ---------------------------------------------------------------------------------------------------------
# stored == computed; no ray cast when stored
# ---------------------------------------------------------------------------------------------------------


def test_stored_equals_computed_and_no_raycast(shard_root: str, monkeypatch, caplog) -> None:
    computed = computed_batches(shard_root, PAPER, monkeypatch)
    with monkeypatch.context() as m, caplog.at_level(logging.INFO):
        def no_raycast(*a, **k):
            raise AssertionError("ray cast with stored eval GT")
        m.setattr(evalgt, "raycast_eval_gt", no_raycast)
        m.setattr(evalgt, "voxel_majority_label", no_raycast)
        stored = val_batches(shard_root, PAPER)
    assert_same_gt(stored, computed)
    assert eval_gt_lines(caplog) == []
    assert all(b["eval_gt"].shape == (1, 100, 100, 8) for b in stored)


def test_stored_eval_gt_matches_the_reference_raycast(shard_root: str) -> None:
    """Independent oracle: the first (loop) ray cast of tests/_raycast_ref.py on the stored points."""
    from _raycast_ref import raycast_eval_gt_reference

    from p3d_common.labels import RAW_TO_NOIGNORE

    b = val_batches(shard_root, PAPER)[0]
    labels = RAW_TO_NOIGNORE[b["labels_raw"][0].numpy()]
    ref = raycast_eval_gt_reference(b["points"][0].numpy(), labels, PAPER)
    np.testing.assert_array_equal(b["eval_gt"][0].numpy(), ref)


def test_other_grid_is_computed_with_one_log_line(shard_root: str, monkeypatch, caplog) -> None:
    with caplog.at_level(logging.INFO):
        got = val_batches(shard_root, TINY)
    lines = eval_gt_lines(caplog)
    assert len(lines) == 1 and len(got) > 1, lines
    assert "100x100x8" in lines[0] and "--eval-gt-grid 25 25 4" in lines[0] and "build_shards.py" in lines[0]
    caplog.clear()
    assert_same_gt(got, computed_batches(shard_root, TINY, monkeypatch))
    assert got[0]["eval_gt"].shape == (1, 25, 25, 4)


# ---------------------------------------------------------------------------------------------------------
# schema-2 shards still load
# ---------------------------------------------------------------------------------------------------------


def test_schema2_shards_still_load_computed_with_one_log_line(shard_root: str, tmp_path: Path, caplog) -> None:
    from shards.verify import verify_shard_set

    v2 = write_v2_copy(shard_root, tmp_path / "v2")
    assert not any(r.problems for r in verify_shard_set(str(v2), decode=True, progress=False))
    with caplog.at_level(logging.INFO):
        got = val_batches(str(v2), PAPER)
    lines = eval_gt_lines(caplog)
    assert len(lines) == 1 and "schema-2" in lines[0] and "--out NEW_DIR" in lines[0], lines
    assert_same_gt(got, val_batches(shard_root, PAPER))  # computed from v2 == stored in v3


def test_resuming_a_schema2_build_is_refused_with_one_line(shard_root: str, tmp_path: Path, synthetic_root,
                                                             capsys) -> None:
    """A half-built schema-2 folder: one finished shard and its progress record, no manifest yet."""
    v2 = write_v2_copy(shard_root, tmp_path / "full")
    half = tmp_path / "half"
    (half / ".progress").mkdir(parents=True)
    shutil.copy(v2 / "val-000000.tar", half / "val-000000.tar")
    (half / ".progress" / "build.json").write_text(json.dumps({"build_id": "0" * 16, "format": "pop3d-nuscenes-wds",
                                                              "schema_version": 2}))
    (half / ".progress" / "val-000000.tar.json").write_text(json.dumps({"schema_version": 2, "name": "val-000000.tar"}))
    before = {p: p.read_bytes() for p in half.rglob("*") if p.is_file()}
    spec = importlib.util.spec_from_file_location("build_shards_cli", REPO / "scripts" / "build_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val", "--out", str(half),
                   "--samples-per-shard", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "val-000000.tar.json" in err and "schema version 2" in err and "new --out" in err
    after = {p: p.read_bytes() for p in half.rglob("*") if p.is_file() and p.name != "lock"}
    assert after == {p: b for p, b in before.items() if p.name != "lock"}  # nothing mixed in, nothing touched


def test_overwrite_rebuilds_a_schema2_folder_and_keeps_foreign_files(shard_root: str, tmp_path: Path,
                                                                      synthetic_root, capsys) -> None:
    """--overwrite deletes the schema-2 build's own files (its shards, records, manifest) and rebuilds as
    schema 3 with stored GT; a file the builder did not write stays byte for byte."""
    v2 = write_v2_copy(shard_root, tmp_path / "v2")
    old_shards = sorted(p.name for p in v2.glob("val-*.tar"))
    (v2 / "notes.txt").write_text("mine")
    (v2 / "val-000000.tar.tmp-someoneelse-1").write_text("not ours")
    cli = _cli()
    args = ["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val", "--out", str(v2),
            "--samples-per-shard", "2", "--no-progress"]
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err  # the refusal names the way out
    assert cli.main([*args, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"deleted {len(old_shards) + 1} file(s)" in out, out  # the shards + manifest.json (no records in v2)
    man = json.loads((v2 / "manifest.json").read_text())
    assert man["schema_version"] == 3 and man["splits"]["val"]["eval_gt_grid"]["size"] == [100, 100, 8]
    assert (v2 / "notes.txt").read_text() == "mine"
    assert (v2 / "val-000000.tar.tmp-someoneelse-1").read_text() == "not ours"
    assert_same_gt(val_batches(str(v2), PAPER), val_batches(shard_root, PAPER))


def test_overwrite_refuses_a_folder_that_is_not_a_build(synthetic_root, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "something-else", "splits": {}}))
    (other / "val-000000.tar").write_bytes(b"x" * 10)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    rc = _cli().main(["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val", "--out",
                      str(other), "--no-progress", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "manifest.json" in err and "not a record" in err, err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------------
# damaged stored members are named errors, not a recompute
# ---------------------------------------------------------------------------------------------------------


def _first_key(path: Path) -> str:
    return _members(path)[0][0].name.split(".")[0]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["shape", "dtype", "grid_record", "one_missing_record"])
def test_damaged_stored_gt_is_a_named_error(shard_root: str, tmp_path: Path, case: str) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    shard = out / "val-000000.tar"
    key = _first_key(shard)
    if case == "shape":
        member = "eval_gt.npy"
        rewrite_member(shard, key, member, _npy(np.zeros((100, 100, 4), np.uint8)), True)
    elif case == "dtype":
        member = "voxel_label.npy"
        rewrite_member(shard, key, member, _npy(np.zeros((100, 100, 8), np.int64)), True)
    else:
        meta = json.loads(next(d for ti, d in _members(shard) if ti.name == f"{key}.meta.json"))
        if case == "grid_record":  # the record disagrees with the stored arrays
            meta["eval_gt_grid"]["size"] = [50, 50, 8]
            member = "voxel_label.npy"
        else:
            meta["eval_gt_grid"] = None
            member = "eval_gt.npy"
        rewrite_member(shard, key, "meta.json", json.dumps(meta, sort_keys=True).encode(), True)
    for grid in (PAPER, TINY):  # also when another grid is asked for: never a silent recompute
        with pytest.raises(ShardReadError) as info:
            val_batches(str(out), grid)
        msg = str(info.value)
        assert str(shard) in msg and key in msg and f"member {member}" in msg, msg
    from shards.verify import verify_shard_set

    bad = [p for r in verify_shard_set(str(out), splits=["val"], decode=True, progress=False) for p in r.problems]
    assert len(bad) == 1 and bad[0][0] == key and member in bad[0][1], bad


def test_damaged_stored_gt_stops_eval_cli(shard_root: str, tmp_path: Path) -> None:
    """scripts/eval.py (tiny config): exit 2, one line naming shard, sample and member, no traceback."""
    from pop3d.config import load_config
    from pop3d.training import build_student, save_student

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    weights = tmp_path / "student.safetensors"
    save_student(build_student(cfg), weights, cfg, step=0)
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    shard = out / "val-000000.tar"
    key = _first_key(shard)
    rewrite_member(shard, key, "eval_gt.npy", _npy(np.zeros((3,), np.uint8)), True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                           "--set", f"data.shards={out}", "--set", "data.num_workers=1", "--weights", str(weights),
                           "--random-text-embeddings", "--out", str(tmp_path / "eval.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    errors = [ln[ln.index("error: "):] for ln in proc.stderr.splitlines() if "error: " in ln]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(shard) in errors[0] and key in errors[0] and "member eval_gt.npy" in errors[0], errors
    assert not (tmp_path / "eval.json").exists()


# ---------------------------------------------------------------------------------------------------------
# the builder's choices: splits, grid, resume
# ---------------------------------------------------------------------------------------------------------


def test_eval_gt_splits_are_checked(synthetic_root, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--eval-gt-splits \['val'\]: not among"):
        build_shards(str(synthetic_root), ["v1.0-mini"], ["train"], str(tmp_path / "a"), progress=False,
                     eval_gt_splits=["val"])
    with pytest.raises(DataError, match=r"--eval-gt-splits \['test'\]: no lidarseg"):
        build_shards(str(synthetic_root), ["v1.0-test"], ["test"], str(tmp_path / "b"), progress=False,
                     eval_gt_splits=["test"])


def test_changing_the_grid_on_resume_rewrites_only_the_eval_gt_splits(synthetic_root, tmp_path: Path,
                                                                      capsys, monkeypatch) -> None:
    out = tmp_path / "s"
    build_shards(str(synthetic_root), ["v1.0-mini"], ["train", "val"], str(out), samples_per_shard=4,
                 progress=False, eval_gt_grid=TINY)
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["val"]["eval_gt_grid"]["size"] == [25, 25, 4] and man["splits"]["train"]["eval_gt_grid"] is None
    train_bytes = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    assert all(b"eval_gt.npy" not in b for b in train_bytes.values())
    small = GridSpec(pc_min=(-20.0, -20.0, -4.0), pc_max=(20.0, 20.0, 2.0), size=(10, 10, 3))
    capsys.readouterr()
    build_shards(str(synthetic_root), ["v1.0-mini"], ["train", "val"], str(out), samples_per_shard=4,
                 progress=False, eval_gt_grid=small)
    assert f"reusing {len(train_bytes)} finished shard(s)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == train_bytes
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["val"]["eval_gt_grid"] == evalgt.grid_record(small)
    assert_same_gt(val_batches(str(out), small), computed_batches(str(out), small, monkeypatch))
    build_shards(str(synthetic_root), ["v1.0-mini"], ["val"], str(out), samples_per_shard=4, progress=False,
                 eval_gt_splits=[])
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["val"]["eval_gt_grid"] is None
    assert all(b"eval_gt.npy" not in p.read_bytes() for p in out.glob("val-*.tar"))


def _cli():
    spec = importlib.util.spec_from_file_location("build_shards_cli2", REPO / "scripts" / "build_shards.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_build_shards_cli_grid_flags(synthetic_root, tmp_path: Path, capsys) -> None:
    cli = _cli()
    out = tmp_path / "s"
    rc = cli.main(["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val", "--out", str(out),
                   "--no-progress", "--eval-gt-grid", "10", "12", "3", "--eval-gt-range", "-20", "-24", "-4", "20",
                   "24", "2"])
    assert rc == 0 and "eval GT stored for 10x12x3" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["splits"]["val"]["eval_gt_grid"] == {"pc_min": [-20.0, -24.0, -4.0], "pc_max": [20.0, 24.0, 2.0],
                                                    "size": [10, 12, 3]}
    got = val_batches(str(out), GridSpec(pc_min=(-20, -24, -4), pc_max=(20, 24, 2), size=(10, 12, 3)))
    assert got[0]["eval_gt"].shape == (1, 10, 12, 3)
    for bad in (["--eval-gt-grid", "0", "12", "3"], ["--eval-gt-range", "20", "-24", "-4", "-20", "24", "2"]):
        rc = cli.main(["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val", "--out",
                       str(tmp_path / "bad"), "--no-progress", *bad])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "--eval-gt-grid" in err, err
    assert not (tmp_path / "bad").exists()


def test_bad_lidarseg_ids_are_a_named_build_error() -> None:
    from shards.writer import with_eval_gt

    sample = {"token": "t", "meta": {"lidarseg_file": "lidarseg/v1.0-mini/x_lidarseg.bin"},
              "points": np.zeros((3, 4), np.float32), "lidarseg": np.array([1, 200, 3], np.uint8)}
    with pytest.raises(DataError, match=r"^/root/lidarseg/v1.0-mini/x_lidarseg.bin: lidarseg labels"):
        with_eval_gt(sample, PAPER, "/root")
    assert with_eval_gt(sample, None)["meta"]["eval_gt_grid"] is None and "eval_gt" not in with_eval_gt(sample, None)
