"""Training-step throughput per batch size, side by side in one run: samples/s of the full step (live
teacher, photometric augmentation with loader-drawn parameters, student forward, per-sample losses, backward,
clipping, AdamW) at B = 1, 2, ... on the same model.

CPU (default, configs/tiny.yaml):  .venv/bin/python benchmarks/bench_batch.py
GPU:                               python benchmarks/bench_batch.py --device cuda --batch-sizes 1 2 4
(on a GPU the full-size step with the paper config is benchmarks/gpu_suite.py --batch-size B).

Batch sizes are measured interleaved (B=1, B=2, B=1, B=2, ...) so that a loaded machine slows them alike;
the time per step is the minimum (the least disturbed run; the median is listed too). Writes a table to stdout and JSON to benchmarks/results/batch.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(device: torch.device, tmp: str):
    from pop3d.config import load_config
    from pop3d.factory import build_run_teacher, build_student
    from pop3d.schedule import build_optimizer

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.output_dir={tmp}", "data.photometric_aug=true"])
    torch.manual_seed(0)
    model = build_student(cfg).to(device).train()
    teacher = build_run_teacher(cfg, device)
    return cfg, model, teacher, build_optimizer(model, cfg.train.lr)


def make_device_batch(cfg, b: int, device: torch.device, hw: tuple[int, int], n_points: int) -> dict:
    """A loader-shaped batch of b samples (photometric parameters drawn per sample, as the loader does)."""
    from benchmarks._synthetic_batch import make_batch, merge_batches
    from pop3d.cuda_setup import TRAIN_KEYS, move_batch
    from pop3d.training import photometric_params

    parts = []
    for k in range(b):
        one = make_batch(cfg, seed=k, h=hw[0], w=hw[1], n_points=n_points)
        one["photometric"] = photometric_params(cfg.train.seed, 0, one["tokens"][0], 6)[None]
        parts.append(one)
    return move_batch(merge_batches(parts), device, TRAIN_KEYS)


def step(model, teacher, optimizer, batch, cfg) -> None:
    from pop3d.training import compute_loss, seed_sample_draws

    gens = seed_sample_draws(cfg.train.seed, 0, batch["tokens"])
    terms, _ = compute_loss(model, teacher, batch, cfg, None, train=True, grid_mask_generators=gens)
    terms.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=6, help="timed steps per batch size (after one warm-up)")
    ap.add_argument("--image-hw", type=int, nargs=2, default=[180, 320], help="camera image size (synthetic)")
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch.json"))
    a = ap.parse_args(argv)
    if min(a.batch_sizes) < 1 or a.iters < 1:
        print("--batch-sizes and --iters: must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        cfg, model, teacher, optimizer = build(device, tmp)
        batches = {b: make_device_batch(cfg, b, device, tuple(a.image_hw), a.points) for b in a.batch_sizes}
        for b in a.batch_sizes:  # warm-up: one-time caches
            step(model, teacher, optimizer, batches[b], cfg)
        times: dict[int, list[float]] = {b: [] for b in a.batch_sizes}
        for _ in range(a.iters):
            for b in a.batch_sizes:
                t0 = _now(device)
                step(model, teacher, optimizer, batches[b], cfg)
                times[b].append(_now(device) - t0)
    rows = []
    for b in a.batch_sizes:
        best = min(times[b])
        rows.append({"batch_size": b, "step_s": best, "samples_per_s": b / best,
                     "step_s_median": statistics.median(times[b]), "step_s_all": times[b]})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["vs_first"] = r["samples_per_s"] / base
    print(f"training step, configs/tiny.yaml, {device}, images {a.image_hw[0]}x{a.image_hw[1]}, {a.points} points/sample")
    print(f"| B | step s (min) | step s (median) | samples/s (min) | x B={rows[0]['batch_size']} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['step_s']:.3f} | {r['step_s_median']:.3f} | {r['samples_per_s']:.2f} | "
              f"{r['vs_first']:.2f} |")
    doc = {"config": "configs/tiny.yaml", "device": str(device), "image_hw": a.image_hw, "points": a.points,
           "threads": torch.get_num_threads(), "iters": a.iters, "torch": torch.__version__,
           "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from p3d_common.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
