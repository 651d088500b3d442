"""Training losses (pipeline.md §3.2): Lovasz-softmax + cross-entropy on the voxel occupancy logits and
MSE between the student's point features and the live teacher's targets.

    total = lovasz(softmax(logits_vox), occupancy) + CE(logits_vox, occupancy) + w * MSE(pred_fts, teacher_fts)

each term per sample, then averaged over the B samples of a batch (at B = 1 the official loss itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from p3d_common.labels import IGNORE_LABEL as IGNORE_INDEX


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018).

    gt_sorted: (P,) float 0/1 ground truth sorted by decreasing error -> (P,)
    """
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax_flat(probas: torch.Tensor, labels: torch.Tensor, classes: str = "present",
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class Lovasz-softmax on flattened predictions, without host synchronisation.

    probas: (P, C) class probabilities; labels: (P,) int in [0, C) (any value where not valid);
    valid: (P,) bool or None (all valid): entries left out. ``classes='present'`` averages over the classes
    that occur in the valid labels (the official setting), ``'all'`` over all C classes.
    Returns a scalar; 0 when no entry is valid.

    Left-out entries get error 0 and no foreground, so they sort after every entry with a positive error and
    change neither the sum nor the gradient of the others (equal to dropping them). Absent classes are
    computed and weighted 0 instead of skipped, so nothing reads a tensor on the host.
    """
    if probas.numel() == 0:
        return probas.sum() * 0.0
    num_classes = probas.shape[1]
    losses, present = [], []
    for c in range(num_classes):
        fg = labels == c
        if valid is not None:
            fg = fg & valid
        fg = fg.to(probas.dtype)
        errors = (fg - probas[:, c]).abs()
        if valid is not None:
            errors = torch.where(valid, errors, torch.zeros_like(errors))
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
        present.append(fg.sum() > 0)
    losses_t = torch.stack(losses)
    if classes == "present":
        weight = torch.stack(present).to(losses_t.dtype)
    else:
        weight = torch.ones_like(losses_t)
        if valid is not None:
            weight = weight * valid.any().to(losses_t.dtype)
    return (losses_t * weight).sum() / weight.sum().clamp(min=1.0)


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Lovasz-softmax over all voxels of the batch at once (per_image=False, classes='present').

    logits: (B, C, *spatial); labels: (B, *spatial) int, ``ignore_index`` entries left out.
    """
    c = logits.shape[1]
    probas = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1).movedim(1, -1).reshape(-1, c)
    labels = labels.reshape(-1).long()
    return lovasz_softmax_flat(probas, labels, valid=labels != ignore_index)


@dataclass
class LossTerms:
    total: torch.Tensor
    lovasz: torch.Tensor
    ce: torch.Tensor
    feature: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """All terms as Python floats, read in one device->host copy."""
        names = list(vars(self))
        values = torch.stack([getattr(self, k).detach().float().reshape(()) for k in names]).tolist()
        return dict(zip(names, values))


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    """Mean of per-sample scalars (a batch of one: the value itself, bit for bit)."""
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def pop3d_loss(logits_vox: torch.Tensor, occupancy: torch.Tensor,
               point_features: torch.Tensor | list[torch.Tensor] | None,
               teacher_features: torch.Tensor | list[torch.Tensor] | None, feature_weight: float = 1.0) -> LossTerms:
    """The official training loss, per sample, averaged over the B samples of the batch.

    logits_vox: (B, 2, X, Y, Z); occupancy: (B, X, Y, Z) int (0 empty, 1 occupied, 255 ignored);
    point_features: lists of B tensors (M_b, C), the student features at sample b's projected points
    (duplicates for multi-camera points), or one (M, C) tensor when B == 1; teacher_features: the same
    shapes, raw teacher targets. Per sample: Lovasz over its voxels, CE averaged over its non-ignored
    voxels, MSE over its M_b x C elements (0 with M_b == 0); each term is then the mean over samples, so a
    batch of B gives the loss (and gradient) of the mean of B separate samples, as B accumulation
    micro-steps at batch 1 do.
    """
    if logits_vox.shape[0] != occupancy.shape[0] or logits_vox.shape[2:] != occupancy.shape[1:]:
        raise ValueError(f"voxel logits {tuple(logits_vox.shape)} and occupancy target {tuple(occupancy.shape)} "
                         f"disagree: the loader's grid must be the model's (tpv_w, tpv_h, tpv_z)")
    b = logits_vox.shape[0]
    pred, target = _per_sample(point_features, b, "point_features"), _per_sample(teacher_features, b,
                                                                                 "teacher_features")
    labels = occupancy.long()
    lov, ce, feat = [], [], []
    for i in range(b):
        logits_i, labels_i = logits_vox[i:i + 1], labels[i:i + 1]
        lov.append(lovasz_softmax(logits_i, labels_i))
        ce.append(F.cross_entropy(logits_i.float(), labels_i, ignore_index=IGNORE_INDEX))
        feat.append(_feature_loss(logits_vox, pred[i], target[i]))
    lov_m, ce_m, feat_m = _mean(lov), _mean(ce), _mean(feat)
    total = lov_m + ce_m + feature_weight * feat_m
    return LossTerms(total=total, lovasz=lov_m, ce=ce_m, feature=feat_m)


def _per_sample(features: torch.Tensor | list[torch.Tensor] | None, b: int, name: str) -> list:
    if features is None:
        return [None] * b
    if isinstance(features, torch.Tensor):
        if b != 1:
            raise ValueError(f"{name}: one (M, C) tensor is a batch of one sample; give a list of {b} tensors")
        return [features]
    if len(features) != b:
        raise ValueError(f"{name}: {len(features)} tensors for a batch of {b} samples")
    return list(features)


def _feature_loss(logits_vox: torch.Tensor, pred: torch.Tensor | None, target: torch.Tensor | None) -> torch.Tensor:
    """MSE of one sample's point features (M, C) against its teacher targets; 0 without points."""
    if pred is None or target is None or pred.numel() == 0:
        return logits_vox.sum() * 0.0
    if pred.shape != target.shape:
        raise ValueError(f"student features {tuple(pred.shape)} and teacher targets {tuple(target.shape)} "
                         "differ in shape")
    return F.mse_loss(pred.float(), target.float())
