"""Training you can trust, as a user runs it (real `scripts/train.py` subprocesses on the synthetic shards):

- SIGKILL between checkpoints, then --resume: every later logged loss and the final weights are bit-identical to
  an uninterrupted run, with photometric augmentation, GridMask and dropout on, and with a different number of
  DataLoader workers; log.jsonl holds each step once; a crafted pickle in the checkpoint is never run;
- 2 processes (gloo) == 1 process with grad_accum_steps=2;
- `accelerate launch --num_processes 2 scripts/eval.py` == the 1-process numbers;
- a 2-epoch run writes TensorBoard events with the losses and the validation metrics.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("total", "lovasz", "ce", "feature", "lr", "grad_norm")

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _train_cmd(shard_root: str, out: Path, *extra: str) -> list[str]:
    sets = [f"data.shards={shard_root}", f"train.output_dir={out}", "train.epochs=2", "train.save_every=3",
            "train.log_every=1", "train.warmup_steps=2", "data.shuffle_buffer=3", *extra]
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            *[x for s in sets for x in ("--set", s)]]


def _launch_cmd(n: int, port: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), str(ROOT / "scripts" / script), *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def uninterrupted(shard_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _run(_train_cmd(shard_root, out, "data.num_workers=0"))
    return out


def _write_marker_pickle(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Payload()))


def test_sigkill_then_resume_is_bit_identical(uninterrupted, shard_root, tmp_path):
    ref = _records(uninterrupted)
    out = tmp_path / "killed"
    # Two DataLoader workers here, none in the reference: the order must not depend on them either.
    cmd = _train_cmd(shard_root, out, "data.num_workers=2")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.is_file() else []
        if any(json.loads(x)["step"] >= 5 for x in lines[:-1] + (lines[-1:] if lines and lines[-1].endswith("}")
                                                                    else [])):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts[-1] == "step_0000004", ckpts  # saved at 3 and at the end of epoch 0; killed in step 5 or 6
    # a crafted pickle where accelerate would look for its state: never opened by --resume
    marker = tmp_path / "PICKLE_RAN"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        _write_marker_pickle(out / "checkpoints" / ckpts[-1] / name, marker)
    _run(cmd + ["--resume"])
    assert not marker.exists(), "a pickle in the checkpoint folder was executed"

    got = _records(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # no step logged twice, none missing
    for a, b in zip(ref, got):
        assert set(a) == set(b)
        for k in a:
            if k in LOSS_KEYS or k.startswith("val/"):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])  # bit-identical, not approximately
    wa, wb = _weights(uninterrupted / "student.safetensors"), _weights(out / "student.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]
    # what the checkpoint holds: safetensors + JSON of ours (plus the planted files), nothing pickled by us
    state = json.loads((out / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["epoch"] == 1
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000008").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "trainer_state.json"]


def test_augmentation_grid_mask_and_dropout_were_on(uninterrupted):
    from pop3d.config import load_config

    cfg = load_config(uninterrupted / "config.yaml")
    assert cfg.data.photometric_aug and cfg.model.grid_mask and cfg.model.dropout > 0


def test_two_epoch_run_writes_tensorboard_scalars(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((uninterrupted / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"total", "feature", "lr", "samples_per_s", "val/miou", "val/occupancy_iou"} <= tags, tags
    logged = {r["step"]: r for r in _records(uninterrupted) if "total" in r}
    events = acc.Scalars("total")
    assert [e.step for e in events] == sorted(logged)
    for e in events:
        assert e.value == pytest.approx(logged[e.step]["total"], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/miou")] == [4, 8]  # after each epoch


def test_checkpoints_kept_are_the_last_three(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    state = json.loads((uninterrupted / "checkpoints" / names[-1] / "trainer_state.json").read_text())
    best = f"step_{state['best']['step']:07d}"
    assert set(names) == {"step_0000004", "step_0000006", "step_0000008"} | {best}


def test_two_processes_equal_one_process_with_accumulation(shard_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("train.epochs=1", "data.num_workers=0")
    _run(_train_cmd(shard_root, one, *extra, "train.grad_accum_steps=2"))
    proc = _run(_launch_cmd(2, 29541, "train.py", *_train_cmd(shard_root, two, *extra)[2:]))
    assert "2 process(es), 2 steps/epoch" in proc.stdout + proc.stderr
    r1 = [r for r in _records(one) if "total" in r]
    r2 = [r for r in _records(two) if "total" in r]
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2]
    for a, b in zip(r1, r2):  # global-batch means: the same samples, summed in another order
        for k in ("total", "lovasz", "ce", "feature"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])
    v1 = [r for r in _records(one) if "val/miou" in r]
    v2 = [r for r in _records(two) if "val/miou" in r]
    assert v1 and v1[0]["val/samples"] == v2[0]["val/samples"] == 2
    wa, wb = _weights(one / "student.safetensors"), _weights(two / "student.safetensors")
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())
    assert worst < 1e-4, worst


def test_eval_on_two_processes_gives_the_one_process_numbers(shard_root, tmp_path):
    from pop3d.config import load_config
    from pop3d.training import build_student, save_student

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    weights = tmp_path / "student.safetensors"
    save_student(build_student(cfg), weights, cfg, 0)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.shards={shard_root}", "--set",
            "data.num_workers=0", "--weights", str(weights), "--random-text-embeddings", "--split", "train",
            "--max-samples", "3"]
    _run([sys.executable, str(ROOT / "scripts" / "eval.py"), *args, "--out", str(tmp_path / "one.json")])
    _run(_launch_cmd(2, 29543, "eval.py", *args, "--out", str(tmp_path / "two.json")))
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["samples"] == two["samples"] == 3
    assert one == two


def test_resume_on_another_process_count_with_the_same_global_batch(shard_root, tmp_path):
    """Checkpoint from 1 process x accum 2, resumed on 2 processes x accum 1: no RNG state is needed, the run
    continues as if uninterrupted (up to the all-reduce's summation order)."""
    ref, split = tmp_path / "ref", tmp_path / "split"
    base = ("train.epochs=2", "data.num_workers=0", "train.val_every_epochs=0")
    _run(_train_cmd(shard_root, ref, *base, "train.grad_accum_steps=2"))
    _run(_train_cmd(shard_root, split, *base, "train.grad_accum_steps=2", "train.max_steps=2"))
    _run(_launch_cmd(2, 29547, "train.py", *_train_cmd(shard_root, split, *base)[2:], "--resume"))
    r1 = [r for r in _records(ref) if "total" in r]
    r2 = [r for r in _records(split) if "total" in r]
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2, 3, 4]
    for a, b in zip(r1, r2):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5), (a["step"], a["total"], b["total"])
    wa, wb = _weights(ref / "student.safetensors"), _weights(split / "student.safetensors")
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())
    assert worst < 1e-4, worst
