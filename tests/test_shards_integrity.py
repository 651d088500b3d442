"""Data integrity: every sample verified before use, named failures, verify_shards, the builder's own files."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from _damage import CASES, damage, first_key, flip_byte

from shards.errors import ShardReadError, one_line
from shards.loader import make_loader, read_sample
from shards.reader import DataError, open_nuscenes, plan_split
from shards.writer import build_shards

REPO = Path(__file__).resolve().parents[1]


def copy_set(shard_root: str, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    return out


def load_all(source: str, split: str, workers: int = 0) -> list[str]:
    return [t for b in make_loader(source, split, num_workers=workers, eval_gt=False) for t in b["tokens"]]


def run_script(name: str, argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


# ---------------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_shard_stops_the_loader_naming_shard_key_member(shard_root: str, tmp_path: Path, case: str) -> None:
    out = copy_set(shard_root, tmp_path)
    shard = out / "val-000000.tar"
    key, member = damage(shard, case)
    with pytest.raises(ShardReadError) as info:
        load_all(str(out), "val")
    msg = str(info.value)
    assert msg.startswith(str(shard)), msg
    assert key in msg and (member is None or f"member {member}" in msg), msg


@pytest.mark.parametrize("case", ["garbage_jpeg", "truncated_npy", "garbage_json"])
def test_undecodable_member_with_matching_checksums_is_named_too(shard_root: str, tmp_path: Path, case: str) -> None:
    """A sample whose checksums agree (bad bytes at write time) still fails in the decoder, named."""
    out = copy_set(shard_root, tmp_path)
    shard = out / "val-000000.tar"
    key, member = damage(shard, case, consistent=True)
    with pytest.raises(ShardReadError) as info:
        load_all(str(out), "val")
    msg = str(info.value)
    assert msg.startswith(f"{shard}: sample {key}: member {member}") and "decoded" in msg, msg
    assert "checksum" not in msg


def test_worker_error_reads_as_one_line(shard_root: str, tmp_path: Path) -> None:
    out = copy_set(shard_root, tmp_path)
    shard = out / "val-000000.tar"
    key, member = damage(shard, "flipped_byte")
    with pytest.raises(ShardReadError) as info:
        load_all(str(out), "val", workers=1)
    line = one_line(info.value)
    assert "\n" not in line and line.startswith(f"{shard}: sample {key}: member {member}: checksum mismatch"), line


def test_intact_set_loads_and_read_sample_verifies(shard_root: str, tmp_path: Path) -> None:
    out = copy_set(shard_root, tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    keys = [k for sh in man["splits"]["val"]["shards"] for k, _ in sh["samples"]]
    assert sorted(load_all(str(out), "val")) == sorted(keys)
    flip_byte(out / "val-000000.tar", keys[0], "lidar2cam.npy", at=140)
    with pytest.raises(ShardReadError, match=f"sample {keys[0]}: member lidar2cam.npy"):
        read_sample(str(out), "val", index=0)


def test_old_schema_is_refused_with_rebuild_hint(shard_root: str, tmp_path: Path) -> None:
    out = copy_set(shard_root, tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    man["schema_version"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ShardReadError, match="schema version 1.*rebuild the shards") as info:
        load_all(str(out), "val")
    assert str(out / "manifest.json") in str(info.value)
    # a schema-1 tar read without manifest: no checksum member
    man["schema_version"] = 2
    (out / "manifest.json").unlink()
    shard = out / "val-000000.tar"
    key = first_key(shard)
    with tarfile.open(shard) as tf:
        kept = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers() if not ti.name.endswith("checksums.json")]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in kept:
            tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(ShardReadError, match=f"{shard}: sample {key}: no member checksums.json.*rebuild"):
        load_all(str(shard), "val")


# ---------------------------------------------------------------------------------------------------------
# scripts/verify_shards.py
# ---------------------------------------------------------------------------------------------------------


def flip_padding(path: Path) -> None:
    """Flip a byte in the zero padding after a member's data (tar readers ignore it; members stay intact)."""
    with tarfile.open(path) as tf:
        ti = next(t for t in tf.getmembers() if t.size % 512)
    data = bytearray(path.read_bytes())
    data[ti.offset_data + ti.size] ^= 1
    path.write_bytes(bytes(data))


def test_verify_shards_ok_and_every_damage_listed(shard_root: str, tmp_path: Path, capsys) -> None:
    out = copy_set(shard_root, tmp_path)
    assert run_script("verify_shards", [str(out), "--no-progress", "--decode"]) == 0
    text = capsys.readouterr().out
    assert "OK: 4 shards, 8 samples" in text and "train" in text and "val" in text

    k_train0, m_train0 = damage(out / "train-000000.tar", "flipped_byte")
    k_train1, m_train1 = damage(out / "train-000001.tar", "garbage_json")
    damage(out / "test-000000.tar", "missing_shard")
    flip_padding(out / "val-000000.tar")  # only the whole-file sha256 sees this one
    assert run_script("verify_shards", [str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    bad = [line for line in text.splitlines() if line.startswith("BAD ")]
    assert f"BAD {out / 'train-000000.tar'}: sample {k_train0}: member {m_train0}: checksum mismatch" in text
    assert f"BAD {out / 'train-000001.tar'}: sample {k_train1}: member {m_train1}: checksum mismatch" in text
    assert any(line.startswith(f"BAD {out / 'test-000000.tar'}: ") and "missing" in line for line in bad)
    assert f"BAD {out / 'val-000000.tar'}: sha256 of the file differs from the manifest" in text
    # the two damaged samples fail their checksum, so the tar-level sha256 mismatch is listed for them too
    assert {line.split(":")[0] for line in bad} == {f"BAD {out / n}" for n in
                                                    ("train-000000.tar", "train-000001.tar", "test-000000.tar",
                                                     "val-000000.tar")}
    (out / "manifest.json").write_text("{")
    assert run_script("verify_shards", [str(out)]) == 2
    assert str(out / "manifest.json") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the builder: only its own files; a changed source rewrites its shard
# ---------------------------------------------------------------------------------------------------------


def build(root, out: Path, spp: int = 2, **kw) -> dict:
    return build_shards(str(root), ["v1.0-mini"], ["train", "val"], str(out), samples_per_shard=spp,
                        progress=False, **kw)


FOREIGN = {"notes.txt": b"mine", "data.tmp-123": b"an editor's temp file", "train-000042.tar": b"not yours",
           "val-000000.tar.bak": b"backup", "sub/train-000000.tar": b"nested"}


def plant(out: Path) -> None:
    for name, data in FOREIGN.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def test_foreign_files_survive_builds_and_rebuilds(synthetic_root, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    plant(out)
    build(synthetic_root, out)
    build(synthetic_root, out)  # resume: nothing to do
    m = build(synthetic_root, out, spp=4)  # fewer shards: our train-000001.tar goes, foreign files stay
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["train-000000.tar"]
    assert not (out / "train-000001.tar").exists()
    for name, data in FOREIGN.items():
        assert (out / name).read_bytes() == data, name


def test_foreign_file_at_an_output_name_stops_the_build(synthetic_root, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "val-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(DataError) as info:
        build(synthetic_root, out)
    assert str(out / "val-000000.tar") in str(info.value) and "not written by" in str(info.value)
    assert (out / "val-000000.tar").read_bytes() == b"someone else's shard"
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar.tmp-*"))
    rc = run_script("build_shards", ["--dataroot", str(synthetic_root), "--version", "v1.0-mini", "--splits", "val",
                                     "--out", str(out), "--no-progress", "--samples-per-shard", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(out / "val-000000.tar") in err


def test_second_build_on_the_same_folder_is_refused(synthetic_root, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".progress").mkdir(parents=True)
    with open(out / ".progress" / "lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another build_shards is writing here"):
            build(synthetic_root, out)
    assert not list(out.glob("*.tar"))


def test_shard_is_rewritten_when_its_source_changed(synthetic_root, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(str(synthetic_root), str(root), copy_function=os.link)
    out = tmp_path / "out"
    build(root, out)
    recs = plan_split(open_nuscenes(str(root), "v1.0-mini"), "val", check_files=False).records
    src = root / recs[0].cam_files[1]
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, still a JPEG: only a content/mtime fingerprint sees it
    st = os.stat(src)
    src.unlink()
    src.write_bytes(bytes(data))
    ino = {p.name: p.stat().st_ino for p in out.glob("*.tar")}

    def member(name: str) -> bytes:
        with tarfile.open(out / "val-000000.tar") as tf:
            return tf.extractfile(f"{recs[0].token}.{name}").read()

    build(root, out)  # default: size + mtime
    assert member("cam_front_right.jpg") == bytes(data)
    assert (out / "val-000000.tar").stat().st_ino != ino["val-000000.tar"]
    assert all((out / n).stat().st_ino == i for n, i in ino.items() if n != "val-000000.tar")

    # same size AND the old mtime restored: invisible to "stat", seen by "content"
    data[len(data) // 3] ^= 0x01
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    build(root, out, source_check="content")
    ino = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    build(root, out, source_check="content")  # unchanged now: everything kept
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar")} == ino
    data[len(data) // 4] ^= 0x01
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    build(root, out, source_check="content")
    assert member("cam_front_right.jpg") == bytes(data)
    assert hashlib.sha256(member("cam_front_right.jpg")).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
