#!/usr/bin/env python
"""ONE command that measures the GPU path (issue 10) and writes one JSON + a table, targets beside results.

    python benchmarks/gpu_suite.py --wheels /path/to/wheels --out benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --dry-run          # every section at tiny sizes on the CPU (minutes)

Needs torch, torchvision, triton and accelerate. ``--wheels DIR`` installs webdataset, open_clip and
nuscenes-devkit (and whatever else is in DIR, except torch / torchvision / triton / nvidia-* wheels) with
``pip install --no-index --no-deps --target`` into a folder next to the output, then imports from there;
it never installs torch. Sections (each timed with CUDA events on CUDA, host timers on CPU; each fails soft,
recording its error, and the next one runs):

* ``teacher``: live teacher (MaskCLIP+ DeepLab, random weights) on 6 images 900x1600 -> 1820x1024, bf16;
  ms and peak memory, eager and ``torch.compile``;
* ``student``: paper-config TPVFormer forward+backward under bf16 autocast, ms and peak memory per
  deformable-attention backend available (pytorch; triton when present);
* ``train_step``: the full step (live teacher, student, losses, backward, clipping, AdamW) and the
  teacher's share, with the speed switches of configs/pop3d_12ep.yaml; ``--batch-size B`` (default 1)
  steps on B samples (also in ``sync_debug``) and reports samples/s;
* ``loader``: val loader samples/s per worker count, with and without eval GT, on synthetic shards;
* ``inference``: evaluation-style prediction (features at every LiDAR point, voxel features) samples/s,
  fp32 vs bf16;
* ``fused_msda``: the triton backend against pytorch on real layer inputs captured from a student forward,
  then time and memory of both (skipped with a note if the backend is absent);
* ``sync_debug``: ``torch.cuda.set_sync_debug_mode('warn')`` over one training step: the number of
  synchronising calls (CPU: the SyncCounter proxy).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"train_step": "<= 120 ms, peak memory <= 16 GB (H200, paper config, bf16, live teacher)",
           "inference": ">= 20 samples/s", "loader": "eval GT >= 0.7x the samples/s without",
           "sync_debug": "<= 4 syncs per training step", "fused_msda": "3-4x faster than pytorch"}
NEVER_INSTALL = ("torch-", "torchvision-", "torchaudio-", "triton-", "nvidia_", "nvidia-")


class WheelError(Exception):
    """--wheels cannot be installed (one line for the user)."""


def install_wheels(wheel_dir: str, target: str) -> list[str]:
    """pip install --no-index --no-deps --target ``target`` every wheel of ``wheel_dir`` except torch & co.

    Raises WheelError naming the folder (and pip's last line) when there are none or pip refuses them, e.g.
    wheels made for another Python (``scripts/gpu_wheels.sh DIR PYTHON_VERSION``)."""
    wheels = sorted(p for p in glob.glob(os.path.join(wheel_dir, "*.whl"))
                    if not os.path.basename(p).lower().startswith(NEVER_INSTALL))
    if not wheels:
        raise WheelError(f"--wheels {wheel_dir}: no .whl files there (webdataset, open_clip_torch, nuscenes-devkit: "
                         "bash scripts/gpu_wheels.sh DIR)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--target", target, *wheels], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "pip failed")
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise WheelError(f"--wheels {wheel_dir}: pip could not install them ({last.strip()}); wheels for this "
                         f"Python {py}: bash scripts/gpu_wheels.sh DIR {py}")
    sys.path.insert(0, target)
    return [os.path.basename(w) for w in wheels]


# ---------------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------------

def sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return {"img_hw": (90, 160), "student_hw": (64, 96), "resize_fit": (96, 64), "points": 400, "iters": 1,
                "warmup": 1, "student": {"tpv_h": 10, "tpv_w": 10, "tpv_z": 4, "dim": 16, "num_heads": 4,
                                         "base_channels": 4, "stem_channels": 8, "feature_dim": 16,
                                         "hidden_dims_ft": 16, "num_points_in_pillar": (2, 4, 4),
                                         "num_points": (4, 8, 8), "num_layers": 1, "depth": 50},
                "teacher_arch": {"depth": 50, "base_channels": 4, "stem_channels": 8, "aspp_channels": 16},
                "workers": (0,), "shard_scenes": 2, "shard_hw": (90, 160), "azimuth": 128}
    return {"img_hw": (900, 1600), "student_hw": None, "resize_fit": (2048, 1024), "points": 34000, "iters": 10,
            "warmup": 3, "student": {}, "teacher_arch": {}, "workers": (0, 2, 4, 8), "shard_scenes": 1,
            "shard_hw": (900, 1600), "azimuth": 1084}


def _cfg(sz: dict, tmp: str):
    """The paper run config (configs/pop3d_12ep.yaml) with random weights, at the section sizes."""
    from pop3d.config import load_config

    sets = [f"train.output_dir={tmp}", "teacher.weights=null", "train.init_weights=null",
            f"teacher.resize_fit={list(sz['resize_fit'])}"]
    sets += [f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in sz["student"].items()]
    if sz["teacher_arch"]:
        sets.append("teacher.random_arch={" + ", ".join(f"{k}: {v}" for k, v in sz["teacher_arch"].items()) + "}")
    if sz["student_hw"]:
        sets.append(f"data.student_image_hw={list(sz['student_hw'])}")
    return load_config(ROOT / "configs" / "pop3d_12ep.yaml", sets)


def _batch(cfg, sz: dict, device, seed: int = 0, batch_size: int = 1) -> dict:
    """A loader-shaped batch of ``batch_size`` samples with real projections, each with its photometric
    parameters drawn as the training loader draws them, moved to ``device`` as training moves it."""
    from benchmarks._synthetic_batch import make_batch, merge_batches
    from pop3d.cuda_setup import TRAIN_KEYS, move_batch
    from pop3d.training import photometric_params

    h, w = sz["img_hw"]
    parts = []
    for k in range(batch_size):
        b = make_batch(cfg, seed=seed + 1000 * k, h=h, w=w, n_points=sz["points"])
        b["photometric"] = photometric_params(cfg.train.seed, 0, b["tokens"][0], 6)[None]
        parts.append(b)
    return move_batch(merge_batches(parts), device, TRAIN_KEYS)


def triton_usable(device) -> tuple[bool, str]:
    """(usable, why not): the 'triton' msda backend exists, triton imports, and the device can run it
    (CUDA; on CPU only under Triton's interpreter, TRITON_INTERPRET=1)."""
    from pop3d.model import msda

    if "triton" not in msda.BACKENDS:
        return False, "no 'triton' in pop3d.model.msda.BACKENDS"
    if hasattr(msda, "triton_available") and not msda.triton_available():
        return False, "triton does not import"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on", "yes"):
        return False, "the triton backend runs on CUDA (on CPU only with TRITON_INTERPRET=1)"
    return True, ""


class Timer:
    """CUDA events (or perf_counter on CPU) around ``iters`` calls of ``fn`` after ``warmup`` calls."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def run(self, fn, iters: int, warmup: int) -> dict[str, float]:
        import torch

        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            return {"ms": a.elapsed_time(b) / iters, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                    "timer": "cuda_events"}
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return {"ms": 1e3 * (time.perf_counter() - t0) / iters, "peak_mem_gb": None, "timer": "host"}


# ---------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------

def sec_teacher(ctx) -> dict:
    import torch

    from teacher.live import build_teacher_from_config

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    batch = _batch(cfg, sz, dev)
    out = {"images": [6, 3, *sz["img_hw"]]}
    for mode in ("eager", "compiled"):
        cfg.teacher.compile = mode == "compiled"
        teacher = build_teacher_from_config(cfg.teacher, dev)
        if mode == "compiled" and dev.type != "cuda":
            out[mode] = {"skipped": "compile is applied on CUDA only"}
            continue
        def fn(teacher=teacher):
            teacher(batch["images"], batch["proj_batch"], batch["proj_cam"], batch["proj_rowcol"], sync_free=True)
        out[mode] = Timer(dev).run(fn, sz["iters"], sz["warmup"] + (2 if mode == "compiled" else 0))
        teacher = fn = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _student(ctx, backend: str | None = None):
    from pop3d.cuda_setup import apply_speed_settings
    from pop3d.training import build_student

    model = build_student(ctx["cfg"]).to(ctx["device"]).train()
    apply_speed_settings(ctx["cfg"].speed, ctx["device"], model)
    if backend:
        model.set_attention_backend(backend)
    return model


def sec_student(ctx) -> dict:
    import torch

    from pop3d.preprocess import prepare_student_inputs
    from pop3d.training import feature_points

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    batch = _batch(cfg, sz, dev)
    imgs, l2i, hw = prepare_student_inputs(batch["images"], batch["lidar2img"], out_hw=cfg.data.student_image_hw)
    feats = feature_points(batch)
    out = {}
    use_triton, why = triton_usable(dev)
    for backend in ["pytorch"] + (["triton"] if use_triton else []):
        try:
            model = _student(ctx, backend)

            def step(model=model):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    o = model(imgs, l2i, hw, points=None, features=feats, voxel_features=False)
                    loss = o.logits_vox.float().square().mean() + o.logits_pts_fts.float().square().mean()
                loss.backward()
                model.zero_grad(set_to_none=True)

            out[backend] = Timer(dev).run(step, sz["iters"], sz["warmup"])
            model = step = None
        except Exception as exc:  # noqa: BLE001 (one backend failing must not hide the other)
            out[backend] = {"error": f"{type(exc).__name__}: {exc}"}
    if not use_triton:
        out["triton"] = {"skipped": why}
    return out


def _train_parts(ctx):
    """Everything a training step needs: student, live teacher, optimiser, one device batch of
    ``ctx["batch_size"]`` samples (photometric parameters in it, as the loader delivers them), a generator
    (unused when the batch carries the parameters)."""
    import torch

    from pop3d.factory import build_run_teacher
    from pop3d.schedule import build_optimizer

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    cfg.teacher.compile = dev.type == "cuda"
    model = _student(ctx)
    teacher = build_run_teacher(cfg, dev)  # the training run's teacher
    optimizer = build_optimizer(model, 1e-4)
    return (model, teacher, optimizer, _batch(cfg, sz, dev, batch_size=ctx.get("batch_size", 1)),
            torch.Generator().manual_seed(0))


def _one_step(model, teacher, optimizer, batch, cfg, generator, timer=None):
    import torch

    from pop3d.training import compute_loss, seed_sample_draws

    dev = batch["images"].device
    gens = seed_sample_draws(cfg.train.seed, 0, batch["tokens"])  # per-sample GridMask draws (B > 1)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        terms, _ = compute_loss(model, teacher, batch, cfg, generator, train=True, timer=timer,
                                grid_mask_generators=gens)
    terms.total.backward()
    if timer is not None:
        timer.mark("student_bwd")
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if timer is not None:
        timer.mark("optimizer")
    return terms


def sec_train_step(ctx) -> dict:
    from pop3d.cuda_setup import StepTimer

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    model, teacher, optimizer, batch, gen = _train_parts(ctx)
    res = Timer(dev).run(lambda: _one_step(model, teacher, optimizer, batch, cfg, gen), sz["iters"], sz["warmup"])
    timer = StepTimer(dev)
    parts: dict[str, float] = {}
    for _ in range(sz["iters"]):
        timer.start()
        _one_step(model, teacher, optimizer, batch, cfg, gen, timer)
        for k, v in timer.read().items():
            parts[k] = parts.get(k, 0.0) + v / sz["iters"]
    b = len(batch["tokens"])
    res.update(parts=parts, teacher_share=parts.get("teacher_ms", 0.0) / max(sum(parts.values()), 1e-9),
               photometric_aug=cfg.data.photometric_aug, batch_size=b, samples_per_s=1e3 * b / res["ms"])
    return res


def sec_loader(ctx) -> dict:
    from benchmarks._loader_rates import loader_rate, make_synthetic_shards, raycast_ms

    sz = ctx["sz"]
    shard_dir = make_synthetic_shards(ctx["tmp"], samples_per_scene=sz["shard_scenes"], img_hw=sz["shard_hw"],
                                      n_azimuth=sz["azimuth"])
    rows = []
    for workers in sz["workers"]:
        for eval_gt in (False, True):
            rows.append(loader_rate(shard_dir, "val", eval_gt, workers,
                                    passes=2 if ctx["dry"] else max(3, 2 * workers)))
    ratio = {str(w): next(r["samples_per_s"] for r in rows if r["workers"] == w and r["eval_gt"])
             / max(next(r["samples_per_s"] for r in rows if r["workers"] == w and not r["eval_gt"]), 1e-9)
             for w in sz["workers"]}
    return {"rows": rows, "eval_gt_ratio": ratio, "raycast": raycast_ms(shard_dir, "val", max_samples=2)}


def sec_inference(ctx) -> dict:
    import torch

    from pop3d.evaluate import predict_sample

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    model = _student(ctx).eval()
    host = _batch(cfg, sz, torch.device("cpu"))
    batch = {**host, "grid_ind": [g.to(dev) for g in host["grid_ind"]]}
    out = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        def fn(bf16=bf16):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
                predict_sample(model, batch, dev, cfg.data.student_image_hw)
        r = Timer(dev).run(fn, sz["iters"], sz["warmup"])
        r["samples_per_s"] = 1e3 / r["ms"]
        r["autocast_bf16"] = bf16 and dev.type == "cuda"  # off on CPU: both rows are fp32 there
        out[name] = r
    return out


def sec_fused_msda(ctx) -> dict:
    import torch

    import pop3d.model.image_cross_attention as ica
    from pop3d.model.msda import multi_scale_deformable_attn
    from pop3d.preprocess import prepare_student_inputs
    from pop3d.training import feature_points

    cfg, sz, dev = ctx["cfg"], ctx["sz"], ctx["device"]
    use_triton, why = triton_usable(dev)
    if not use_triton:
        return {"skipped": why}
    captured = []
    real = ica.multi_scale_deformable_attn

    def hook(value, shapes, loc, attn, backend="auto"):
        captured.append((value.detach(), shapes, loc.detach(), attn.detach()))
        return real(value, shapes, loc, attn, backend=backend)

    model = _student(ctx, "pytorch")
    batch = _batch(cfg, sz, dev)
    imgs, l2i, hw = prepare_student_inputs(batch["images"], batch["lidar2img"], out_hw=cfg.data.student_image_hw)
    ica.multi_scale_deformable_attn = hook
    try:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            model(imgs, l2i, hw, points=None, features=feature_points(batch), voxel_features=False)
    finally:
        ica.multi_scale_deformable_attn = real
    model = None
    value, shapes, loc, attn = captured[0]
    out: dict[str, Any] = {"value": list(value.shape), "loc": list(loc.shape), "layers_captured": len(captured)}
    grads = {}
    for backend in ("pytorch", "triton"):
        v, lo, at = (t.clone().requires_grad_(True) for t in (value, loc, attn))
        y = multi_scale_deformable_attn(v, shapes, lo, at, backend=backend)
        y.float().square().sum().backward()
        grads[backend] = (y.detach().float(), v.grad.float(), lo.grad.float(), at.grad.float())

        def fn(backend=backend):
            v2, l2, a2 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
            multi_scale_deformable_attn(v2, shapes, l2, a2, backend=backend).float().sum().backward()
        out[backend] = Timer(dev).run(fn, sz["iters"], sz["warmup"])
    out["max_abs_diff"] = {name: float((a - b).abs().max()) for name, a, b in
                           zip(("out", "grad_value", "grad_loc", "grad_attn"), grads["pytorch"], grads["triton"])}
    out["max_abs_ref"] = {name: float(a.abs().max()) for name, a in
                          zip(("out", "grad_value", "grad_loc", "grad_attn"), grads["pytorch"])}
    out["max_rel_diff"] = {k: out["max_abs_diff"][k] / max(out["max_abs_ref"][k], 1e-12) for k in out["max_abs_ref"]}
    out["speedup"] = out["pytorch"]["ms"] / max(out["triton"]["ms"], 1e-9)
    return out


def sec_sync_debug(ctx) -> dict:
    import warnings

    import torch

    cfg, dev = ctx["cfg"], ctx["device"]
    model, teacher, optimizer, batch, gen = _train_parts(ctx)
    for _ in range(2):
        _one_step(model, teacher, optimizer, batch, cfg, gen)  # warm-up: caches, compile
    out = {}
    for photometric in (False, True):
        cfg.data.photometric_aug = photometric
        if dev.type == "cuda":
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    _one_step(model, teacher, optimizer, batch, cfg, gen)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            out[f"photometric_{photometric}"] = {"syncs": len(msgs), "mode": "set_sync_debug_mode",
                                                 "messages": msgs[:20]}
        else:
            from pop3d.sync_count import SyncCounter

            steps = [st["step"] for st in optimizer.state.values() if "step" in st]
            with SyncCounter(host_tensors=steps) as sc:
                _one_step(model, teacher, optimizer, batch, cfg, gen)
            out[f"photometric_{photometric}"] = {"syncs": sc.total, "mode": "SyncCounter (CPU proxy)",
                                                 "sites": sc.by_site()}
    return out


SECTIONS = {"teacher": sec_teacher, "student": sec_student, "train_step": sec_train_step, "loader": sec_loader,
            "inference": sec_inference, "fused_msda": sec_fused_msda, "sync_debug": sec_sync_debug}


# ---------------------------------------------------------------------------------------------------------
# table + main
# ---------------------------------------------------------------------------------------------------------

def _fmt(r: dict | None) -> str:
    if not isinstance(r, dict):
        return "-"
    if "error" in r:
        return "ERROR " + r["error"][:60]
    if "skipped" in r:
        return "skipped: " + r["skipped"][:60]
    mem = r.get("peak_mem_gb")
    return f"{r['ms']:.1f} ms" + (f", {mem:.2f} GB" if mem is not None else "") + f" ({r.get('timer', '')})"


def table(sections: dict) -> list[str]:
    lines = ["| section | result | target |", "|---|---|---|"]
    for name, res in sections.items():
        tgt = TARGETS.get(name, "")
        if "error" in res or "skipped" in res:
            lines.append(f"| {name} | {_fmt(res)} | {tgt} |")
            continue
        if name == "teacher":
            lines.append(f"| teacher eager | {_fmt(res.get('eager'))} | |")
            lines.append(f"| teacher compiled | {_fmt(res.get('compiled'))} | |")
        elif name == "student":
            for b in ("pytorch", "triton"):
                lines.append(f"| student fwd+bwd [{b}] | {_fmt(res.get(b))} | |")
        elif name == "train_step":
            b = res.get("batch_size", 1)
            lines.append(f"| train_step | B={b}: {_fmt(res)}, {res.get('samples_per_s', 0.0):.2f} samples/s, "
                         f"teacher share {res['teacher_share']:.0%} | {tgt if b == 1 else '(target at B=1)'} |")
            parts = ", ".join(f"{k} {v:.1f}" for k, v in res["parts"].items())
            lines.append(f"| train_step parts | {parts} | |")
        elif name == "loader":
            for r in res["rows"]:
                lines.append(f"| loader w={r['workers']} eval_gt={r['eval_gt']} | {r['samples_per_s']:.2f} "
                             f"samples/s | |")
            ratios = ", ".join(f"w={w}: {v:.2f}x" for w, v in res["eval_gt_ratio"].items())
            lines.append(f"| loader eval GT / none | {ratios} | {tgt} |")
        elif name == "inference":
            for p in ("fp32", "bf16"):
                lines.append(f"| inference {p} | {res[p]['samples_per_s']:.2f} samples/s ({_fmt(res[p])}) | "
                             f"{tgt if p == 'bf16' else ''} |")
        elif name == "fused_msda":
            lines.append(f"| fused_msda pytorch | {_fmt(res['pytorch'])} | |")
            lines.append(f"| fused_msda triton | {_fmt(res['triton'])}, {res['speedup']:.2f}x, max abs diff "
                         f"{json.dumps({k: float(f'{v:.2e}') for k, v in res['max_abs_diff'].items()})}, relative "
                         f"{max(res['max_rel_diff'].values()):.1e} | {tgt} |")
        elif name == "sync_debug":
            for k, v in res.items():
                if not isinstance(v, dict):
                    continue
                note = ", photometric parameters from the loader" if k.endswith("True") else ""
                lines.append(f"| sync_debug {k} | {v['syncs']} ({v['mode']}{note}) | {tgt} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_suite.json"))
    ap.add_argument("--wheels", help="folder of wheels (webdataset, open_clip_torch, nuscenes-devkit); torch is "
                                     "never installed")
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="samples per step in the train_step and sync_debug sections (default 1, the paper's)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no new section after this many seconds (the rest are recorded as skipped)")
    a = ap.parse_args(argv)
    chosen = [s for s in a.sections.split(",") if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    if a.batch_size < 1:
        print(f"--batch-size: must be >= 1, got {a.batch_size}", file=sys.stderr)
        return 2
    if a.wheels and not os.path.isdir(a.wheels):
        print(f"--wheels {a.wheels}: no such folder", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:  # into a fresh temp folder: nothing of the checkout or the Python is touched
        installed = install_wheels(a.wheels, tempfile.mkdtemp(prefix="gpu_suite_site_")) if a.wheels else []
    except WheelError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    sz = sizes(a.dry_run or dev.type == "cpu")
    tmp = tempfile.TemporaryDirectory(prefix="gpu_suite_")
    results: dict[str, Any] = {}
    for name in chosen:
        t0 = time.perf_counter()
        if t0 - t_start > a.budget_s:
            results[name] = {"skipped": f"time budget --budget-s {a.budget_s:.0f} spent", "section_s": 0.0}
            print(f"[{name}] skipped (time budget)", flush=True)
            continue
        ctx = {"cfg": _cfg(sz, tmp.name), "sz": sz, "device": dev, "tmp": os.path.join(tmp.name, name),
               "dry": a.dry_run, "batch_size": a.batch_size}
        os.makedirs(ctx["tmp"], exist_ok=True)
        try:
            results[name] = SECTIONS[name](ctx)
        except Exception as exc:  # noqa: BLE001 (fail soft: record and go on)
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc().splitlines()[-8:]}
        results[name]["section_s"] = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name}] {results[name]['section_s']:.1f} s" + (" ERROR " + results[name]["error"]
                                                               if "error" in results[name] else ""), flush=True)
    lines = table(results)
    print("\n".join(lines))
    doc = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                       "cpus": os.cpu_count()},
           "dry_run": a.dry_run, "wheels_installed": installed, "targets": TARGETS, "sections": results,
           "table": lines, "total_s": time.perf_counter() - t_start}
    tmp_file = out_path.with_name(out_path.name + ".tmp")
    with open(tmp_file, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_file, out_path)
    print(f"wrote {out_path} ({doc['total_s']:.0f} s)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
