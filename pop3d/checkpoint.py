"""Converting the official checkpoints to safetensors, and loading them into :class:`TPVFormer`.

* ``pop3d_weights.pth`` (DDP-saved, ``module.`` prefix): all 818 keys of the model map by identity after the
  prefix is stripped; the file must fit the chosen config exactly (keys and shapes).
* FCOS3D / DETR3D ``fcos3d.pth`` (initialisation of the original training): only ``img_backbone.*`` and
  ``img_neck.*`` are kept (``backbone.`` / ``neck.`` are accepted as aliases; old DCN names
  ``conv2_offset.*`` become ``conv2.conv_offset.*``). Every backbone key must be present (missing BN
  ``num_batches_tracked`` counters are filled with 0); a neck whose shapes do not fit is dropped, as the
  original's ``revise_ckpt_2`` fallback does. The head and aggregator stay at their initialisation.

Run-time loading reads safetensors only (:func:`load_student_weights`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p3d_common.safetensors_io import (
    CheckpointError,
    describe_mismatch,
    format_keys,
    load_safetensors,
    save_safetensors,
)
from pop3d.model import StudentConfig, TPVFormer
from teacher.weights_io import read_pth, state_dict_of

KINDS = ("pop3d", "fcos3d")


def expected_state_dict_shapes(cfg: StudentConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of ``TPVFormer(cfg).state_dict()``, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = TPVFormer(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _mismatch_report(sd: dict[str, torch.Tensor], expected: dict, path, what: str) -> str | None:
    diff = describe_mismatch({k: tuple(v.shape) for k, v in sd.items()}, {k: v[0] for k, v in expected.items()})
    return None if diff is None else f"{path}: does not fit the {what}; {diff}"


def _group_counts(keys) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def convert_pop3d_checkpoint(src_pth: str | os.PathLike, dst_safetensors: str | os.PathLike,
                             cfg: StudentConfig | None = None, allow_unsafe_pickle: bool = False,
                             verbose: bool = True) -> dict[str, torch.Tensor]:
    """Convert the official POP-3D checkpoint (``{'state_dict': {'module.…': …}, 'epoch', …}``) to safetensors.

    Refuses (``CheckpointError``) a file whose keys or shapes do not fit ``cfg``, naming the first offending
    keys. Returns the converted tensors.
    """
    cfg = cfg or StudentConfig()
    ckpt = read_pth(src_pth, allow_unsafe_pickle)
    n_prefixed = sum(1 for k in (ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {})
                     if isinstance(k, str) and k.startswith("module."))
    sd = state_dict_of(ckpt, src_pth)
    expected = expected_state_dict_shapes(cfg)
    err = _mismatch_report(sd, expected, src_pth, "student config "
                           f"(tpv {cfg.tpv_h}x{cfg.tpv_w}x{cfg.tpv_z}, dim {cfg.dim}, base_channels {cfg.base_channels})")
    if err:
        raise CheckpointError(err)
    out = {k: sd[k].to(expected[k][1]) if sd[k].dtype != expected[k][1] else sd[k] for k in expected}
    meta = {"kind": "pop3d", "source": Path(src_pth).name, "config": json.dumps(cfg.to_dict())}
    for extra in ("epoch", "global_iter"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(extra), (int, float)):
            meta[extra] = str(ckpt[extra])
    save_safetensors(out, dst_safetensors, meta)
    if verbose:
        n_par = sum(v.numel() for k, v in out.items() if not _is_buffer_key(k))
        print(f"[convert pop3d] {src_pth} -> {dst_safetensors}: {len(out)} keys mapped by identity "
              f"({_group_counts(out)}); stripped 'module.' from {n_prefixed} keys; ~{n_par:,} parameter values")
    return out


def _is_buffer_key(k: str) -> bool:
    return (k.endswith(("running_mean", "running_var", "num_batches_tracked", "tpv_mask_hw"))
            or ".ref_3d_" in k or ".ref_2d_" in k)


def map_fcos3d_key(key: str) -> str | None:
    """FCOS3D/DETR3D key -> student key, or None when the key is not part of the backbone/neck."""
    if key.startswith("backbone."):
        key = "img_backbone." + key[len("backbone."):]
    elif key.startswith("neck."):
        key = "img_neck." + key[len("neck."):]
    if not key.startswith(("img_backbone.", "img_neck.")):
        return None
    return key.replace(".conv2_offset.", ".conv2.conv_offset.")


@dataclass
class Fcos3dMapping:
    tensors: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # source keys outside backbone/neck
    renamed: int = 0
    filled: list[str] = field(default_factory=list)  # num_batches_tracked filled with 0
    neck_dropped: str | None = None  # reason the neck was dropped
    uninitialised: list[str] = field(default_factory=list)


def map_fcos3d_state_dict(sd: dict[str, torch.Tensor], cfg: StudentConfig, path="<checkpoint>") -> Fcos3dMapping:
    """Select/rename backbone and neck keys of an FCOS3D state dict and check them against ``cfg``."""
    expected = expected_state_dict_shapes(cfg)
    mapped: dict[str, torch.Tensor] = {}
    res = Fcos3dMapping(tensors=mapped)
    for k, v in sd.items():
        nk = map_fcos3d_key(k)
        if nk is None:
            res.dropped.append(k)
            continue
        res.renamed += nk != k
        mapped[nk] = v
    bb_exp = {k: v for k, v in expected.items() if k.startswith("img_backbone.")}
    for k in bb_exp:
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = torch.zeros((), dtype=torch.long)
            res.filled.append(k)
    bb = {k: v for k, v in mapped.items() if k.startswith("img_backbone.")}
    err = _mismatch_report(bb, bb_exp, path, "backbone of the student config "
                           f"(ResNet-{cfg.depth}, base_channels {cfg.base_channels})")
    if err:
        raise CheckpointError(err)
    neck_exp = {k: v for k, v in expected.items() if k.startswith("img_neck.")}
    neck = {k: v for k, v in mapped.items() if k.startswith("img_neck.")}
    neck_err = _mismatch_report(neck, neck_exp, path, "neck") if neck else None
    if neck_err and (any(k not in neck_exp for k in neck)
                     or any(tuple(v.shape) != neck_exp[k][0] for k, v in neck.items() if k in neck_exp)):
        res.neck_dropped = neck_err
        for k in neck:
            del mapped[k]
    for k, (_, dt) in expected.items():
        if k in mapped and mapped[k].dtype != dt:
            mapped[k] = mapped[k].to(dt)
    res.uninitialised = [k for k in expected if k not in mapped]
    return res


def convert_fcos3d_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, cfg: StudentConfig | None = None,
                              allow_unsafe_pickle: bool = False, verbose: bool = True) -> Fcos3dMapping:
    """Convert an FCOS3D/DETR3D ``.pth`` to a backbone+neck safetensors file (see module docstring)."""
    cfg = cfg or StudentConfig()
    sd = state_dict_of(read_pth(src, allow_unsafe_pickle), src)
    res = map_fcos3d_state_dict(sd, cfg, src)
    meta = {"kind": "fcos3d", "source": Path(src).name, "config": json.dumps(cfg.to_dict()),
            "uninitialised": json.dumps(sorted({k.split(".", 1)[0] for k in res.uninitialised}))}
    save_safetensors(res.tensors, dst, meta)
    if verbose:
        print(f"[convert fcos3d] {src} -> {dst}: kept {len(res.tensors)} keys ({_group_counts(res.tensors)}); "
              f"renamed {res.renamed}; ignored {len(res.dropped)} keys outside backbone/neck"
              + (f" (e.g. {format_keys(res.dropped)})" if res.dropped else ""))
        if res.filled:
            print(f"[convert fcos3d] filled {len(res.filled)} missing BN num_batches_tracked with 0")
        if res.neck_dropped:
            print(f"[convert fcos3d] neck dropped: {res.neck_dropped}")
        print(f"[convert fcos3d] left uninitialised: {len(res.uninitialised)} keys "
              f"({_group_counts(res.uninitialised)})")
    return res


@dataclass
class LoadReport:
    """What :func:`load_student_weights` did."""

    kind: str
    loaded: list[str]
    missing: list[str]  # model keys not in the file (left at their current values)
    unexpected: list[str]
    metadata: dict[str, str]

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        s = f"{self.kind}: loaded {len(self.loaded)} tensors"
        if self.missing:
            s += f"; left uninitialised {len(self.missing)} ({_group_counts(self.missing)})"
        if self.unexpected:
            s += f"; unexpected {len(self.unexpected)}: {format_keys(self.unexpected)}"
        return s


def load_student_weights(model: TPVFormer, safetensors_path: str | os.PathLike, kind: str = "pop3d") -> LoadReport:
    """Load converted weights. ``kind='pop3d'``: strict (every key, every shape); ``'fcos3d'``: backbone
    (all keys required) + neck where present, the rest is reported as uninitialised."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tensors, meta = load_safetensors(safetensors_path)
    if meta.get("kind") and meta["kind"] != kind:
        raise CheckpointError(f"{safetensors_path}: holds kind={meta['kind']!r} weights, asked to load as {kind!r}")
    own = model.state_dict()
    expected = {k: (tuple(v.shape), v.dtype) for k, v in own.items()}
    if kind == "pop3d":
        err = _mismatch_report(tensors, expected, safetensors_path, "model")
        if err:
            raise CheckpointError(err)
        model.load_state_dict(tensors, strict=True)
        return LoadReport(kind, sorted(tensors), [], [], meta)
    unexpected = [k for k in tensors if k not in expected or not k.startswith(("img_backbone.", "img_neck."))]
    if unexpected:
        raise CheckpointError(f"{safetensors_path}: keys outside the model's backbone/neck: {format_keys(unexpected)}")
    bad = [f"{k} {tuple(v.shape)} vs {expected[k][0]}" for k, v in tensors.items() if tuple(v.shape) != expected[k][0]]
    if bad:
        raise CheckpointError(f"{safetensors_path}: shape mismatches: {format_keys(bad)}")
    missing_bb = [k for k in expected if k.startswith("img_backbone.") and k not in tensors]
    if missing_bb:
        raise CheckpointError(f"{safetensors_path}: backbone keys missing: {format_keys(missing_bb)}")
    result = model.load_state_dict(tensors, strict=False)
    return LoadReport(kind, sorted(tensors), list(result.missing_keys), list(result.unexpected_keys), meta)
