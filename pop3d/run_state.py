"""Resumable training state: safetensors + JSON only, written atomically; no pickle is ever read.

A checkpoint is a folder ``<output_dir>/checkpoints/step_NNNNNNN`` holding

    model.safetensors       the student's state dict (the unwrapped model; never the teacher)
    optimizer.safetensors   every tensor of the optimiser state, keyed ``state.<param index>.<name>``
    trainer_state.json      step, epoch, the optimiser's param groups and non-tensor state, the LR
                            scheduler's and grad scaler's state dicts, validation results, the format tag

It is written under a temporary name and renamed, so a folder named ``step_*`` is always complete. Nothing
else is needed to resume: the data order and every random draw are functions of (seed, epoch, sample), see
``shards/order.py`` and ``pop3d/training.py``. A ``*.pkl`` or ``*.bin`` file that someone puts in the folder is
never opened.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from p3d_common.atomic import fsync_dir, fsync_file

FORMAT = "pop3d-run-state-1"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def _json_safe(x: Any) -> Any:
    """Replace non-finite floats (JSON has none) by tagged strings; :func:`_json_restore` undoes it."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _json_restore(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        return {k: _json_restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_restore(v) for v in x]
    return x


# ---- optimiser state <-> (tensors, json) ------------------------------------------------------------------
def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---- save / load ------------------------------------------------------------------------------------------
RUN_FILES = ("checkpoints", "log.jsonl", "student.safetensors", "config.yaml", "tensorboard")
"""What training writes into train.output_dir (pop3d/training.py); ``--overwrite`` deletes only these."""


def existing_run(out_dir: str | os.PathLike) -> list[str]:
    """The run files of an earlier training in ``out_dir``."""
    return [name for name in RUN_FILES if (Path(out_dir) / name).exists()]


def delete_run(out_dir: str | os.PathLike) -> list[str]:
    """Delete the run files of an earlier training in ``out_dir`` (nothing else); returns their names."""
    import shutil

    found = existing_run(out_dir)
    for name in found:
        path = Path(out_dir) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return found


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def save_run_state(path: Path, *, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                   scheduler_state: dict[str, Any], scaler_state: dict[str, Any] | None, step: int, epoch: int,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write one checkpoint folder atomically (temporary folder, fsync, rename). Call on one process."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, optim_meta = optimizer_to_files(optimizer_state)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
              metadata={"format": FORMAT})
    save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format": FORMAT})
    state = {"format": FORMAT, "step": step, "epoch": epoch, "optimizer": optim_meta,
             "scheduler": scheduler_state, "scaler": scaler_state, **(extra or {})}
    (tmp / STATE_FILE).write_text(json.dumps(_json_safe(state), indent=1, allow_nan=False))
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    if path.exists():  # the same step saved again (a resumed run re-reaching it): replace it
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def is_our_checkpoint(path: Path) -> bool:
    """A complete checkpoint folder this code wrote (the name pattern and a trainer_state.json with our tag)."""
    if not (path.is_dir() and _STEP_DIR.match(path.name) and (path / STATE_FILE).is_file()):
        return False
    try:
        return json.loads((path / STATE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_our_checkpoint(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def read_run_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint (JSON only)."""
    try:
        state = _json_restore(json.loads((Path(path) / STATE_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path / STATE_FILE}: cannot read the trainer state ({exc})") from exc
    if state.get("format") != FORMAT:
        raise ValueError(f"{path / STATE_FILE}: not a {FORMAT} checkpoint (format {state.get('format')!r})")
    return state


def load_run_state(path: Path, model, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Restore model, optimiser, scheduler (and grad scaler) from a checkpoint folder; returns its state JSON.

    Reads only ``model.safetensors``, ``optimizer.safetensors`` and ``trainer_state.json``.
    """
    from safetensors.torch import load_file

    state = read_run_state(path)
    weights = load_file(str(Path(path) / MODEL_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / MODEL_FILE}: does not match the model (missing {list(missing)[:5]}, "
                         f"unexpected {list(unexpected)[:5]}): was it written with another model config?")
    optimizer.load_state_dict(optimizer_from_files(load_file(str(Path(path) / OPTIM_FILE)), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, keep_steps: set[int] = frozenset()) -> list[Path]:
    """Delete our checkpoints except the newest ``keep_last`` and the steps in ``keep_steps`` (e.g. the best).

    Only folders :func:`is_our_checkpoint` recognises are touched. Returns the deleted paths.
    """
    ckpts = list_checkpoints(out_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    removed = []
    for p in ckpts:
        if p in keep or int(_STEP_DIR.match(p.name).group(1)) in keep_steps:
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


def truncate_log(path: str | os.PathLike, step: int) -> int:
    """Rewrite a ``log.jsonl`` atomically keeping only the records with ``step <= step``; returns how many were
    dropped. A torn last line (the run was killed while writing it) is dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    from p3d_common.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    return dropped
