"""Zero-shot 3D semantic evaluation (pipeline.md §4): text prompts turn voxel features into classes.

For each sample: the student predicts occupancy and a feature per voxel; an occupied voxel takes the class of
its best-matching prompt (raw dot product, as the original; cosine on request), the rest are 'empty' (17).
The prediction is scored against the ray-cast ground truth (1..16 classes, 17 free, 255 unobserved) with
:class:`~pop3d.metrics.MeanIoU` over the 17 classes, and binary occupancy IoU over free/occupied.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p3d_common.banner import warn_meaningless
from p3d_common.labels import CLASS_NAMES, EMPTY_CLASS, IGNORE_LABEL, RAW_TO_NOIGNORE, SEMANTIC_CLASSES
from pop3d.metrics import MeanIoU, voxel_prediction, zero_shot_classes
from pop3d.preprocess import prepare_student_inputs


@dataclass
class TextPrompts:
    """Prompt embeddings usable for scoring: (K, C) as stored in the file, and the class 1..16 of each prompt."""

    embeddings: torch.Tensor
    prompt_class: torch.Tensor
    dropped: int
    """Prompts whose raw lidarseg class maps to 'ignore' (0): dropped as the original did."""


def prompts_from_raw(embeddings: torch.Tensor, raw_ids: torch.Tensor) -> TextPrompts:
    """Map each prompt's raw lidarseg id (0..31) to the 16 classes and drop prompts of ignored classes."""
    if embeddings.dim() != 2 or raw_ids.shape != (embeddings.shape[0],):
        raise ValueError(f"text embeddings must be (K, C) with K class ids, got {tuple(embeddings.shape)} and "
                         f"{tuple(raw_ids.shape)}")
    n_raw = len(RAW_TO_NOIGNORE)
    bad = (raw_ids < 0) | (raw_ids >= n_raw)
    if bool(bad.any()):
        raise ValueError(f"text embeddings: class id(s) {sorted(set(raw_ids[bad].tolist()))} outside the raw "
                         f"lidarseg ids 0..{n_raw - 1}")
    cls = torch.from_numpy(np.asarray(RAW_TO_NOIGNORE)[raw_ids.numpy()].astype(np.int64))
    keep = cls > 0
    return TextPrompts(embeddings[keep].float(), cls[keep], int((~keep).sum()))


def load_text_prompts(path: str | Path) -> TextPrompts:
    """Text embeddings saved by scripts/text_embeddings.py (or converted from zeroshot_weights.pth)."""
    from teacher.checkpoint import load_text_embeddings

    emb, raw_ids, _ = load_text_embeddings(path)
    return prompts_from_raw(emb, raw_ids)


def random_text_prompts(dim: int, seed: int = 0) -> TextPrompts:
    """Random unit vectors, one per class 1..16: for the quick start without CLIP weights. Meaningless numbers."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(16, dim, generator=g), dim=-1)
    return TextPrompts(emb, torch.arange(1, 17), 0)


@torch.no_grad()
def predict_sample(model, batch: dict[str, Any], device: torch.device, student_image_hw=None,
                   voxel_features: bool = True):
    """Run the student on one sample as the original evaluation/retrieval did: features asked at every LiDAR
    point (float grid coordinates, out-of-range points clipped to the border voxels).

    batch: the loader's batch dict with batch size 1. Returns the StudentOutput (``logits_pts_fts`` (1, N, C);
    with ``voxel_features`` also ``logits_vox_fts`` (1, C, X, Y, Z)).
    """
    if len(batch["tokens"]) != 1:
        raise ValueError("predict_sample expects batch size 1")
    imgs, lidar2img, img_shape = prepare_student_inputs(
        batch["images"].to(device), batch["lidar2img"].to(device), out_hw=student_image_hw)
    pts = batch["grid_ind"][0].to(device).float().unsqueeze(0)
    return model(imgs, lidar2img, img_shape, points=None, features=pts, voxel_features=voxel_features)


def occupancy_gt(eval_gt: torch.Tensor, voxel_label: torch.Tensor) -> torch.Tensor:
    """Binary GT of ``vox_agn_all`` by the original evaluation's rule: 0 free, 1 occupied, 255 not scored.

    eval_gt: the ray-cast GT (1..16, 17 observed free, 255 unobserved); voxel_label: the semantic voxel label
    (majority vote of the points: 0 ignore, 1..16, 17 no point), same shape. In this order, later rules win:
    every observed voxel (eval_gt != 255) is occupied; every voxel whose semantic label is 0 (ignore) is
    occupied too, also where the ray cast left it unobserved; every observed-free voxel (eval_gt 17) is free.
    """
    if voxel_label.shape != eval_gt.shape:
        raise ValueError(f"voxel label {tuple(voxel_label.shape)} and eval GT {tuple(eval_gt.shape)} "
                         "differ in shape")
    occ = torch.where(eval_gt != IGNORE_LABEL, 1, IGNORE_LABEL)
    occ = torch.where(voxel_label.to(eval_gt.device) == 0, 1, occ)
    return torch.where(eval_gt == EMPTY_CLASS, 0, occ).long()


@dataclass
class EvalMeters:
    semantic: MeanIoU
    """Voxels, 17 classes (16 + empty) against the ray-cast GT: the headline ``vox_clip_all``."""
    occupancy: MeanIoU
    """Voxels, free / occupied against the ray-cast GT (``vox_agn_all``)."""
    points: MeanIoU
    """LiDAR points, 16 classes against their own lidarseg labels (ignore 0), from the point features."""
    samples: int = 0


@torch.no_grad()
def evaluate(model, loader, prompts: TextPrompts, *, device: torch.device, student_image_hw=None,
             normalized_cosine: bool = False, max_samples: int | None = None, progress: bool = True,
             accelerator=None, bf16: bool | None = None) -> EvalMeters:
    """Run zero-shot evaluation over ``loader`` (batch size 1).

    The student is called as the original evaluation did: features asked at every LiDAR point (grid
    coordinates, clipped), voxel features on (pipeline.md §4.2). Multi-process: give each rank its own share
    of the split (``shards.order.eval_loader``) and the ``accelerator``: the counts and the sample count are
    summed over processes (``accelerator.reduce``), so every rank returns the whole split's meters.
    ``bf16`` (default: on CUDA) runs the student under bfloat16 autocast (its geometry and deformable sampling
    stay fp32); scoring is fp32.
    """
    from tqdm.auto import tqdm

    scored = [*SEMANTIC_CLASSES, EMPTY_CLASS]
    meters = EvalMeters(MeanIoU(scored, [CLASS_NAMES[k] for k in scored]), MeanIoU([0, 1], ["free", "occupied"]),
                        MeanIoU(list(SEMANTIC_CLASSES), [CLASS_NAMES[k] for k in SEMANTIC_CLASSES], ignore_label=0,
                                unit="points"))
    from pop3d.cuda_setup import apply_speed_settings

    apply_speed_settings(None, torch.device(device), model)  # TF32, cudnn.benchmark, channels_last (CUDA only)
    text = prompts.embeddings.to(device)
    prompt_class = prompts.prompt_class.to(device)
    model.eval()
    bar = tqdm(total=max_samples, desc="eval", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        if any(batch.get(k) is None for k in ("eval_gt", "labels", "voxel_label")):
            raise ValueError(f"sample {batch['tokens'][0]}: the evaluation split has no lidarseg ground truth")
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda" if bf16 is None else bf16):
            out = predict_sample(model, batch, device, student_image_hw)
        pred = voxel_prediction(out.logits_vox[0].float(), out.logits_vox_fts[0].float(), text, prompt_class,
                                normalized_cosine)
        gt = batch["eval_gt"][0].to(device).long()
        meters.semantic.update(pred, gt)
        occ_gt = occupancy_gt(gt, batch["voxel_label"][0].to(device))
        meters.occupancy.update((pred != EMPTY_CLASS).long(), occ_gt)
        pt_pred = zero_shot_classes(out.logits_pts_fts[0].float(), text, prompt_class, normalized_cosine)
        meters.points.update(pt_pred, batch["labels"][0].to(device).long())
        meters.samples += 1
        bar.update(1)
        if max_samples is not None and meters.samples >= max_samples:
            break
    bar.close()
    if accelerator is not None and accelerator.num_processes > 1:
        reduce_meters(meters, accelerator)
    return meters


def reduce_meters(meters: EvalMeters, accelerator) -> None:
    """Sum every meter's counts and the sample count over processes (in place, on every rank)."""
    dev = accelerator.device
    for meter in (meters.semantic, meters.occupancy, meters.points):
        meter.counts = accelerator.reduce(meter.counts.to(dev), reduction="sum").cpu()
    meters.samples = int(accelerator.reduce(torch.tensor([meters.samples], device=dev), reduction="sum"))


def select_text_prompts(text_path: str | None, use_random: bool, feature_dim: int) -> TextPrompts:
    """The prompts a command asked for: random ones (with a loud banner), a file, or an error that says how to
    get one. Raises ValueError when none was given or the dimension differs from the student's."""
    if use_random:
        warn_meaningless("RANDOM TEXT EMBEDDINGS: class scores and colours are meaningless; they only show that "
                         "the pipeline runs.")
        prompts = random_text_prompts(feature_dim)
    elif text_path:
        prompts = load_text_prompts(text_path)
        print(f"text embeddings {text_path}: {len(prompts.prompt_class)} prompts used, {prompts.dropped} dropped "
              f"(their class is 'ignore')")
    else:
        raise ValueError("no text embeddings: pass --text-embeddings FILE (scripts/text_embeddings.py makes one), "
                         "set eval.text_embeddings, or pass --random-text-embeddings")
    if prompts.embeddings.shape[1] != feature_dim:
        raise ValueError(f"{text_path or 'random'}: text embeddings have {prompts.embeddings.shape[1]} dims, the "
                         f"student predicts {feature_dim} (model.feature_dim); use embeddings of its width")
    return prompts
