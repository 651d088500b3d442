"""Each damaged-shard case stops scripts/train.py AND scripts/eval.py (tiny config, subprocess): exit status 2,
one line on stderr naming the shard and the sample key (and member), no traceback.

One case runs by default (a flipped byte inside a well-formed tar: the case that trained silently before);
the others are ``slow`` (each is two subprocesses of ~20 s on a shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _damage import CASES, damage

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Student weights of the tiny config (untrained: eval only needs to reach the data)."""
    from pop3d.config import load_config
    from pop3d.training import build_student, save_student

    cfg = load_config(TINY)
    path = tmp_path_factory.mktemp("weights") / "student.safetensors"
    save_student(build_student(cfg), path, cfg, step=0)
    return path


def run(script: str, shards: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts" / script), "--config", str(TINY), "--set", f"data.shards={shards}",
           "--set", "data.num_workers=1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def damaged_copy(shard_root: str, tmp_path: Path, split: str, case: str) -> tuple[Path, list[tuple[Path, str, str]]]:
    """A copy with every shard of ``split`` damaged as ``case``; [(shard, key, member or '')] named by errors."""
    out = tmp_path / "shards"
    shutil.copytree(shard_root, out)
    man = json.loads((out / "manifest.json").read_text())
    named = []
    for sh in man["splits"][split]["shards"]:
        key, member = damage(out / sh["name"], case)
        named.append((out / sh["name"], key, member or ""))
        if case == "missing_shard":
            break  # one missing shard is enough (the check runs before any step)
    return out, named


def assert_named(proc: subprocess.CompletedProcess, named: list[tuple[Path, str, str]]) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    errors = [line[line.index("error: "):] for line in err.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]  # one error line (tqdm may share stderr)
    last = errors[0]
    assert any(str(shard) in last and key in last and (not member or f"member {member}" in last)
               for shard, key, member in named), (last, named)


CLI_CASES = [pytest.param(c, marks=() if c == "flipped_byte" else pytest.mark.slow) for c in sorted(CASES)]


@pytest.mark.parametrize("case", CLI_CASES)
def test_damaged_shard_stops_train_and_eval(shard_root: str, tmp_path: Path, tiny_weights: Path, case: str) -> None:
    shards, named = damaged_copy(shard_root, tmp_path / "train", "train", case)
    proc = run("train.py", shards, "--set", "train.max_steps=2", "--set", f"train.output_dir={tmp_path / 'run'}")
    assert_named(proc, named)
    assert not (tmp_path / "run" / "student.safetensors").exists()

    shards, named = damaged_copy(shard_root, tmp_path / "eval", "val", case)
    proc = run("eval.py", shards, "--weights", str(tiny_weights), "--random-text-embeddings",
               "--out", str(tmp_path / "eval.json"))
    assert_named(proc, named)
    assert not (tmp_path / "eval.json").exists()
