"""Evaluation metrics: voxel mIoU for zero-shot segmentation (pipeline.md §4) and retrieval AP (§5).

``MeanIoU`` accumulates per-class counts (seen, predicted, correct) on voxels whose GT is not ignored. Two
means are reported:

- ``miou_official``: unseen classes count as IoU = 1, as the original ``MeanIoU`` does (comparable with the
  published 16.66, but inflated on small subsets);
- ``miou_present``: the mean over classes that occur in the GT (the honest number on small subsets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from p3d_common.labels import EMPTY_CLASS, IGNORE_LABEL


@dataclass
class MeanIoU:
    """Streaming per-class IoU over class ids ``classes`` (e.g. 1..17), ignoring ``ignore_label`` GT."""

    classes: list[int]
    names: list[str]
    ignore_label: int = IGNORE_LABEL
    unit: str = "voxels"
    """What is counted, for the table header."""
    counts: torch.Tensor = field(init=False)  # (3, K) int64: seen, predicted, correct

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.names):
            raise ValueError("classes and names must have the same length")
        self.counts = torch.zeros(3, len(self.classes), dtype=torch.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """pred, gt: integer tensors of the same shape (e.g. (X, Y, Z))."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and GT {tuple(gt.shape)} differ in shape")
        keep = gt != self.ignore_label
        p, g = pred[keep].long().cpu(), gt[keep].long().cpu()
        cls = torch.tensor(self.classes)
        g_hit = g.unsqueeze(1) == cls  # (V, K)
        p_hit = p.unsqueeze(1) == cls
        self.counts += torch.stack([g_hit.sum(0), p_hit.sum(0), (g_hit & p_hit).sum(0)])

    def merge(self, counts: torch.Tensor) -> None:
        """Add counts gathered from other processes (shape (3, K))."""
        self.counts += counts.to(self.counts)

    def iou(self) -> torch.Tensor:
        """(K,) float64 IoU per class; NaN for classes never seen in the GT."""
        seen, pos, correct = self.counts.double()
        union = seen + pos - correct
        iou = correct / union.clamp(min=1)
        return torch.where(seen > 0, iou, torch.full_like(iou, float("nan")))

    def summary(self) -> dict[str, float]:
        iou = self.iou()
        present = ~torch.isnan(iou)
        official = torch.where(present, iou, torch.ones_like(iou))
        return {
            "miou_official": 100.0 * float(official.mean()),
            "miou_present": 100.0 * float(iou[present].mean()) if present.any() else float("nan"),
            "classes_present": int(present.sum()),
        }

    def table(self) -> str:
        iou = self.iou()
        seen = self.counts[0]
        lines = [f"{'class':<22}{'IoU %':>8}{'GT ' + self.unit:>12}"]
        for name, v, s in zip(self.names, iou.tolist(), seen.tolist()):
            lines.append(f"{name:<22}{('  unseen' if math.isnan(v) else f'{100 * v:8.2f}')}{s:>12d}")
        summ = self.summary()
        lines.append(f"{'mIoU (official: unseen=1)':<22}{summ['miou_official']:8.2f}")
        lines.append(f"{'mIoU (present classes)':<22}{summ['miou_present']:8.2f}  "
                     f"({summ['classes_present']}/{len(self.classes)} classes in the GT)")
        return "\n".join(lines)


def zero_shot_classes(features: torch.Tensor, text: torch.Tensor, prompt_class: torch.Tensor,
                      normalized_cosine: bool = False) -> torch.Tensor:
    """Class of each feature: max over a class's prompts of <f, t>, then argmax over classes (pipeline.md §4.1).

    features: (P, C); text: (K, C) unit-norm prompt embeddings; prompt_class: (K,) class id per prompt
    (prompts of ignored classes already removed). Returns (P,) int64 class ids. Equivalent to taking the class
    of the best prompt.
    """
    f = features.float()
    if normalized_cosine:
        f = torch.nn.functional.normalize(f, dim=-1)
    logits = f @ text.float().t()  # (P, K)
    return prompt_class.to(logits.device)[logits.argmax(dim=1)]


def voxel_prediction(logits_vox: torch.Tensor, vox_features: torch.Tensor, text: torch.Tensor,
                     prompt_class: torch.Tensor, normalized_cosine: bool = False) -> torch.Tensor:
    """Zero-shot voxel labels (pipeline.md §4.2): occupied iff argmax of the 2 occupancy logits is 1, then the
    text class of its feature; other voxels are ``EMPTY_CLASS``.

    logits_vox: (2, X, Y, Z); vox_features: (C, X, Y, Z) -> (X, Y, Z) int64.
    """
    occupied = logits_vox.argmax(dim=0) == 1
    pred = torch.full(occupied.shape, EMPTY_CLASS, dtype=torch.int64, device=logits_vox.device)
    if occupied.any():
        feats = vox_features.movedim(0, -1)[occupied]  # (P, C)
        pred[occupied] = zero_shot_classes(feats, text, prompt_class, normalized_cosine)
    return pred


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Non-interpolated average precision, identical to sklearn's ``average_precision_score``.

    scores: (P,) float; relevant: (P,) bool. Tied scores form one threshold, as in sklearn.
    Returns NaN when nothing is relevant.
    """
    scores = scores.double().flatten()
    rel = relevant.flatten().bool()
    n_pos = int(rel.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, r = scores[order], rel[order].double()
    tp = r.cumsum(0)
    # thresholds at the last index of each run of equal scores
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp_t = tp[last]
    count_t = torch.nonzero(last).flatten().double() + 1
    precision = tp_t / count_t
    recall = tp_t / n_pos
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - recall_prev) * precision).sum())
