"""Reading official ``.pth`` checkpoints safely and writing/reading safetensors atomically.

Pickle is only ever read here, by the converters, and by default only through
``torch.load(weights_only=True)``, which refuses arbitrary Python objects. A file that needs full
unpickling (mmcv runner checkpoints sometimes carry config objects in ``meta``) is refused with an
error that explains the risk; the caller may opt in with ``allow_unsafe_pickle=True``
(``--unsafe-allow-pickle-code-execution`` on the command line).

Run-time loading (training, evaluation) reads safetensors only: :func:`load_safetensors`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

UNSAFE_FLAG = "--unsafe-allow-pickle-code-execution"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names the file."""


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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` when the block ends without error; on an
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file in the same folder, then rename).

    ``metadata`` values are stored as strings (non-strings JSON-encoded).
    """
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors on CPU, metadata). Errors name the file."""
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
