"""Reading official ``.pth`` checkpoints safely.

Pickle is only ever read here, by the converters, and by default only through
``torch.load(weights_only=True)``, which refuses arbitrary Python objects. A file that needs full
unpickling (mmcv runner checkpoints sometimes carry config objects in ``meta``) is refused with an
error that explains the risk; the caller may opt in with ``allow_unsafe_pickle=True``
(``--unsafe-allow-pickle-code-execution`` on the command line).

Run-time loading (training, evaluation) reads safetensors only; the safetensors helpers and the atomic
writer live in :mod:`p3d_common` and are re-exported here for the converters.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from p3d_common.atomic import atomic_path
from p3d_common.safetensors_io import (
    CheckpointError,
    describe_mismatch,
    format_keys,
    load_safetensors,
    save_safetensors,
)

__all__ = ["UNSAFE_FLAG", "CheckpointError", "atomic_path", "describe_mismatch", "format_keys",
           "load_safetensors", "read_pth", "save_safetensors", "state_dict_of"]

UNSAFE_FLAG = "--unsafe-allow-pickle-code-execution"


def read_pth(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a ``.pth`` file with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the file if it is missing, not a torch file, or needs full
    unpickling while ``allow_unsafe_pickle`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError with long messages
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        weights_only_refusal = "weights_only" in str(exc) or "Unsupported global" in str(exc)
        if not weights_only_refusal:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg})") from exc
        if not allow_unsafe_pickle:
            raise CheckpointError(
                f"{path}: this file holds Python objects beyond tensors and needs full unpickling, which can "
                f"run arbitrary code from the file ({msg}). Only if you trust where the file came from, pass "
                f"{UNSAFE_FLAG}."
            ) from exc
        return torch.load(path, map_location="cpu", weights_only=False)


def state_dict_of(ckpt: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: ``ckpt['state_dict']`` if present, else ``ckpt`` itself.

    One leading ``module.`` (DDP) is stripped from every key. Non-tensor entries are an error.
    """
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors or a dict with 'state_dict', got {type(ckpt)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out
