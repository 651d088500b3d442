"""The layout holds: configs read without torch models or the disk, one factory, the synthetic package's
names, nothing outside training imports the training loop."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from pop3d.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    return out.stdout.strip()


def test_the_paper_config_loads_without_the_teacher_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ckpts/maskclip_plus.safetensors (a relative path) does not exist here
    cfg = load_config(ROOT / "configs" / "pop3d_12ep.yaml")
    assert cfg.teacher.weights == "ckpts/maskclip_plus.safetensors"
    assert not Path(cfg.teacher.weights).exists()
    from teacher.live import build_teacher_from_config

    with pytest.raises(ValueError, match="teacher.weights: ckpts/maskclip_plus.safetensors: no such file"):
        build_teacher_from_config(cfg.teacher)


def test_teacher_config_imports_without_torch():
    assert _run("import sys, teacher.config; print('torch' in sys.modules)") == "False"


@pytest.mark.parametrize(("override", "key"), [
    ("teacher.kind=dino", "teacher.kind"), ("teacher.sampler=nearest", "teacher.sampler"),
    ("teacher.amp_dtype=fp8", "teacher.amp_dtype"), ("teacher.resize_method=area", "teacher.resize_method"),
    ("model.attention_backend=cuda", "model.attention_backend"), ("model.depth=34", "model.depth"),
])
def test_an_enumerated_field_outside_its_literal_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"pop3d_12ep.yaml: {key}: expected one of"):
        load_config(ROOT / "configs" / "pop3d_12ep.yaml", [override])


def test_student_and_teacher_configs_validate_with_one_method_naming_the_key():
    from pop3d.model.config import StudentConfig
    from teacher.config import TeacherConfig

    cfg = StudentConfig()
    cfg.levels = 2
    with pytest.raises(ValueError, match=r"StudentConfig.levels must be >= 3"):
        cfg.validate()
    tcfg = TeacherConfig()
    tcfg.chunk = -1
    with pytest.raises(ValueError, match=r"TeacherConfig.chunk must be >= 0"):
        tcfg.validate()


def test_run_config_sections_are_typed():
    from pop3d.model.config import StudentConfig
    from teacher.config import TeacherConfig

    hints = typing.get_type_hints(RunConfig, localns={"StudentConfig": StudentConfig, "TeacherConfig": TeacherConfig})
    assert hints["model"] is StudentConfig and hints["teacher"] is TeacherConfig


def test_the_factory_round_trips_weights_and_names_mismatches(tmp_path):
    from _student_refs import micro_config

    from p3d_common.safetensors_io import CheckpointError
    from pop3d.factory import grid_spec_of, load_student, save_student

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.model = micro_config()
    torch.manual_seed(0)
    from pop3d.factory import build_student

    model = build_student(cfg)
    path = tmp_path / "s.safetensors"
    save_student(model, path, cfg, step=3)
    loaded, report = load_student(cfg, path)
    assert not loaded.training and report.kind == "pop3d"
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    cfg.model = micro_config(feature_dim=6)
    with pytest.raises(CheckpointError, match="shape"):
        load_student(cfg, path)
    grid = grid_spec_of(cfg)
    assert tuple(grid.size) == (cfg.model.tpv_w, cfg.model.tpv_h, cfg.model.tpv_z)


def test_nothing_outside_training_imports_the_training_loop():
    allowed = {ROOT / "pop3d" / "training.py", ROOT / "scripts" / "train.py"}
    for path in [*(ROOT / "pop3d").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert "pop3d.training" not in mods, path


def test_the_synthetic_package_keeps_every_name_and_builds_its_noise_table_lazily():
    names = ["DEFAULT_MINI_SCENES", "RENDER_COLORS", "make_synthetic_nuscenes", "matrix_to_quaternion", "_Box",
             "_World", "_make_world", "_ground_class", "_cast", "_ray_box", "_lidar_sweep", "_make_calibration",
             "_Motion", "_render", "_pixel_rays", "_static_tables", "_generate_version", "_Tokens", "ROAD", "EGO"]
    code = ("import shards.synthetic as s, shards.synthetic.render as r; "
            f"missing = [n for n in {names!r} if not hasattr(s, n)]; "
            "before = r._noise.cache_info().currsize; shape = s._NOISE.shape; "
            "print(missing, before, shape, r._noise.cache_info().currsize)")
    assert _run(code) == "[] 0 (1024, 1600) 1"
