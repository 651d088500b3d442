"""Building the student from a run config, saving and loading its weights, the grid it predicts on, and the
run's live teacher.

Training, evaluation, retrieval and the visualiser all build the student (and the teacher) here; nothing
outside training imports the training loop (:mod:`pop3d.training`).
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pop3d.config import RunConfig, config_to_dict

if TYPE_CHECKING:
    from pop3d.checkpoint import LoadReport
    from pop3d.model.tpvformer import TPVFormer
    from shards.geometry import GridSpec

__all__ = ["batch_to_device", "build_run_teacher", "build_student", "grid_spec_of", "load_student", "save_student"]


def build_student(cfg: RunConfig) -> TPVFormer:
    """A freshly initialised student of ``cfg.model`` (on the CPU, train mode)."""
    from pop3d.model.tpvformer import TPVFormer

    return TPVFormer(cfg.model)


def build_run_teacher(cfg: RunConfig, device: torch.device | str = "cpu"):
    """The live teacher of ``cfg.teacher`` on ``device``. A random teacher (``teacher.weights`` null: tests, the
    quick start) is initialised from ``train.seed`` alone, so training, retrieval's MaskCLIP baseline and the
    visualiser see the same teacher on every process and every run. Seeds the global torch RNG."""
    from shards.order import stable_seed
    from teacher.live import build_teacher_from_config

    torch.manual_seed(stable_seed(cfg.train.seed, "teacher-init"))
    return build_teacher_from_config(cfg.teacher, device=device)


def load_student(cfg: RunConfig, weights: str | os.PathLike, device: torch.device | str = "cpu"
                 ) -> tuple[TPVFormer, LoadReport]:
    """The student of ``cfg`` with trained weights from ``weights`` (``.safetensors``, strict: every key and
    shape, mismatches reported by name), on ``device`` in eval mode. Raises
    :class:`p3d_common.safetensors_io.CheckpointError` naming the file."""
    from pop3d.checkpoint import load_student_weights

    model = build_student(cfg)
    report = load_student_weights(model, weights, kind="pop3d")
    return model.to(device).eval(), report


def save_student(model: torch.nn.Module, path: Path, cfg: RunConfig, step: int) -> None:
    """Student weights only (never the teacher), as safetensors, with the config in the metadata."""
    from p3d_common.safetensors_io import save_safetensors

    save_safetensors(model.state_dict(), path, metadata={"format": "pop3d-student", "step": str(step),
                                                         "model_config": config_to_dict(cfg.model)})


def grid_spec_of(cfg: RunConfig) -> GridSpec:
    """The voxel grid of the student config as the shards' GridSpec."""
    from shards.geometry import GridSpec

    m = cfg.model
    return GridSpec(pc_min=tuple(m.pc_range[:3]), pc_max=tuple(m.pc_range[3:]), size=(m.tpv_w, m.tpv_h, m.tpv_z))


def batch_to_device(batch: dict[str, Any], device: torch.device | str, keys: Sequence[str] | None = None,
                    non_blocking: bool = True) -> dict[str, Any]:
    """The tensors (also inside lists) of a batch dict under ``keys`` (all if None) moved to ``device`` with
    accelerate's ``send_to_device``; everything else passes through unchanged (still on the host)."""
    from accelerate.utils import send_to_device

    moving = batch if keys is None else {k: v for k, v in batch.items() if k in keys}
    return {**batch, **send_to_device(moving, device, non_blocking=non_blocking)}
