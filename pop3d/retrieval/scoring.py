"""Scores and APs of one benchmark sample: raw dot products with the query, AP over points and projections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pop3d.evaluate import predict_sample
from pop3d.metrics import average_precision


@dataclass
class SampleResult:
    """APs of one benchmark entry (fractions in [0, 1]; NaN when no relevant point is in the set)."""

    split: str
    token: str
    query: str
    ap_all: float
    """POP3D, every LiDAR point."""
    ap_visible: float
    """POP3D, the visible (point, camera) multiset."""
    ap_visible_maskclip: float | None
    """The teacher at the visible projections; None when the baseline was not run."""
    num_points: int
    num_relevant: int
    num_visible: int
    """Visible (point, camera) pairs M."""
    num_visible_relevant: int

    def line(self) -> str:
        """``split;token;query;mAP;mAP_visible;N/A;mAP_visible_maskclip`` as the original's results file."""
        mc = "N/A" if self.ap_visible_maskclip is None else repr(self.ap_visible_maskclip)
        return f"{self.split};{self.token};{self.query};{self.ap_all!r};{self.ap_visible!r};N/A;{mc}"


def query_scores(features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Raw dot products: features (P, C), query (C,) -> (P,) float32 (no normalisation, as the original)."""
    return features.float() @ query.to(features.device, torch.float32)


def sample_aps(point_scores: torch.Tensor, relevant: torch.Tensor, proj_point: torch.Tensor,
               teacher_scores: torch.Tensor | None = None) -> tuple[float, float, float | None]:
    """APs of one sample.

    point_scores: (N,) student score of every LiDAR point; relevant: (N,) bool; proj_point: (M,) int64 point
    index of each visible (point, camera) projection (a point seen by k cameras appears k times);
    teacher_scores: (M,) teacher score of each projection, or None.
    Returns (AP over the N points, AP over the M projections, teacher AP over the M projections or None).
    """
    point_scores, relevant, proj_point = point_scores.cpu(), relevant.cpu().bool(), proj_point.cpu().long()
    if point_scores.shape != relevant.shape:
        raise ValueError(f"{tuple(point_scores.shape)} scores for {tuple(relevant.shape)} relevance values")
    vis_rel = relevant[proj_point]
    ap_all = average_precision(point_scores, relevant)
    ap_vis = average_precision(point_scores[proj_point], vis_rel)
    ap_mc = None
    if teacher_scores is not None:
        if teacher_scores.shape != proj_point.shape:
            raise ValueError(f"{tuple(teacher_scores.shape)} teacher scores for {tuple(proj_point.shape)} projections")
        ap_mc = average_precision(teacher_scores.cpu(), vis_rel)
    return ap_all, ap_vis, ap_mc


@torch.no_grad()
def student_point_features(model, batch: dict[str, Any], student_image_hw=None) -> torch.Tensor:
    """Student feature at every LiDAR point of a batch of size 1 (on the batch's device): (N, C).

    Called as the original retrieval/eval did: ``features`` = float grid coordinates of all points
    (out-of-range points clipped to the border voxels), no voxel pass.
    """
    out = predict_sample(model, batch, batch["images"].device, student_image_hw, voxel_features=False)
    return out.logits_pts_fts[0]
