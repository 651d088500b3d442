"""p3d_common: a torch-free leaf, one taxonomy, atomic writes that honour the umask, the banner."""
from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p3d_common.atomic import atomic_path, atomic_write_json
from p3d_common.banner import banner_text
from p3d_common.labels import (
    CLASS_NAMES,
    EMPTY_CLASS,
    IGNORE_CLASS,
    LIDARSEG_CLASSES,
    RAW_TO_NOIGNORE,
    SEMANTIC_CLASSES,
)

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_package_imports_nothing_of_ours_and_not_torch():
    ours = {"pop3d", "teacher", "shards", "scripts"}
    for path in (ROOT / "p3d_common").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & ours, (path.name, names)
    code = ("import sys, p3d_common.labels, p3d_common.atomic, p3d_common.banner, p3d_common.safetensors_io; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def test_shards_and_teacher_never_import_pop3d_or_each_other():
    forbidden = {"shards": {"pop3d", "teacher"}, "teacher": {"pop3d", "shards"}}
    for pkg, banned in forbidden.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module.split(".")[0] not in banned, (str(path), node.module)
                if isinstance(node, ast.Import):
                    for a in node.names:
                        assert a.name.split(".")[0] not in banned, (str(path), a.name)


def test_the_taxonomy_agrees_with_the_raw_names():
    assert len(LIDARSEG_CLASSES) == 32 and len(CLASS_NAMES) == 18
    assert CLASS_NAMES[IGNORE_CLASS] == "ignore" and CLASS_NAMES[EMPTY_CLASS] == "empty"
    assert SEMANTIC_CLASSES == tuple(range(1, 17))
    # every semantic class is the target of a raw class whose name contains it (written independently)
    hints = {"barrier": "barrier", "bicycle": "vehicle.bicycle", "bus": "bus", "car": "vehicle.car",
             "construction_vehicle": "construction", "motorcycle": "motorcycle", "pedestrian": "pedestrian",
             "traffic_cone": "trafficcone", "trailer": "trailer", "truck": "truck",
             "driveable_surface": "driveable", "other_flat": "flat.other", "sidewalk": "sidewalk",
             "terrain": "terrain", "manmade": "manmade", "vegetation": "vegetation"}
    for k in SEMANTIC_CLASSES:
        raws = [LIDARSEG_CLASSES[r] for r in range(32) if RAW_TO_NOIGNORE[r] == k]
        assert raws and all(hints[CLASS_NAMES[k]] in n for n in raws), (CLASS_NAMES[k], raws)
    assert RAW_TO_NOIGNORE[LIDARSEG_CLASSES.index("noise")] == IGNORE_CLASS


def test_json_written_atomically_gets_the_umask_permissions(tmp_path, umask_022):
    out = tmp_path / "sub" / "r.json"
    atomic_write_json(out, {"a": 1}, indent=1)
    assert json.loads(out.read_text()) == {"a": 1} and out.read_text().endswith("\n")
    assert _mode(out) == 0o644
    os.umask(0o027)
    atomic_write_json(out, {"a": 2})
    assert _mode(out) == 0o640
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_safetensors_and_png_outputs_get_the_umask_permissions(tmp_path, umask_022):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from p3d_common.safetensors_io import load_safetensors, save_safetensors

    st = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.arange(3.0)}, st, metadata={"k": [1, 2]})
    tensors, meta = load_safetensors(st)
    assert torch.equal(tensors["x"], torch.arange(3.0)) and json.loads(meta["k"]) == [1, 2]
    assert _mode(st) == 0o644
    png = tmp_path / "f.png"
    with atomic_path(png) as tmp:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp, format="PNG")
    assert _mode(png) == 0o644 and Image.open(png).size == (4, 4)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "keep.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_banner_is_three_lines_with_the_message_in_the_middle():
    lines = banner_text("RANDOM X").splitlines()
    assert lines[0] == lines[2] == "!" * 100 and lines[1] == "!! RANDOM X"
