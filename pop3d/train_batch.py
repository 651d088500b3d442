"""One micro-batch of B samples, per sample where it matters: the projections of each sample, its random
draws, and the loss of teacher + student on the batch (the mean of the B samples' losses).

Used by the training loop (``pop3d/training.py``), the sync-count test and the benchmarks. The training
loader's per-sample additions (:class:`TrainSampleExtras`: photometric parameters, projection count) run in
its DataLoader workers, so the step reads nothing from the device to slice per sample.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pop3d.config import RunConfig
from pop3d.losses import LossTerms, pop3d_loss
from pop3d.preprocess import prepare_student_inputs
from shards.order import stable_seed


def projection_counts(batch: dict[str, Any]) -> list[int]:
    """Projections per sample, [M_b] * B, on the host: the loader's ``n_proj`` (training), else from the
    shapes (B == 1), else from ``proj_batch`` (one device->host read)."""
    b = len(batch["grid_ind"])
    if "n_proj" in batch:
        return [int(n) for n in batch["n_proj"]]
    if b == 1:
        return [int(batch["proj_point"].shape[0])]
    return torch.bincount(batch["proj_batch"], minlength=b).tolist()


def feature_points(batch: dict[str, Any], counts: list[int] | None = None) -> torch.Tensor:
    """Grid coordinates of every projection, (B, max_b M_b, 3) float32: sample b's M_b projections first,
    then zeros (padding; its outputs are never read). ``counts``: :func:`projection_counts`.

    A point seen by k cameras appears k times, each paired with its own teacher target (pipeline.md §1.9).
    """
    counts = projection_counts(batch) if counts is None else counts
    if len(counts) == 1:
        return batch["grid_ind"][0][batch["proj_point"]].unsqueeze(0).float()
    m, start, rows = max(counts), 0, []
    for grid_ind, n in zip(batch["grid_ind"], counts):
        f = grid_ind[batch["proj_point"][start:start + n]].float()
        rows.append(torch.nn.functional.pad(f, (0, 0, 0, m - n)))
        start += n
    return torch.stack(rows)


def seed_sample_draws(seed: int, epoch: int, tokens: list[str]) -> list[torch.Generator] | None:
    """Seed the random draws of one micro-batch. B == 1: the global RNGs (GridMask, dropout, on every device)
    from (seed, epoch, token, "model"), returns None. B > 1: the global RNGs (dropout) from
    (seed, epoch, token_1, ..., token_B, "model"), and returns one CPU generator per sample seeded
    (seed, epoch, token_b, "model"): sample b's GridMask is the one it gets alone; dropout draws one mask per
    batch tensor, so it cannot equal B separate samples' draws (the only draw that does not).
    The photometric parameters are drawn in the loader (:class:`TrainSampleExtras`)."""
    torch.manual_seed(stable_seed(seed, epoch, *tokens, "model"))
    if len(tokens) == 1:
        return None
    return [torch.Generator().manual_seed(stable_seed(seed, epoch, t, "model")) for t in tokens]


def photometric_params(seed: int, epoch: int, token: str, n_images: int) -> torch.Tensor:
    """The photometric parameters (n_images, 8) of one sample, from its generator (seed, epoch, token,
    "photometric") (pop3d.preprocess.draw_photometric_params)."""
    from pop3d.preprocess import draw_photometric_params

    return draw_photometric_params(n_images, torch.Generator().manual_seed(
        stable_seed(seed, epoch, token, "photometric")))


@dataclass(frozen=True)
class TrainSampleExtras:
    """What the training loader adds to each sample, in its workers (shards.order.PlannedSamples'
    ``per_sample``): ``photometric`` (6, 8) when the augmentation is on, and ``n_proj`` (its projection
    count, on the host, so the step slices per sample without reading the device)."""

    seed: int
    photometric: bool

    def __call__(self, sample: dict[str, Any], tag: tuple) -> dict[str, Any]:
        out: dict[str, Any] = {"n_proj": int(sample["proj_point"].shape[0])}
        if self.photometric:
            out["photometric"] = photometric_params(self.seed, tag[0], sample["token"], sample["image"].shape[0])
        return out


def compute_loss(model, teacher, batch: dict[str, Any], cfg: RunConfig, generator: torch.Generator | None,
                 train: bool = True, timer=None, grid_mask_generators: list[torch.Generator] | None = None
                 ) -> tuple[LossTerms, dict[str, float]]:
    """One forward of teacher and student on a device batch of B samples; returns the loss terms (the mean
    of the B samples' losses) and timings (ms).

    Photometric parameters: ``batch["photometric"]`` (B, 6, 8) when present (the training loader's), else
    drawn from ``generator``. With a ``timer`` (pop3d.cuda_setup.StepTimer, CUDA events) it marks
    ``teacher`` and ``student_fwd`` and the timings dict is empty (read the timer on log steps); without,
    host timers (exact on CPU only).
    """
    t0 = time.perf_counter()
    targets = teacher(batch["images"], batch["proj_batch"], batch["proj_cam"], batch["proj_rowcol"],
                      sync_free=True)
    t1 = time.perf_counter()
    if timer is not None:
        timer.mark("teacher")
    imgs, lidar2img, img_shape = prepare_student_inputs(
        batch["images"], batch["lidar2img"], out_hw=cfg.data.student_image_hw,
        photometric=train and cfg.data.photometric_aug, generator=generator,
        photometric_params=batch.get("photometric"))
    counts = projection_counts(batch)
    out = model(imgs, lidar2img, img_shape, points=None, features=feature_points(batch, counts),
                voxel_features=False, grid_mask_generators=grid_mask_generators)
    preds, tgts, start = [], [], 0
    for b, n in enumerate(counts):
        preds.append(out.logits_pts_fts[b, :n])
        tgts.append(targets[start:start + n].to(preds[-1].dtype))
        start += n
    terms = pop3d_loss(out.logits_vox, batch["occupancy"], preds, tgts, feature_weight=cfg.train.feature_loss_weight)
    t2 = time.perf_counter()
    if timer is not None:
        timer.mark("student_fwd")
        return terms, {}
    return terms, {"teacher_ms": 1e3 * (t1 - t0), "student_fwd_ms": 1e3 * (t2 - t1)}
