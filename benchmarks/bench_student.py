"""Benchmark the POP-3D student: forward+backward time and peak memory per sample, per attention backend.

CPU (default, tiny config):   .venv/bin/python benchmarks/bench_student.py
GPU (paper config):          python benchmarks/bench_student.py --device cuda --config paper --dtype bf16

Memory: on CUDA the peak allocated memory of one training step; on CPU (no allocator statistics) the bytes of
tensors saved for backward (unique storages), which is what dominates training memory. Also times the
vectorised image cross-attention rebatching against the original per-camera loop.
Writes a table to stdout and JSON to benchmarks/results/student.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pop3d.model import StudentConfig, TPVFormer
from pop3d.model.encoder import point_sampling
from pop3d.model.msda import mmcv_available

TINY = {"tpv_h": 10, "tpv_w": 12, "tpv_z": 4, "dim": 32, "levels": 4, "num_points_in_pillar": [2, 4, 4],
        "num_points": [4, 8, 8], "base_channels": 8, "num_layers": 2, "feature_dim": 24, "hidden_dims_ft": 40}


def make_config(name: str) -> StudentConfig:
    if name == "paper":
        return StudentConfig()
    if name == "tiny":
        return StudentConfig(**TINY)
    return StudentConfig.from_dict(json.loads(Path(name).read_text()))


def make_rig(b: int, n: int, h: int, w: int) -> torch.Tensor:
    """(B, N, 4, 4) outward-looking ring of cameras, focal w/2 (benchmarks/_synthetic_batch.py)."""
    from benchmarks._synthetic_batch import camera_ring

    return camera_ring(h, w, n).repeat(b, 1, 1, 1)


class SavedBytes:
    """Counts bytes of unique storages saved for backward (CPU memory proxy)."""

    def __init__(self):
        self.ptrs: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":
            st = t.untyped_storage()
            self.ptrs[st.data_ptr()] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.ptrs.values())


def train_step(model, inputs, dtype, device):
    imgs, l2i, hw, pts, ft = inputs
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(imgs, l2i, hw, points=pts, features=ft, voxel_features=False)
        loss = out.logits_vox.float().square().mean() + out.logits_pts_fts.float().square().mean()
    loss.backward()
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_backend(cfg, backend, inputs, device, dtype, iters, warmup):
    cfg = StudentConfig.from_dict({**cfg.to_dict(), "attention_backend": backend})
    model = TPVFormer(cfg).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    for _ in range(warmup):
        train_step(model, inputs, dtype, device)
        model.zero_grad(set_to_none=True)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        train_step(model, inputs, dtype, device)
        sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, inputs, dtype, device)
        sync(device)
        mem, kind = torch.cuda.max_memory_allocated() - base, "cuda peak allocated"
    else:
        counter = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            train_step(model, inputs, dtype, device)
        mem, kind = counter.total, "saved-for-backward bytes"
    b = inputs[0].shape[0]
    return {"backend": backend, "time_s_per_sample": statistics.median(times) / b,
            "time_s_all": [t / b for t in times], "mem_bytes_per_sample": mem / b, "mem_kind": kind}


def bench_ica(cfg, inputs, device, iters):
    """Vectorised rebatch (geometry once + gather/index_add) vs the original per-camera loop, fwd+bwd."""
    model = TPVFormer(StudentConfig.from_dict({**cfg.to_dict(), "attention_backend": "pytorch"})).to(device).eval()
    imgs, l2i, hw, _, _ = inputs
    head = model.tpv_head
    ica = head.encoder.layers[0].attentions[1]
    captured = {}

    def hook(module, args, output):
        captured["args"] = args  # returns None: the output is left unchanged

    handle = ica.register_forward_hook(hook)
    with torch.no_grad():
        head(model.extract_img_feat(imgs), l2i, hw)
    handle.remove()
    query, value, _, shapes = captured["args"]
    query = query.detach().requires_grad_(True)
    value = value.detach().requires_grad_(True)
    refs = [head.encoder.ref_3d_hw, head.encoder.ref_3d_zh, head.encoder.ref_3d_wz]

    def vectorised():
        plans = head.encoder.geometry(l2i, hw)
        ica(query, value, plans, shapes).sum().backward()

    sys.path.insert(0, str(ROOT / "tests"))
    from _student_refs import ica_forward_loop  # the test oracle: the original per-camera loop

    def loop():
        rm = [point_sampling(r, head.encoder.pc_range, l2i, hw) for r in refs]
        ica_forward_loop(ica, query, value, [r for r, _ in rm], [m for _, m in rm], shapes).sum().backward()

    res = {}
    for name, fn in (("vectorised", vectorised), ("loop", loop)):
        fn()
        ts = []
        for _ in range(iters):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="'tiny', 'paper' or a config.json path "
                                                    "(default: tiny on CPU, paper on CUDA)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--img", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="padded image size (default 64 96 tiny, 928 1600 paper)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--points", type=int, default=None, help="LiDAR points per sample (default 300 / 34000)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "student.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    cfg_name = args.config or ("paper" if device.type == "cuda" else "tiny")
    cfg = make_config(cfg_name)
    h, w = args.img or ((928, 1600) if cfg_name == "paper" else (64, 96))
    n_pts = args.points or (34000 if cfg_name == "paper" else 300)
    torch.manual_seed(0)
    size = torch.tensor([cfg.tpv_w, cfg.tpv_h, cfg.tpv_z], dtype=torch.float32)
    inputs = (torch.randn(args.batch, cfg.num_cams, 3, h, w, device=device),
              make_rig(args.batch, cfg.num_cams, h, w).to(device), (h, w),
              (torch.rand(args.batch, n_pts, 3) * size).to(device),
              (torch.rand(args.batch, n_pts // 2, 3) * size).to(device))
    rows = []
    for backend in ("pytorch", "mmcv"):
        if backend == "mmcv" and not (mmcv_available() and device.type == "cuda"):
            rows.append({"backend": backend, "time_s_per_sample": None, "mem_bytes_per_sample": None,
                         "note": "n/a (mmcv not installed)" if not mmcv_available() else "n/a (CUDA-only kernel)"})
            continue
        rows.append(bench_backend(cfg, backend, inputs, device, args.dtype, args.iters, args.warmup))
    ica = bench_ica(cfg, inputs, device, args.iters)

    print(f"POP-3D student, config={cfg_name}, device={device}, dtype={args.dtype}, batch={args.batch}, "
          f"img={h}x{w}, points={n_pts}, threads={torch.get_num_threads()}")
    print(f"{'backend':<10}{'fwd+bwd s/sample':>18}{'memory MiB/sample':>20}  memory kind")
    for r in rows:
        t = "n/a" if r["time_s_per_sample"] is None else f"{r['time_s_per_sample']:.3f}"
        m = "n/a" if r["mem_bytes_per_sample"] is None else f"{r['mem_bytes_per_sample'] / 2**20:.1f}"
        print(f"{r['backend']:<10}{t:>18}{m:>20}  {r.get('mem_kind', r.get('note', ''))}")
    print(f"image cross-attention (layer 0, fwd+bwd incl. geometry): vectorised {ica['vectorised'] * 1e3:.1f} ms, "
          f"per-camera loop {ica['loop'] * 1e3:.1f} ms")
    result = {"config": cfg_name, "device": str(device), "dtype": args.dtype, "batch": args.batch, "img": [h, w],
              "points": n_pts, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "backends": rows, "ica_ms": {k: v * 1e3 for k, v in ica.items()},
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
