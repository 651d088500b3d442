"""Zero-shot 3D semantic evaluation (pipeline.md §4): text prompts turn voxel features into classes.

For each sample: the student predicts occupancy and a feature per voxel; an occupied voxel takes the class of
its best-matching prompt (raw dot product, as the original; cosine on request), the rest are 'empty' (17).
The prediction is scored against the ray-cast ground truth (1..16 classes, 17 free, 255 unobserved) with
:class:`~pop3d.metrics.MeanIoU` over the 17 classes, and binary occupancy IoU over free/occupied.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pop3d.metrics import EMPTY_CLASS, IGNORE_LABEL, MeanIoU, voxel_prediction
from pop3d.preprocess import prepare_student_inputs

CLASS_NAMES = ("barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
               "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
               "manmade", "vegetation", "empty")


@dataclass
class TextPrompts:
    """Prompt embeddings usable for scoring: (K, C) unit-norm and the class 1..16 of each prompt."""

    embeddings: torch.Tensor
    prompt_class: torch.Tensor
    dropped: int
    """Prompts whose raw lidarseg class maps to 'ignore' (0): dropped as the original did."""


def prompts_from_raw(embeddings: torch.Tensor, raw_ids: torch.Tensor) -> TextPrompts:
    """Map each prompt's raw lidarseg id (0..31) to the 16 classes and drop prompts of ignored classes."""
    from shards.geometry import RAW_TO_NOIGNORE

    if embeddings.dim() != 2 or raw_ids.shape != (embeddings.shape[0],):
        raise ValueError(f"text embeddings must be (K, C) with K class ids, got {tuple(embeddings.shape)} and "
                         f"{tuple(raw_ids.shape)}")
    cls = torch.from_numpy(np.asarray(RAW_TO_NOIGNORE)[raw_ids.numpy()].astype(np.int64))
    keep = cls > 0
    return TextPrompts(embeddings[keep].float(), cls[keep], int((~keep).sum()))


def load_text_prompts(path: str | Path) -> TextPrompts:
    """Text embeddings saved by scripts/text_embeddings.py (or converted from zeroshot_weights.pth)."""
    from teacher.text import load_text_embeddings

    emb, raw_ids = load_text_embeddings(path)
    return prompts_from_raw(emb, raw_ids)


def random_text_prompts(dim: int, seed: int = 0) -> TextPrompts:
    """Random unit vectors, one per class 1..16: for the quick start without CLIP weights. Meaningless numbers."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(16, dim, generator=g), dim=-1)
    return TextPrompts(emb, torch.arange(1, 17), 0)


def occupancy_gt(eval_gt: torch.Tensor) -> torch.Tensor:
    """Binary GT from the ray-cast GT: 0 free (17), 1 occupied (1..16), 255 unobserved/ignored."""
    occ = (eval_gt != EMPTY_CLASS).long()
    return torch.where(eval_gt == IGNORE_LABEL, torch.full_like(occ, IGNORE_LABEL), occ)


@torch.no_grad()
def evaluate(model, loader, prompts: TextPrompts, *, device: torch.device, student_image_hw=None,
             normalized_cosine: bool = False, max_samples: int | None = None, progress: bool = True
             ) -> tuple[MeanIoU, MeanIoU, int]:
    """Run zero-shot evaluation over ``loader``; returns (semantic meter, occupancy meter, samples seen)."""
    from tqdm.auto import tqdm

    semantic = MeanIoU(list(range(1, 18)), list(CLASS_NAMES))
    occupancy = MeanIoU([0, 1], ["free", "occupied"])
    text = prompts.embeddings.to(device)
    prompt_class = prompts.prompt_class.to(device)
    model.eval()
    seen = 0
    bar = tqdm(total=max_samples, desc="eval", disable=not progress, dynamic_ncols=True)
    for batch in loader:
        if batch.get("eval_gt") is None:
            raise ValueError("the evaluation split has no lidarseg ground truth (eval_gt is None)")
        imgs, lidar2img, img_shape = prepare_student_inputs(
            batch["images"].to(device), batch["lidar2img"].to(device), out_hw=student_image_hw)
        out = model(imgs, lidar2img, img_shape, points=None, features=None, voxel_features=True)
        for b in range(imgs.shape[0]):
            pred = voxel_prediction(out.logits_vox[b].float(), out.logits_vox_fts[b].float(), text, prompt_class,
                                    normalized_cosine)
            gt = batch["eval_gt"][b].to(device).long()
            semantic.update(pred, gt)
            occupancy.update((pred != EMPTY_CLASS).long(), occupancy_gt(gt))
            seen += 1
            bar.update(1)
            if max_samples is not None and seen >= max_samples:
                bar.close()
                return semantic, occupancy, seen
    bar.close()
    return semantic, occupancy, seen
