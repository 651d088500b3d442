"""Live teacher cost vs the original's feature cache, side by side, for one six-camera sample.

    python benchmarks/bench_teacher.py                 # CPU default (a few minutes on 2 cores)
    python benchmarks/bench_teacher.py --quick         # CPU, low resolutions only (< 1 min)
    python benchmarks/bench_teacher.py --device cuda   # GPU: bf16 autocast, channels_last, torch.compile

Per resolution (resize_fit (2048,1024) = the original 1820x1024 network input, then 910x512, 455x256) it
times ``LiveTeacher.forward`` (preprocess + MaskCLIP+ R50 student with the real widths, random weights, BN
folded + exact sampling of ``--points`` projections per image) and reports peak memory (CUDA: max allocated;
CPU: process peak RSS, a coarse upper bound). On CPU, the 1820x1024 row runs fewer images than six and is
extrapolated linearly (marked "x6 extrapolated").

The cache column: the original saved one ``.npy`` per image, float32 [N_cam, 512] (2,048 B per
(point, camera) pair + a 128 B header). We write six such files to a temporary folder on local disk and time
reading them back with np.load. The page cache cannot be dropped without root, so that read is a WARM-cache
read (a lower bound; the original read from network storage).
Results: a table on stdout and JSON in benchmarks/results/teacher.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher.live import build_teacher
from teacher.preprocess import rescale_size

FITS = {"1820x1024": (2048, 1024), "910x512": (1024, 512), "455x256": (512, 256)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_teacher(fit_name: str, n_images: int, points: int, dev: torch.device, iters: int, warmup: int,
                  compile_: bool, depth: int) -> dict:
    torch.manual_seed(0)
    t = build_teacher("maskclip_plus", None, resize_fit=FITS[fit_name], device=dev, dtype="bfloat16",
                      random_arch={"depth": depth}, chunk=6, compile=compile_)
    h, w = 900, 1600
    imgs = torch.randint(0, 256, (1, n_images, 3, h, w), dtype=torch.uint8, device=dev)
    if n_images < 6:   # LiveTeacher wants 6 cameras: pad with cameras that own no projection (never run)
        imgs = torch.cat([imgs, imgs[:, :1].expand(1, 6 - n_images, 3, h, w)], 1)
    g = torch.Generator().manual_seed(0)
    pc = torch.arange(n_images).repeat_interleave(points)
    rc = torch.stack([torch.randint(1, h - 1, (pc.numel(),), generator=g),
                      torch.randint(1, w - 1, (pc.numel(),), generator=g)], 1)
    pb = torch.zeros_like(pc)
    pb, pc, rc = pb.to(dev), pc.to(dev), rc.to(dev)
    t_compile = None
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        t0 = time.perf_counter()
        for _ in range(warmup):
            t(imgs, pb, pc, rc)
        _sync(dev)
        t_compile = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        _sync(dev)
        t0 = time.perf_counter()
        out = t(imgs, pb, pc, rc)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    assert out.shape == (pc.numel(), 512) and float(out.min()) >= 0
    sec = float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    del t
    return {"resolution": fit_name, "network_input_hw": rescale_size((h, w), FITS[fit_name]),
            "images_measured": n_images, "sec_measured": sec, "sec_per_sample": sec * 6 / n_images,
            "extrapolated": n_images < 6, "peak_mem_mb": peak,
            "peak_mem_kind": "cuda max allocated" if dev.type == "cuda" else "process peak RSS",
            "warmup_incl_compile_sec": t_compile, "iters": iters}


def bench_cache(points: int) -> dict:
    """Write six original-style .npy feature files ([N, 512] float32, Fortran order) and read them back."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for cam in range(6):
            arr = rng.random((512, points), dtype=np.float32).T      # transposed view, as the original saved
            p = Path(tmp) / f"CAM_{cam}.pth.npy"
            np.save(p, arr)
            paths.append(p)
        nbytes = sum(p.stat().st_size for p in paths)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            feats = np.concatenate([np.load(p) for p in paths])
            times.append(time.perf_counter() - t0)
        assert feats.shape == (6 * points, 512)
    return {"bytes_per_sample": nbytes, "payload_bytes_per_pair": 2048, "files": 6,
            "read_sec_per_sample_warm_cache": float(np.median(times)),
            "note": "warm page cache (cannot drop caches without root): a lower bound on the original's read"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU: low resolutions, fewer images")
    ap.add_argument("--points", type=int, default=3700, help="projections per image (spec: ~3.7k)")
    ap.add_argument("--depth", type=int, default=50, choices=(50, 101))
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher.json"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        plan = ([("455x256", 2), ("910x512", 1)] if args.quick
                else [("455x256", 6), ("910x512", 2), ("1820x1024", 1)])
        iters, warmup, compile_ = args.iters or 1, 0, False
    else:
        plan = [("1820x1024", 6), ("910x512", 6), ("455x256", 6)]
        iters, warmup, compile_ = args.iters or 10, 3, not args.no_compile
    rows = []
    for fit_name, n in plan:
        print(f"[bench] teacher R{args.depth} at {fit_name}, {n} image(s) on {dev} …", flush=True)
        rows.append(bench_teacher(fit_name, n, args.points, dev, iters, warmup, compile_, args.depth))
    cache = bench_cache(args.points)
    print()
    print(f"{'resolution':>11} {'imgs':>4} {'s/sample (6 cams)':>18} {'peak MB':>9}   cache: MB/sample  read s/sample")
    for r in rows:
        tag = " (x6 extrapolated)" if r["extrapolated"] else ""
        print(f"{r['resolution']:>11} {r['images_measured']:>4} {r['sec_per_sample']:>18.3f} {r['peak_mem_mb']:>9.0f}"
              f"   {cache['bytes_per_sample'] / 1e6:>15.1f}  {cache['read_sec_per_sample_warm_cache']:>13.4f}{tag}")
    print(f"\ncache: {args.points} points x 6 cameras x 2048 B + headers = {cache['bytes_per_sample']} B per sample; "
          f"{cache['note']}")
    result = {"device": str(dev), "device_name": torch.cuda.get_device_name() if dev.type == "cuda"
              else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "depth": args.depth, "points_per_image": args.points,
              "bf16_autocast": dev.type == "cuda", "compile": compile_, "teacher": rows, "cache": cache}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
