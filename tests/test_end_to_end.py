"""Shard -> live teacher -> student -> loss -> step, as `scripts/train.py` runs it, on the synthetic data;
then resume, zero-shot evaluation, and the boundaries (teacher frozen, never saved)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pop3d.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(shard_root: str, out_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.shards={shard_root}", f"train.output_dir={out_dir}", "data.num_workers=0", "train.max_steps=2",
        "train.save_every=1", "train.log_every=1", *extra])


@pytest.fixture(scope="module")
def trained(shard_root, tmp_path_factory):
    from pop3d.training import train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(shard_root, out)
    final = train(cfg)
    return cfg, out, final


def test_training_writes_student_only_weights_and_finite_logs(trained):
    from p3d_common.safetensors_io import load_safetensors

    cfg, out, final = trained
    tensors, meta = load_safetensors(final)
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"img_backbone", "img_neck", "tpv_head", "tpv_aggregator"}, prefixes  # no teacher
    assert meta["format"] == "pop3d-student" and json.loads(meta["model_config"])["dim"] == cfg.model.dim
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(math.isfinite(r[k]) and abs(r[k]) < 1e6 for k in ("total", "lovasz", "ce", "feature"))
        assert r["feature"] > 0  # the synthetic LiDAR is seen by the cameras: teacher targets exist
    assert (out / "checkpoints" / "step_0000002" / "trainer_state.json").is_file()


def test_resume_continues_from_the_last_checkpoint(trained, shard_root):
    from pop3d.training import train

    _, out, _ = trained
    cfg3 = tiny_config(shard_root, out, "train.max_steps=3")
    train(cfg3, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # steps 1-2 were not redone


def test_one_step_trains_the_student_and_leaves_the_teacher_untouched(shard_root, tmp_path):
    from pop3d.schedule import build_optimizer
    from pop3d.factory import batch_to_device, build_student, grid_spec_of
    from pop3d.training import compute_loss
    from shards.loader import make_loader
    from teacher.live import build_teacher_from_config

    torch.manual_seed(0)
    cfg = tiny_config(shard_root, tmp_path)
    model = build_student(cfg).train()
    teacher = build_teacher_from_config(cfg.teacher)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-3)
    batch = batch_to_device(next(iter(make_loader(shard_root, "train", num_workers=0,
                                                          grid=grid_spec_of(cfg)))), torch.device("cpu"))
    terms, timings = compute_loss(model, teacher, batch, cfg, torch.Generator().manual_seed(0))
    terms.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any(k.startswith("tpv_aggregator.decoder_ft") for k in changed)
    # frozen parts of the student stay frozen: stem, layer1 and every BatchNorm
    for k in changed:
        assert not k.startswith(("img_backbone.conv1", "img_backbone.bn1", "img_backbone.layer1")), k
        assert ".bn" not in k and "downsample.1" not in k, k
    assert set(timings) == {"teacher_ms", "student_fwd_ms"}


def test_zero_shot_evaluation_runs_on_the_val_split(trained, shard_root):
    from pop3d.checkpoint import load_student_weights
    from pop3d.evaluate import evaluate, random_text_prompts
    from pop3d.factory import build_student, grid_spec_of
    from shards.loader import make_loader

    cfg, _, final = trained
    model = build_student(cfg)
    load_student_weights(model, final, kind="pop3d")
    loader = make_loader(shard_root, "val", num_workers=0, grid=grid_spec_of(cfg), eval_gt=True)
    m = evaluate(model, loader, random_text_prompts(cfg.model.feature_dim), device=torch.device("cpu"),
                 student_image_hw=cfg.data.student_image_hw, max_samples=2, progress=False)
    assert m.samples == 2
    seen, pos, _ = m.semantic.counts
    assert seen.sum() > 0 and seen.sum() == pos.sum()  # every non-ignored voxel got exactly one prediction
    # free/occupied scores the same voxels plus the semantic-ignore ones the ray cast left unobserved
    extra = sum(int(((b["eval_gt"][0] == 255) & (b["voxel_label"][0] == 0)).sum())
                for b, _ in zip(make_loader(shard_root, "val", num_workers=0, grid=grid_spec_of(cfg), eval_gt=True),
                                range(2)))
    assert m.occupancy.counts[0].sum() == seen.sum() + extra
    assert m.points.counts[0].sum() > 0
    assert "mIoU" in m.semantic.table()


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(shard_root, tmp_path):
    """The multi-process path: `accelerate launch` with 2 CPU processes (gloo DDP), every rank its own shards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # On a CPU-only machine `--multi_gpu` is what starts a gloo process group (`--cpu` alone runs one process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29533", str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--set", f"data.shards={shard_root}", "--set", f"train.output_dir={tmp_path}", "--set",
           "data.num_workers=0", "--set", "train.max_steps=2", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    assert (tmp_path / "student.safetensors").is_file()


def test_eval_script_prints_tables_and_writes_json(trained, shard_root, tmp_path):
    _, _, final = trained
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "eval.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--set", f"data.shards={shard_root}", "--set", "data.num_workers=0", "--weights", str(final),
           "--random-text-embeddings", "--max-samples", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOM TEXT EMBEDDINGS" in proc.stdout and "mIoU (present classes)" in proc.stdout
    results = json.loads(out.read_text())
    assert results["samples"] == 2 and results["random_text_embeddings"] is True
    assert set(results) >= {"semantic", "occupancy", "points"}
    assert len(results["semantic"]["iou"]) == 17
    no_text = subprocess.run(cmd[:-5] + ["--max-samples", "1"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, check=False)
    assert no_text.returncode == 2 and "no text embeddings" in no_text.stderr
