"""scripts/check_parity.py as a user runs it: both reference fixtures pass; a fixture whose expected outputs
were perturbed fails with exit code 1; an incomplete fixture is refused with exit code 2."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from _paths import FIXTURES, ROOT

SCRIPT = str(ROOT / "scripts" / "check_parity.py")


def run(fixture) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--fixture", str(fixture)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, check=False)


@pytest.mark.parametrize("name", ["student_tiny", "teacher_tiny"])
def test_reference_fixture_passes(name):
    proc = run(FIXTURES / name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parity ok" in proc.stdout


def test_perturbed_expected_output_fails(tmp_path):
    fixture = tmp_path / "student_perturbed"
    shutil.copytree(FIXTURES / "student_tiny", fixture)
    outputs = torch.load(fixture / "outputs.pt", weights_only=True)
    outputs["logits_vox_fts"] = outputs["logits_vox_fts"] + 1e-3  # ten times the tolerance
    torch.save(outputs, fixture / "outputs.pt")
    proc = run(fixture)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "logits_vox_fts" in proc.stdout and "FAIL" in proc.stdout


def test_incomplete_fixture_is_refused(tmp_path):
    fixture = tmp_path / "broken"
    shutil.copytree(FIXTURES / "teacher_tiny", fixture)
    (fixture / "outputs.pt").unlink()
    proc = run(fixture)
    assert proc.returncode == 2
    assert "outputs.pt" in proc.stderr
