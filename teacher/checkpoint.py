"""One-off converters from the released pickled files to safetensors, and loading the teacher from them.

- :func:`convert_maskclip_plus`: the MaskCLIP+ checkpoint (mmcv runner dict) -> the teacher subset
  (``backbone.*`` + ``decode_head.decode_module.aspp_modules.*``), depth/widths in the metadata.
- :func:`convert_clip_weights`: an open_clip ViT-B-16 state dict (``.safetensors``/``.bin``/``.pt``, or an
  OpenAI TorchScript archive with the unsafe flag) -> ``.safetensors`` with open_clip key names, for the
  MaskCLIP ViT teacher and the text tower.
- :func:`convert_zeroshot_weights`: POP-3D's released ``zeroshot_weights.pth`` (tuple ([K, 512] tensor,
  cls2idx list)) -> the text-embedding format of ``scripts/text_embeddings.py``.

Pickle is only read through :func:`teacher.weights_io.read_pth` (``weights_only=True`` unless the caller
passes ``allow_unsafe_pickle``, i.e. ``--unsafe-allow-pickle-code-execution``).
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from p3d_common.safetensors_io import CheckpointError, load_safetensors, save_safetensors
from teacher.deeplab import (
    ASPP_PREFIX,
    DeepLabArch,
    MaskClipPlusDeepLab,
    expected_keys,
    infer_arch,
    load_strict,
)
from teacher.weights_io import UNSAFE_FLAG, read_pth, state_dict_of

log = logging.getLogger(__name__)

MASKCLIP_PLUS_FORMAT = "pop3d.teacher.maskclip_plus/1"
CLIP_FORMAT = "pop3d.teacher.open_clip/1"
TEXT_FORMAT = "pop3d.text_embeddings/1"

# what the released checkpoint holds beyond the teacher, and why it is not needed
_DROP_REASONS = {
    "decode_head.text_embeddings": "COCO-Stuff class embeddings, bypassed by return_features",
    "decode_head.clip.": "the CLIP ViT, never run at feature extraction",
    "decode_head.proj.weight": "the ViT's projection, never run at feature extraction",
    "decode_head._iter_counter": "training counter",
}


def _drop_reason(key: str) -> str | None:
    for prefix, why in _DROP_REASONS.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return why
    return None


def convert_maskclip_plus(src_pth: str | os.PathLike, dst_safetensors: str | os.PathLike,
                          allow_unsafe_pickle: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Released MaskCLIP+ ``.pth`` -> teacher-only ``.safetensors``; returns a summary dict.

    Keeps ``backbone.*`` and ``decode_head.decode_module.aspp_modules.*`` (fp32, mmseg names), drops
    ``decode_head.text_embeddings`` (e.g. [171, 512], the source of the original's size-mismatch warning),
    ``decode_head.clip.*``, ``decode_head.proj.weight``, ``decode_head._iter_counter`` and everything outside
    ``state_dict`` (optimizer, meta), and prints ONE line saying so. Asserts the kept key set equals the set
    predicted for the detected depth; otherwise raises :class:`CheckpointError` naming offending keys.
    Metadata: format, depth, base/stem/aspp channels, source file name.
    """
    src = Path(src_pth)
    ckpt = read_pth(src, allow_unsafe_pickle=allow_unsafe_pickle)
    sd = state_dict_of(ckpt, src)
    outside = sorted(k for k in ckpt if k != "state_dict") if isinstance(ckpt, dict) and "state_dict" in ckpt \
        else []
    kept: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(("backbone.", ASPP_PREFIX + ".")):
            kept[key] = value
        elif (why := _drop_reason(key)) is not None:
            dropped.setdefault(why, []).append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{src}: unexpected keys that are neither teacher weights nor known extras: "
                              f"{sorted(unknown)[:10]}{' …' if len(unknown) > 10 else ''}")
    try:
        arch = infer_arch(kept, str(src))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    want = expected_keys(arch.depth, len(arch.aspp_dilations))
    missing, extra = sorted(want - set(kept)), sorted(set(kept) - want)
    if missing or extra:
        raise CheckpointError(f"{src}: key set does not match ResNetV1c-{arch.depth} + ASPP: missing {missing[:10]}"
                              f"{' …' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
                              f"{' …' if len(extra) > 10 else ''}")
    kept = {k: (v.float() if v.is_floating_point() else v) for k, v in kept.items()}
    meta = {"format": MASKCLIP_PLUS_FORMAT, "depth": arch.depth, "base_channels": arch.base_channels,
            "stem_channels": arch.stem_channels, "aspp_channels": arch.aspp_channels,
            "aspp_dilations": list(arch.aspp_dilations), "source": src.name}
    save_safetensors(kept, dst_safetensors, metadata=meta)
    parts = [f"{len(keys)} key(s) ({_shape_note(sd, keys)}: {why})" for why, keys in dropped.items()]
    if outside:
        parts.append(f"top-level {outside} (training state / metadata)")
    line = (f"[convert] {src.name}: kept {len(kept)} teacher tensors (ResNetV1c-{arch.depth} + "
            f"{len(arch.aspp_dilations)} ASPP branches, C={arch.aspp_channels}) -> {Path(dst_safetensors).name}; "
            f"dropped " + ("; ".join(parts) if parts else "nothing")
            + ". Dropping is expected: only the DeepLab student produces POP-3D's targets.")
    if not quiet:
        print(line)
    return {"arch": arch, "kept": len(kept), "dropped": {w: sorted(k) for w, k in dropped.items()},
            "dropped_top_level": outside, "message": line}


def _shape_note(sd: dict[str, torch.Tensor], keys: list[str]) -> str:
    if len(keys) == 1:
        return f"{keys[0]} {list(sd[keys[0]].shape)}"
    prefix = os.path.commonprefix(keys)
    return f"{prefix}*"


def arch_from_metadata(meta: dict[str, str], path: str | os.PathLike) -> DeepLabArch | None:
    """DeepLabArch from converter metadata, or None if the file carries none."""
    if "depth" not in meta:
        return None
    try:
        return DeepLabArch(depth=int(meta["depth"]), base_channels=int(meta["base_channels"]),
                           stem_channels=int(meta["stem_channels"]), aspp_channels=int(meta["aspp_channels"]),
                           aspp_dilations=tuple(json.loads(meta.get("aspp_dilations", "[6, 12, 18, 24]"))))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed teacher metadata {meta}: {exc}") from exc


def load_maskclip_plus(path: str | os.PathLike, fold_bn: bool = False) -> MaskClipPlusDeepLab:
    """Build the DeepLab teacher from a converted ``.safetensors`` (depth/widths from the tensors, checked
    against the metadata), strict load, eval mode; optionally fold BN. Errors name the file."""
    sd, meta = load_safetensors(path)
    try:
        arch = infer_arch(sd, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    meta_arch = arch_from_metadata(meta, path)
    if meta_arch is not None:
        if meta_arch.aspp_dilations != arch.aspp_dilations:
            arch = DeepLabArch(arch.depth, arch.base_channels, arch.stem_channels, arch.aspp_channels,
                               meta_arch.aspp_dilations)
        if meta_arch != arch:
            raise CheckpointError(f"{path}: metadata says {meta_arch} but the tensors say {arch}")
    model = MaskClipPlusDeepLab(arch)
    try:
        load_strict(model, sd, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model.eval()
    if fold_bn:
        model.fold_batchnorm()
    return model


# ----------------------------------------------------------------------------------------------------
# CLIP (open_clip ViT-B-16) weights
# ----------------------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_clip_state_dict(src: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """open_clip-named CLIP tensors from ``.safetensors``, a plain torch state dict, or (with the unsafe flag)
    an OpenAI TorchScript archive. A leading ``module.`` is stripped."""
    src = Path(src)
    if src.suffix == ".safetensors":
        sd, _ = load_safetensors(src)
        return {k.removeprefix("module."): v for k, v in sd.items()}
    if not src.is_file():
        raise CheckpointError(f"{src}: no such CLIP weight file")
    if _is_torchscript(src):
        if not allow_unsafe_pickle:
            raise CheckpointError(f"{src}: a TorchScript archive (OpenAI's original format) carries code; only if "
                                  f"you trust its origin, pass {UNSAFE_FLAG}")
        sd = torch.jit.load(str(src), map_location="cpu").state_dict()
        return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    return state_dict_of(read_pth(src, allow_unsafe_pickle=allow_unsafe_pickle), src)


def convert_clip_weights(src: str | os.PathLike, dst_safetensors: str | os.PathLike,
                         allow_unsafe_pickle: bool = False, quiet: bool = False) -> int:
    """CLIP ViT-B-16 weights (open_clip / OpenAI names) -> fp32 ``.safetensors`` with open_clip names.

    Checks that the visual tower keys (``visual.conv1.weight``, ``visual.proj``, ...) are present. Returns
    the number of tensors written.
    """
    sd = read_clip_state_dict(src, allow_unsafe_pickle)
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{src}: not an open_clip/OpenAI CLIP state dict (missing {missing})")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    save_safetensors(sd, dst_safetensors, metadata={"format": CLIP_FORMAT, "source": Path(src).name})
    if not quiet:
        print(f"[convert] {Path(src).name}: {len(sd)} CLIP tensors -> {Path(dst_safetensors).name}")
    return len(sd)


# ----------------------------------------------------------------------------------------------------
# Text embeddings released with POP-3D
# ----------------------------------------------------------------------------------------------------

def save_text_embeddings(path: str | os.PathLike, embeddings: torch.Tensor, cls2idx: torch.Tensor,
                         metadata: dict[str, Any]) -> None:
    """The text-embedding file: ``embeddings`` float32 [K, D] (unit rows), ``cls2idx`` int64 [K]."""
    if embeddings.dim() != 2 or cls2idx.shape != (embeddings.shape[0],):
        raise ValueError(f"text embeddings {tuple(embeddings.shape)} and cls2idx {tuple(cls2idx.shape)} "
                         f"do not match")
    save_safetensors({"embeddings": embeddings.float().contiguous(), "cls2idx": cls2idx.to(torch.int64)},
                     path, metadata={"format": TEXT_FORMAT, **metadata})


def load_text_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(embeddings float32 [K, D], cls2idx int64 [K], metadata) from a text-embedding ``.safetensors``."""
    sd, meta = load_safetensors(path)
    if set(sd) != {"embeddings", "cls2idx"}:
        raise CheckpointError(f"{path}: expected tensors 'embeddings' and 'cls2idx', found {sorted(sd)}")
    return sd["embeddings"], sd["cls2idx"], meta


def convert_zeroshot_weights(src_pth: str | os.PathLike, dst_safetensors: str | os.PathLike,
                             allow_unsafe_pickle: bool = False, quiet: bool = False) -> tuple[int, int]:
    """POP-3D ``zeroshot_weights.pth`` = (tensor [K, 512], cls2idx list of K raw lidarseg ids) -> safetensors.

    A bare [K, 512] tensor is accepted too (cls2idx then must come from elsewhere: error). Rows are stored
    as they are (already unit-norm); a warning is logged if they are not. Returns (K, D).
    """
    src = Path(src_pth)
    obj = read_pth(src, allow_unsafe_pickle=allow_unsafe_pickle)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], torch.Tensor)):
        raise CheckpointError(f"{src}: expected a tuple (embeddings [K, D] tensor, cls2idx list), got {type(obj)}")
    emb, cls2idx = obj[0].float(), torch.as_tensor(list(obj[1]) if not isinstance(obj[1], torch.Tensor) else obj[1],
                                                   dtype=torch.int64)
    if emb.dim() != 2 or cls2idx.shape != (emb.shape[0],):
        # the original stacks along dim 1 for some class sets: accept [D, K] too
        if emb.dim() == 2 and cls2idx.shape == (emb.shape[1],):
            emb = emb.t().contiguous()
        else:
            raise CheckpointError(f"{src}: embeddings {tuple(emb.shape)} do not match cls2idx of length "
                                  f"{cls2idx.numel()}")
    norms = emb.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        log.warning("%s: text embedding rows are not unit-norm (min %.4f, max %.4f)", src, norms.min(), norms.max())
    save_text_embeddings(dst_safetensors, emb, cls2idx, {"source": src.name, "prompt_set": "released"})
    if not quiet:
        print(f"[convert] {src.name}: text embeddings {list(emb.shape)} + cls2idx -> {Path(dst_safetensors).name}")
    return int(emb.shape[0]), int(emb.shape[1])
