"""Occ3D-nuScenes evaluation of the student (the protocol later open-vocabulary occupancy papers report).

Occ3D's ground truth, as released: ``gts/<scene_name>/<sample_token>/labels.npz`` with ``semantics``
(200, 200, 16) uint8 (0 'others', 1..16 the nuScenes-lidarseg classes in the same order as our 1..16, 17 'free'),
``mask_lidar`` and ``mask_camera`` (0/1, same shape). Array index (i, j, k) is the voxel whose centre is
``(-40 + 0.4 (i + 0.5), -40 + 0.4 (j + 0.5), -1 + 0.4 (k + 0.5))`` metres in the **ego** frame of the keyframe.

Prediction, per sample: the student's TPV planes are computed once, then read at every Occ3D voxel centre
(moved into the LiDAR frame with the keyframe's LiDAR -> ego calibration and expressed as our float grid
coordinates; the aggregator's bilinear plane sampling): the occupancy head decides free (17) vs occupied, the
feature head + text prompts decide the class 1..16 (the student never predicts 0 'others'). Voxel centres
outside the student's volume (``model.pc_range``: with the paper's [-5, 3] m in the LiDAR frame, ego z above
about 4.8 m) are predicted free and counted (:class:`Occ3DMeter` reports how many, and how many of them are
occupied in the camera-visible GT).

Metric (Occ3D's ``Metric_mIoU`` with the camera mask): one 18 x 18 confusion matrix (rows GT, columns
prediction) over the voxels where ``mask_camera`` is set; per-class IoU = TP / (TP + FP + FN), NaN where a
class is neither in the GT nor predicted; ``miou`` = mean over classes 0..16 of the non-NaN IoUs ('free' is in
the matrix but not in the mean). ``miou_no_others_otherflat`` is the same mean without 'others' (0) and
'other_flat' (12), the number open-vocabulary papers report. The meter is a sum of integer counts, so the
meters of several processes add up exactly (:meth:`Occ3DMeter.state` / :meth:`Occ3DMeter.merge_state`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

OCC3D_CLASS_NAMES: tuple[str, ...] = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade",
    "vegetation", "free")
"""Occ3D-nuScenes label ids 0..17 (0..16 as nuScenes-lidarseg's 16-class evaluation, 0 = 'others', 17 = free).
Occ3D's metric script prints a differently ordered name list; the label ids follow the lidarseg order above."""
FREE = 17
NUM_CLASSES = 18
OTHERS, OTHER_FLAT = 0, 12
OCC3D_SHAPE: tuple[int, int, int] = (200, 200, 16)
OCC3D_MIN: tuple[float, float, float] = (-40.0, -40.0, -1.0)
OCC3D_VOXEL = 0.4
MIOU_CLASSES: tuple[int, ...] = tuple(range(17))
"""Classes averaged by Occ3D's mIoU: 0..16 ('free' excluded)."""
MIOU_NO_OTHERS_CLASSES: tuple[int, ...] = tuple(c for c in range(17) if c not in (OTHERS, OTHER_FLAT))
"""The open-vocabulary papers' subset: 1..16 without 'other_flat' (14 classes)."""


class Occ3DError(ValueError):
    """Bad or missing Occ3D input; the message names the file or the sample."""


# ---------------------------------------------------------------------------------------------------------
# ground truth files
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Occ3DLabels:
    """One sample's GT: ``semantics`` uint8 (200, 200, 16) 0..17, ``mask_lidar`` / ``mask_camera`` bool."""

    semantics: np.ndarray
    mask_lidar: np.ndarray
    mask_camera: np.ndarray


def load_labels(path: str | Path) -> Occ3DLabels:
    """Read and check a ``labels.npz``; raises :class:`Occ3DError` naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("semantics", "mask_lidar", "mask_camera") if k in z.files}
            files = z.files
    except (OSError, ValueError) as exc:
        raise Occ3DError(f"{path}: not a readable .npz ({exc})") from None
    missing = sorted({"semantics", "mask_lidar", "mask_camera"} - set(arrays))
    if missing:
        raise Occ3DError(f"{path}: missing array(s) {missing} (has {files})")
    for name, a in arrays.items():
        if a.shape != OCC3D_SHAPE:
            raise Occ3DError(f"{path}: {name} has shape {a.shape}, Occ3D-nuScenes is {OCC3D_SHAPE}")
    sem = arrays["semantics"]
    if not np.issubdtype(sem.dtype, np.integer) or sem.min() < 0 or sem.max() > FREE:
        raise Occ3DError(f"{path}: semantics must be integers 0..{FREE}, got {sem.dtype} "
                         f"{int(sem.min())}..{int(sem.max())}")
    return Occ3DLabels(sem.astype(np.uint8), arrays["mask_lidar"].astype(bool), arrays["mask_camera"].astype(bool))


def index_gt(root: str | Path) -> dict[str, Path]:
    """``{sample token: labels.npz path}`` of an Occ3D folder: ``root`` is ``gts/`` or the folder holding it."""
    root = Path(root)
    gts = root / "gts" if (root / "gts").is_dir() else root
    if not gts.is_dir():
        raise Occ3DError(f"{root}: no such Occ3D ground-truth folder")
    out: dict[str, Path] = {}
    with os.scandir(gts) as scenes:
        for scene in scenes:
            if not scene.is_dir():
                continue
            with os.scandir(scene.path) as samples:
                for s in samples:
                    p = Path(s.path) / "labels.npz"
                    if s.is_dir() and p.is_file():
                        out[s.name] = p
    if not out:
        raise Occ3DError(f"{gts}: no <scene_name>/<sample_token>/labels.npz inside (Occ3D-nuScenes layout)")
    return out


def save_prediction(out_dir: str | Path, token: str, semantics: np.ndarray) -> Path:
    """Write ``<out_dir>/<token>.npz`` with ``semantics`` uint8 (200, 200, 16), atomically."""
    from p3d_common.atomic import atomic_path

    if semantics.shape != OCC3D_SHAPE:
        raise ValueError(f"prediction has shape {semantics.shape}, expected {OCC3D_SHAPE}")
    path = Path(out_dir) / f"{token}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, semantics=np.ascontiguousarray(semantics, dtype=np.uint8))
    return path


# ---------------------------------------------------------------------------------------------------------
# geometry: Occ3D voxel centres -> our grid coordinates
# ---------------------------------------------------------------------------------------------------------

def voxel_centres_ego() -> np.ndarray:
    """(200 * 200 * 16, 3) float64 centres in the ego frame, in C order of the (200, 200, 16) arrays."""
    axes = [OCC3D_MIN[d] + OCC3D_VOXEL * (np.arange(OCC3D_SHAPE[d], dtype=np.float64) + 0.5) for d in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def centres_in_grid(lidar2ego: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """Occ3D voxel centres as float grid coordinates of ``grid`` (a :class:`shards.geometry.GridSpec`).

    lidar2ego: (4, 4) LiDAR -> ego transform of the keyframe. Returns (coords (P, 3) float64, in_range (P,) bool)
    with P = 640000; ``coords = (p_lidar - pc_min) / voxel_size`` (the convention of the batch's ``grid_ind``:
    0 is the lower face of voxel 0), ``in_range`` where ``pc_min <= p_lidar < pc_max`` on every axis.
    """
    T = np.asarray(lidar2ego, np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"lidar2ego must be (4, 4), got {T.shape}")
    p_ego = voxel_centres_ego()
    p_lidar = (p_ego - T[:3, 3]) @ T[:3, :3]  # R^T (p - t), row vectors
    lo, hi = np.asarray(grid.pc_min, np.float64), np.asarray(grid.pc_max, np.float64)
    coords = (p_lidar - lo) / np.asarray(grid.voxel_size, np.float64)
    in_range = np.all((p_lidar >= lo) & (p_lidar < hi), axis=1)
    return coords, in_range


# ---------------------------------------------------------------------------------------------------------
# the meter
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Occ3DMeter:
    """Confusion matrix of Occ3D labels (rows GT 0..17, columns prediction 0..17) over camera-visible voxels,
    plus counts of voxels outside the student's volume. Everything is int64 counts: sum across processes."""

    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64))
    samples: int = 0
    voxels_total: int = 0
    """All voxels of the evaluated samples (200 * 200 * 16 each)."""
    out_of_range: int = 0
    """Voxels whose centre lies outside the student's volume (predicted free)."""
    out_of_range_visible: int = 0
    """... of them, where ``mask_camera`` is set (they are scored)."""
    out_of_range_visible_occupied: int = 0
    """... of them, occupied (0..16) in the GT: each is a false 'free' of the student."""

    def update(self, pred, gt, mask_camera, out_of_range=None) -> None:
        """pred, gt: integer arrays 0..17 of one shape; mask_camera, out_of_range: bool of that shape."""
        pred, gt = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(gt)).long()
        mask = torch.as_tensor(np.asarray(mask_camera)).bool()
        if pred.shape != gt.shape or mask.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)}, GT {tuple(gt.shape)} and mask "
                             f"{tuple(mask.shape)} differ in shape")
        p, g = pred[mask], gt[mask]
        for name, v in (("prediction", p), ("GT", g)):
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= NUM_CLASSES):
                raise ValueError(f"{name} holds labels outside 0..{NUM_CLASSES - 1}")
        self.hist += torch.bincount(g * NUM_CLASSES + p, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
        self.samples += 1
        self.voxels_total += gt.numel()
        if out_of_range is not None:
            oor = torch.as_tensor(np.asarray(out_of_range)).bool()
            self.out_of_range += int(oor.sum())
            vis = oor & mask
            self.out_of_range_visible += int(vis.sum())
            self.out_of_range_visible_occupied += int((vis & (gt != FREE)).sum())

    # -- gathering ----------------------------------------------------------------------------------------
    def state(self) -> torch.Tensor:
        """All counts as one int64 vector (sum it over processes, then :meth:`merge_state` / :meth:`from_state`)."""
        extra = torch.tensor([self.samples, self.voxels_total, self.out_of_range, self.out_of_range_visible,
                              self.out_of_range_visible_occupied], dtype=torch.int64)
        return torch.cat([self.hist.flatten(), extra])

    def merge_state(self, state: torch.Tensor) -> None:
        """Add the counts of another meter's :meth:`state`."""
        s = state.to(torch.int64).cpu()
        n = NUM_CLASSES ** 2
        if s.shape != (n + 5,):
            raise ValueError(f"Occ3DMeter state must have {n + 5} entries, got {tuple(s.shape)}")
        self.hist += s[:n].view(NUM_CLASSES, NUM_CLASSES)
        a, b, c, d, e = (int(x) for x in s[n:])
        self.samples += a
        self.voxels_total += b
        self.out_of_range += c
        self.out_of_range_visible += d
        self.out_of_range_visible_occupied += e

    @classmethod
    def from_state(cls, state: torch.Tensor) -> Occ3DMeter:
        m = cls()
        m.merge_state(state)
        return m

    def all_reduce(self) -> None:
        """Sum the counts over the processes of an initialised ``torch.distributed`` group (no-op otherwise)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        backend = dist.get_backend()
        s = self.state().to("cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(s)
        total = Occ3DMeter.from_state(s)
        self.__dict__.update(total.__dict__)

    # -- results ------------------------------------------------------------------------------------------
    def iou(self) -> np.ndarray:
        """(18,) float64 per-class IoU; NaN where a class is neither in the GT nor predicted."""
        h = self.hist.double().numpy()
        tp = np.diag(h)
        union = h.sum(0) + h.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)

    def summary(self) -> dict[str, Any]:
        """JSON-ready results (percent; ``None`` for NaN)."""
        iou = self.iou()

        def mean(classes) -> float | None:
            v = iou[list(classes)]
            v = v[~np.isnan(v)]
            return 100.0 * float(v.mean()) if v.size else None

        gt_counts = self.hist.sum(1).tolist()
        return {
            "miou": mean(MIOU_CLASSES),
            "miou_no_others_otherflat": mean(MIOU_NO_OTHERS_CLASSES),
            "per_class": {n: (None if math.isnan(v) else 100.0 * float(v))
                          for n, v in zip(OCC3D_CLASS_NAMES, iou.tolist())},
            "gt_voxels_per_class": dict(zip(OCC3D_CLASS_NAMES, gt_counts)),
            "samples": self.samples,
            "evaluated_voxels": int(self.hist.sum()),
            "voxels_total": self.voxels_total,
            "out_of_range_voxels": self.out_of_range,
            "out_of_range_visible_voxels": self.out_of_range_visible,
            "out_of_range_visible_occupied_voxels": self.out_of_range_visible_occupied,
            "out_of_range_prediction": "free",
            "mask": "mask_camera",
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"{'class':<22}{'IoU %':>8}{'GT voxels':>12}"]
        for c, name in enumerate(OCC3D_CLASS_NAMES):
            v = s["per_class"][name]
            tag = "  (not in mIoU)" if c == FREE else ""
            lines.append(f"{name:<22}{'     n/a' if v is None else f'{v:8.2f}'}"
                         f"{s['gt_voxels_per_class'][name]:>12d}{tag}")

        def fmt(v):
            return "     n/a" if v is None else f"{v:8.2f}"

        lines.append(f"{'mIoU (Occ3D: 0-16)':<22}{fmt(s['miou'])}  (mean over the classes 0..16 with an IoU)")
        lines.append(f"{'mIoU w/o others+oflat':<22}{fmt(s['miou_no_others_otherflat'])}  "
                     "(open-vocabulary papers' number: 14 classes)")
        ev = max(s["evaluated_voxels"], 1)
        lines.append(f"voxels scored (mask_camera): {s['evaluated_voxels']} of {s['voxels_total']}; outside the "
                     f"student's volume: {s['out_of_range_voxels']} (predicted free), of them "
                     f"{s['out_of_range_visible_voxels']} scored ({100 * s['out_of_range_visible_voxels'] / ev:.2f}%"
                     f"), {s['out_of_range_visible_occupied_voxels']} occupied in the GT")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------

def tpv_planes(model, batch: dict[str, Any], device: torch.device, student_image_hw=None) -> tuple[torch.Tensor, ...]:
    """The student's three TPV planes for sample 0 of ``batch``, as maps the aggregator samples:
    (hw (1, C, H, W), zh (1, C, Z, H), wz (1, C, W, Z))."""
    from pop3d.preprocess import prepare_student_inputs

    imgs, lidar2img, img_shape = prepare_student_inputs(
        batch["images"][:1].to(device), batch["lidar2img"][:1].to(device), out_hw=student_image_hw)
    feats = model.extract_img_feat(imgs, use_grid_mask=False)
    hw, zh, wz = model.tpv_head(feats, lidar2img, tuple(int(x) for x in img_shape))
    agg = model.tpv_aggregator
    c = hw.shape[-1]
    return (hw.transpose(1, 2).reshape(1, c, agg.tpv_h, agg.tpv_w),
            zh.transpose(1, 2).reshape(1, c, agg.tpv_z, agg.tpv_h),
            wz.transpose(1, 2).reshape(1, c, agg.tpv_w, agg.tpv_z))


def point_outputs(model, planes, coords: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupancy logits (P, 2) and CLIP-space features (P, F) at float grid coordinates ``coords`` (P, 3), as
    ``model(..., points=coords, features=coords, voxel_features=False)`` gives them, in chunks of ``chunk``."""
    agg = model.tpv_aggregator
    occ, fts = [], []
    for s in range(0, coords.shape[0], chunk):
        pts = coords[s:s + chunk].unsqueeze(0)
        f = agg._point_features(planes, pts).transpose(1, 2)  # (1, n, C)
        occ.append(agg._mlp(agg.decoder, agg.classifier, f)[0])
        fts.append(agg._mlp(agg.decoder_ft, agg.classifier_ft, f)[0])
    if not occ:
        return coords.new_zeros(0, agg.num_classes), coords.new_zeros(0, agg.feature_dim)
    return torch.cat(occ), torch.cat(fts)


@torch.no_grad()
def predict_occ3d(model, batch: dict[str, Any], lidar2ego: np.ndarray, grid, text: torch.Tensor,
                  prompt_class: torch.Tensor, *, device: torch.device, student_image_hw=None,
                  normalized_cosine: bool = False, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Occ3D labels of sample 0: (semantics uint8 (200, 200, 16) in 1..17, out_of_range bool (200, 200, 16)).

    text (K, C) prompt embeddings with classes ``prompt_class`` (K,) in 1..16; ``grid`` the student's
    :class:`shards.geometry.GridSpec`.
    """
    from pop3d.metrics import zero_shot_classes

    coords, in_range = centres_in_grid(lidar2ego, grid)
    sem = np.full(coords.shape[0], FREE, np.uint8)
    if in_range.any():
        planes = tpv_planes(model, batch, device, student_image_hw)
        pts = torch.from_numpy(coords[in_range]).to(device=device, dtype=torch.float32)
        occ_logits, feats = point_outputs(model, planes, pts, chunk)
        occupied = occ_logits.float().argmax(dim=1) == 1
        cls = torch.full((pts.shape[0],), FREE, dtype=torch.int64, device=device)
        if occupied.any():
            cls[occupied] = zero_shot_classes(feats[occupied].float(), text, prompt_class, normalized_cosine)
        sem[in_range] = cls.cpu().numpy().astype(np.uint8)
    return sem.reshape(OCC3D_SHAPE), ~in_range.reshape(OCC3D_SHAPE)


@torch.no_grad()
def evaluate_occ3d(model, loader, prompts, gt_index: dict[str, Path], lidar2ego: dict[str, np.ndarray] | None, grid, *,
                   device: torch.device, student_image_hw=None, normalized_cosine: bool = False,
                   max_samples: int | None = None, save_dir: str | Path | None = None, progress: bool = True
                   ) -> Occ3DMeter:
    """Score the student on Occ3D-nuScenes over ``loader`` (batch size 1); gathered over processes at the end.

    gt_index: :func:`index_gt`; lidar2ego: :func:`shards.lidar2ego.lidar2ego_by_sample` (from a nuScenes
    dataroot) or None: the calibration the shards carry (``batch["lidar2ego"]``, schema 3), which is also
    preferred when both are there. Every sample of the loader must have a GT and a calibration (a missing one
    is an :class:`Occ3DError`, never a silent skip). ``save_dir``: also write ``<token>.npz`` predictions there.
    """
    from tqdm.auto import tqdm

    meter = Occ3DMeter()
    text = prompts.embeddings.to(device)
    prompt_class = prompts.prompt_class.to(device)
    model.eval()
    bar = tqdm(total=max_samples, desc="occ3d eval", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        token = batch["tokens"][0]
        if token not in gt_index:
            raise Occ3DError(f"sample {token}: no Occ3D ground truth (<scene>/{token}/labels.npz) in the GT folder")
        calib = sample_lidar2ego(batch, lidar2ego)
        gt = load_labels(gt_index[token])
        pred, oor = predict_occ3d(model, batch, calib, grid, text, prompt_class, device=device,
                                  student_image_hw=student_image_hw, normalized_cosine=normalized_cosine)
        meter.update(pred, gt.semantics, gt.mask_camera, oor)
        if save_dir is not None:
            save_prediction(save_dir, token, pred)
        bar.update(1)
        if max_samples is not None and meter.samples >= max_samples:
            break
    bar.close()
    meter.all_reduce()
    return meter


def sample_lidar2ego(batch: dict[str, Any], tables: dict[str, np.ndarray] | None) -> np.ndarray:
    """(4, 4) float64 LiDAR -> ego of a batch-1 sample: from its shard (schema 3), else from the nuScenes tables."""
    token = batch["tokens"][0]
    if batch.get("lidar2ego") is not None:
        return batch["lidar2ego"][0].cpu().numpy().astype(np.float64)
    if tables is None:
        raise Occ3DError(f"sample {token}: its shards (schema 2) carry no LiDAR -> ego calibration: pass "
                         "--nuscenes-dataroot DIR, or rebuild the shards with scripts/build_shards.py --overwrite")
    if token not in tables:
        raise Occ3DError(f"sample {token}: no LIDAR_TOP keyframe calibration in the nuScenes tables")
    return tables[token]


# ---------------------------------------------------------------------------------------------------------
# command-line glue for scripts/eval.py
# ---------------------------------------------------------------------------------------------------------

def add_occ3d_arguments(parser) -> None:
    """``--protocol``, ``--occ3d-gt``, ``--nuscenes-dataroot``, ``--nuscenes-version``, ``--save-predictions``."""
    parser.add_argument("--protocol", choices=("pop3d", "occ3d", "both"), default="pop3d",
                        help="pop3d: POP-3D's ray-cast LiDAR GT (default); occ3d: Occ3D-nuScenes; both: both")
    parser.add_argument("--occ3d-gt", type=Path, help="Occ3D-nuScenes ground truth: the gts/ folder or its parent")
    parser.add_argument("--nuscenes-dataroot", type=Path,
                        help="nuScenes folder whose tables give the LiDAR -> ego calibration (Occ3D voxels are in "
                             "the ego frame); only needed for schema-2 shards (schema 3 stores it per sample); "
                             "default: --occ3d-gt when it holds v1.0-* tables (synthetic data)")
    parser.add_argument("--nuscenes-version", nargs="+", help="table folders to read (default: all found)")
    parser.add_argument("--save-predictions", type=Path,
                        help="with occ3d: write <sample_token>.npz ('semantics' (200, 200, 16) uint8) here")


def run_occ3d_protocol(args, cfg, model, prompts, split: str, device: torch.device) -> dict[str, Any]:
    """The Occ3D protocol as ``scripts/eval.py`` runs it: prints the table, returns the JSON summary.

    Raises Occ3DError / FileNotFoundError with a one-line message for bad arguments or files.
    """
    from pop3d.factory import grid_spec_of
    from shards.lidar2ego import lidar2ego_by_sample
    from shards.loader import make_loader

    if args.occ3d_gt is None:
        raise Occ3DError(f"--protocol {args.protocol} needs --occ3d-gt DIR (Occ3D-nuScenes gts/ or its parent)")
    dataroot = args.nuscenes_dataroot  # optional: schema-3 shards carry the LiDAR -> ego calibration
    if dataroot is None and any(args.occ3d_gt.glob("v1.0-*")):
        dataroot = args.occ3d_gt
    gt_index = index_gt(args.occ3d_gt)
    calib = None if dataroot is None else lidar2ego_by_sample(dataroot, args.nuscenes_version)
    grid = grid_spec_of(cfg)
    loader = make_loader(cfg.data.shards, split, batch_size=1, num_workers=cfg.data.num_workers, grid=grid,
                         shuffle=False, eval_gt=False)
    meter = evaluate_occ3d(model, loader, prompts, gt_index, calib, grid, device=device,
                           student_image_hw=cfg.data.student_image_hw, normalized_cosine=cfg.eval.normalized_cosine,
                           max_samples=args.max_samples or cfg.eval.max_samples, save_dir=args.save_predictions)
    print(f"\nOcc3D-nuScenes protocol: voxels where mask_camera is set, {split} ({meter.samples} samples)\n"
          + meter.table())
    if args.save_predictions is not None:
        print(f"wrote {meter.samples} predictions to {args.save_predictions}")
    return meter.summary()


def write_occ3d_results(args, split: str, occ3d: dict[str, Any]) -> int:
    """JSON of an Occ3D-only run (``{"occ3d": {...}}`` as in a ``both`` run), at ``--out`` or next to the weights."""
    import json

    from p3d_common.atomic import atomic_path

    results = {"split": split, "samples": occ3d["samples"], "weights": str(args.weights),
               "random_text_embeddings": args.random_text_embeddings, "occ3d": occ3d}
    out = args.out or Path(args.weights).with_suffix(f".eval_{split}.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(f"\nwrote {out}")
    return 0
