#!/usr/bin/env python
"""Time to the first resumed step: resuming at an early step vs a late one, side by side.

For each start step a checkpoint of the tiny config is written (fresh weights, the scheduler advanced to that
step), then ``scripts/train.py --resume`` runs one step in a subprocess; we time from the process start to
the moment that step's record is in ``log.jsonl``. The late start lies thousands of samples into the run
(many epochs over the synthetic shards): the planned order (shards/order.py) finds the shard and sample by
arithmetic and decodes only what it trains on. For comparison, the old loop re-decoded every consumed sample;
its cost is estimated as consumed samples x the measured decode + geometry time of one sample.

    python benchmarks/bench_resume.py [--shards DIR] [--late 4000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(cfg, out: Path, step: int, spe: int) -> None:
    import torch

    from pop3d.run_state import checkpoint_dir, save_run_state
    from pop3d.schedule import build_optimizer, build_scheduler
    from pop3d.training import build_student

    tc = cfg.train
    model = build_student(cfg)
    opt = build_optimizer(model, tc.lr, tc.backbone_lr_mult, tc.weight_decay)
    sched = build_scheduler(opt, spe * tc.epochs, tc.warmup_steps, tc.warmup_lr_init, tc.lr_min)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(step):
            sched.step()
    save_run_state(checkpoint_dir(out, step), model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                   scheduler_state=sched.state_dict(), scaler_state=None, step=step, epoch=step // spe)
    del torch


def time_to_first_step(cmd: list[str], log: Path, step: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if log.is_file() and f'"step": {step},' in log.read_text():
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode not in (0, None):
        raise RuntimeError(err.decode()[-2000:])
    return elapsed


def decode_time(shards: str, cfg) -> float:
    from pop3d.training import grid_spec_of
    from shards.loader import list_shards, process_sample
    from shards.stream import _iter_tar_samples

    url = list_shards(shards, "train")[0][0]
    raw = next(_iter_tar_samples(url))
    t0 = time.perf_counter()
    for _ in range(3):
        process_sample(raw, grid_spec_of(cfg), with_eval_gt=False)
    return (time.perf_counter() - t0) / 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard folder (default: synthetic shards built in a temp dir)")
    p.add_argument("--late", type=int, default=4000, help="late start step")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume.json"))
    args = p.parse_args()
    from pop3d.config import load_config
    from pop3d.training import TrainData

    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    shards = args.shards
    if shards is None:
        from shards.synthetic import make_synthetic_nuscenes
        from shards.writer import build_shards

        root = make_synthetic_nuscenes(tmp / "nuscenes")
        shards = str(tmp / "shards")
        build_shards(str(root), ["v1.0-mini"], ["train", "val"], shards, workers=1, samples_per_shard=2,
                     progress=False)
    epochs = args.late + 10
    sets = [f"data.shards={shards}", "data.num_workers=0", f"train.epochs={epochs}", "train.val_every_epochs=0",
            "train.tensorboard=false", "train.log_every=1", "train.save_every=1000000"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    spe = TrainData(cfg, 0, 1).steps_per_epoch
    per_sample = decode_time(shards, cfg)
    rows = []
    for start in (1, args.late):
        out = tmp / f"run_{start}"
        run_sets = sets + [f"train.output_dir={out}", f"train.max_steps={start + 1}"]
        make_checkpoint(load_config(ROOT / "configs" / "tiny.yaml", run_sets), out, start, spe)
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
               *[x for s in run_sets for x in ("--set", s)], "--resume"]
        t = time_to_first_step(cmd, out / "log.jsonl", start + 1)
        rows.append({"start_step": start, "epoch": start // spe, "consumed_samples": start,
                     "time_to_first_step_s": t, "old_redecode_estimate_s": start * per_sample})
    print(f"{'start step':>10} {'epoch':>6} {'consumed':>9} {'first step (s)':>15} {'old: re-decode (est. s)':>24}")
    for r in rows:
        print(f"{r['start_step']:>10} {r['epoch']:>6} {r['consumed_samples']:>9} {r['time_to_first_step_s']:>15.2f} "
              f"{r['old_redecode_estimate_s']:>24.1f}")
    ratio = rows[1]["time_to_first_step_s"] / rows[0]["time_to_first_step_s"]
    print(f"late / early: {ratio:.2f}x   (decode + geometry of one sample: {1e3 * per_sample:.0f} ms)")
    result = {"rows": rows, "late_over_early": ratio, "decode_ms_per_sample": 1e3 * per_sample,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "shards": "synthetic" if args.shards is None
              else args.shards}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
