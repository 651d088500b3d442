"""Safetensors files: atomic save, checked load, and a readable key/shape mismatch report.

torch is imported when a function runs, not when this module is imported (the package stays torch-free).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p3d_common.atomic import atomic_path

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointError", "describe_mismatch", "format_keys", "load_safetensors", "save_safetensors"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file."""


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (:func:`p3d_common.atomic.atomic_path`).

    ``metadata`` values are stored as strings (non-strings JSON-encoded).
    """
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors on CPU, metadata). Errors (:class:`CheckpointError`) name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: run-time weights must be .safetensors; convert it with "
                              f"scripts/convert_weights.py")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    return tensors, meta


def format_keys(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` keys, comma-separated, with a count of the rest."""
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def describe_mismatch(got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Compare two key -> shape maps: None when equal, else '3 missing: a, b, c; 1 unexpected: d; 1 shape
    mismatches: e (2, 3) vs expected (3, 2)' (keys in the order of the maps, the first few of each kind)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k])} vs expected {tuple(expected[k])}" for k in got
              if k in expected and tuple(got[k]) != tuple(expected[k])]
    parts = [f"{len(v)} {name}: {format_keys(v)}" for name, v in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if v]
    return "; ".join(parts) or None
