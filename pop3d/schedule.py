"""Optimiser and learning-rate schedule of the official run (pipeline.md §3.3-3.4).

AdamW (wd 0.01 on every parameter) with the image backbone at 0.1x LR; timm's CosineLRScheduler in
iterations: linear warm-up from ``warmup_lr_init`` over ``warmup_steps``, then cosine from each group's base
LR down to ``lr_min`` at ``total_steps``. Warm-up counts inside ``total_steps`` (no warm-up prefix).
Optimiser step k (1-based) uses the LR for t = k - 1, as the original's ``step_update`` ordering gives.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(t: int, base_lr: float, total_steps: int, warmup_steps: int = 500, warmup_lr_init: float = 1e-5,
          lr_min: float = 1e-6) -> float:
    """LR at iteration t for a parameter group with base LR ``base_lr`` (timm CosineLRScheduler, one cycle)."""
    if t < warmup_steps:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_steps
    if t >= total_steps:
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1.0 + math.cos(math.pi * t / total_steps))


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """Two AdamW groups: parameters whose name contains ``img_backbone`` at ``lr * backbone_lr_mult``, the
    rest at ``lr`` (the original's substring rule). Frozen parameters are left out."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if "img_backbone" in name else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "weight_decay": weight_decay,
                       "name": "img_backbone"})
    return groups


def build_optimizer(model: nn.Module, lr: float, backbone_lr_mult: float = 0.1,
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, backbone_lr_mult, weight_decay), lr=lr,
                             betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 500,
                    warmup_lr_init: float = 1e-5, lr_min: float = 1e-6) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR reproducing :func:`lr_at` per group; call ``.step()`` after every optimiser step."""
    bases = [g["lr"] for g in optimizer.param_groups]
    lambdas = [
        (lambda t, b=b: lr_at(t, b, total_steps, warmup_steps, warmup_lr_init, lr_min) / b) for b in bases
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
