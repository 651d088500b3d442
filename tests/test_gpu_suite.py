"""benchmarks/gpu_suite.py: the dry run writes one JSON with every section (fail-soft), the wheel install
never touches torch, and bad arguments exit 2 with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite


def _run(tmp_path, *args):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out",
                           str(out), *args], capture_output=True, text=True, timeout=1200, cwd=ROOT, check=False)
    return proc, out


def test_dry_run_measures_every_section(tmp_path):
    """~30 s on an idle 2-core machine."""
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and set(doc["sections"]) == set(gpu_suite.SECTIONS)
    sec = doc["sections"]
    for name, res in sec.items():
        assert "error" not in res, (name, res.get("error"), res.get("traceback"))
    assert sec["teacher"]["eager"]["ms"] > 0 and sec["student"]["pytorch"]["ms"] > 0
    assert 0 < sec["train_step"]["teacher_share"] < 1 and sec["train_step"]["timer"] == "host"
    rows = sec["loader"]["rows"]
    assert {r["eval_gt"] for r in rows} == {False, True} and all(r["samples"] > 0 for r in rows)
    assert sec["loader"]["raycast"]["identical"] is True
    assert sec["inference"]["fp32"]["samples_per_s"] > 0 and sec["inference"]["bf16"]["samples_per_s"] > 0
    import torch

    if gpu_suite.triton_usable(torch.device("cpu"))[0]:
        assert max(sec["fused_msda"]["max_rel_diff"].values()) < 1e-4  # fp32 rounding of the two backends
    else:  # on CPU the triton backend needs TRITON_INTERPRET=1
        assert "skipped" in sec["fused_msda"] and "skipped" in sec["student"]["triton"]
    for key in ("photometric_False", "photometric_True"):
        assert sec["sync_debug"][key]["mode"].startswith("SyncCounter")
    assert sec["sync_debug"]["photometric_False"]["syncs"] <= 4
    assert any(line.startswith("| train_step |") for line in doc["table"])
    assert "| section | result | target |" in proc.stdout


def test_one_section_and_fail_soft(tmp_path, monkeypatch):
    """A failing section is recorded with its error; the others still run and the JSON is written."""
    def boom(ctx):
        raise RuntimeError("kaput")

    monkeypatch.setitem(gpu_suite.SECTIONS, "teacher", boom)
    out = tmp_path / "s.json"
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--sections", "teacher,sync_debug"]) == 0
    doc = json.loads(out.read_text())
    assert doc["sections"]["teacher"]["error"] == "RuntimeError: kaput"
    assert doc["sections"]["sync_debug"]["photometric_False"]["syncs"] <= 4


def test_batch_size_option_steps_on_b_samples(tmp_path):
    out = tmp_path / "b2.json"
    assert gpu_suite.main(["--dry-run", "--out", str(out), "--sections", "train_step,sync_debug",
                           "--batch-size", "2"]) == 0
    sec = json.loads(out.read_text())["sections"]
    assert "error" not in sec["train_step"], sec["train_step"].get("traceback")
    assert sec["train_step"]["batch_size"] == 2
    assert sec["train_step"]["samples_per_s"] == pytest.approx(2e3 / sec["train_step"]["ms"])
    assert all(sec["sync_debug"][k]["syncs"] <= 4 for k in ("photometric_False", "photometric_True"))


def test_wheels_never_install_torch(tmp_path, monkeypatch):
    for name in ("torch-2.9.0-cp312-cp312-linux_x86_64.whl", "triton-3.5.0-cp312-cp312-linux_x86_64.whl",
                 "torchvision-0.24.0-cp312-cp312-linux_x86_64.whl", "nvidia_cudnn_cu12-9.1-py3-none-any.whl",
                 "webdataset-1.0.2-py3-none-any.whl", "open_clip_torch-3.2.0-py3-none-any.whl",
                 "nuscenes_devkit-1.1.11-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    calls = []
    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gpu_suite.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    got = gpu_suite.install_wheels(str(tmp_path), str(tmp_path / "site"))
    assert got == ["nuscenes_devkit-1.1.11-py3-none-any.whl", "open_clip_torch-3.2.0-py3-none-any.whl",
                   "webdataset-1.0.2-py3-none-any.whl"]
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-index" in cmd and "--no-deps" in cmd
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "site")


def test_bad_arguments_exit_2(tmp_path):
    proc, _ = _run(tmp_path, "--sections", "teacher,nonsense")
    assert proc.returncode == 2 and "nonsense" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = _run(tmp_path, "--wheels", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    bad = tmp_path / "bad_wheels"
    bad.mkdir()
    (bad / "webdataset-1.0.2-py3-none-any.whl").write_bytes(b"not a zip")  # pip refuses it: one line, exit 2
    proc, _ = _run(tmp_path, "--wheels", str(bad))
    assert proc.returncode == 2 and "pip could not install them" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc, _ = _run(tmp_path, "--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size" in proc.stderr and "Traceback" not in proc.stderr
