"""Free-text 3D queries: how well every occupied voxel of one sample matches each text, in a browser and a PNG.

The student predicts occupancy and a CLIP-space feature per voxel (the evaluation's voxel path,
:func:`pop3d.evaluate.predict_sample`). Each query text goes through the open_clip text tower (teacher/text.py,
a LOCAL weight file; as typed, or averaged over POP-3D's 85 prompt templates), and every occupied voxel gets the
cosine similarity of its feature with the query. The results are drawn by :mod:`pop3d.query_viewer` as a
self-contained interactive HTML page (plotly, inlined; opens without network) and a matplotlib PNG.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class QueryError(ValueError):
    """Bad input a user can cause (files, sample, dimensions); the message says what to do."""


@dataclass
class QueryResult:
    """One sample's answers.

    centres: float32 (P, 3) voxel centres in metres (LiDAR frame); voxel_size (3,) metres;
    similarity: float32 (Q, P) cosine similarity of each voxel's feature with each query;
    texts: the Q queries; token: the sample; images: uint8 (6, 3, H, W) RGB (shards.geometry.CAMERAS order);
    occupied_only: whether P counts only voxels predicted occupied (else every voxel).
    """

    centres: np.ndarray
    voxel_size: np.ndarray
    similarity: np.ndarray
    texts: list[str]
    token: str
    images: np.ndarray
    occupied_only: bool = True


def random_query_embeddings(texts: Sequence[str], dim: int) -> torch.Tensor:
    """(Q, dim) unit vectors, each seeded by its text: for tests without CLIP weights. Meaningless."""
    out = []
    for t in texts:
        g = torch.Generator().manual_seed(zlib.crc32(t.encode("utf-8")))
        out.append(torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0))
    return torch.stack(out)


def clip_query_embeddings(texts: Sequence[str], clip_weights: str | Path, templates: bool = False,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """(Q, 512) unit text embeddings from a local open_clip ViT-B-16 file: each text as typed, or (``templates``)
    averaged over POP-3D's 85 prompt templates like the class prompts of the evaluation."""
    from teacher.text import PROMPT_TEMPLATES, build_text_model, encode_phrases

    try:
        model = build_text_model(clip_weights)
    except FileNotFoundError as exc:
        raise QueryError(str(exc)) from None
    except RuntimeError as exc:
        raise QueryError(f"{clip_weights}: not an open_clip ViT-B-16 weight file ({str(exc).splitlines()[0]})") from None
    return encode_phrases(model, list(texts), PROMPT_TEMPLATES if templates else ("{}",), device=device)


@torch.no_grad()
def query_sample(model, batch, queries: torch.Tensor, texts: Sequence[str], grid, *, device: torch.device,
                 student_image_hw=None, all_voxels: bool = False) -> QueryResult:
    """Cosine similarity of every occupied voxel (every voxel with ``all_voxels``) with each query (Q, F)."""
    from pop3d.evaluate import predict_sample

    out = predict_sample(model, batch, device, student_image_hw)
    occupied = out.logits_vox[0].argmax(dim=0) == 1  # (X, Y, Z)
    keep = torch.ones_like(occupied) if all_voxels else occupied
    idx = torch.nonzero(keep)  # (P, 3) voxel indices x, y, z
    feats = out.logits_vox_fts[0].movedim(0, -1)[keep].float()  # (P, F)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    q = torch.nn.functional.normalize(queries.to(device).float(), dim=-1)
    sim = (q @ feats.t()).cpu().numpy().astype(np.float32)
    lo = np.asarray(grid.pc_min, np.float64)
    vs = np.asarray(grid.voxel_size, np.float64)
    centres = (lo + (idx.cpu().numpy() + 0.5) * vs).astype(np.float32)
    return QueryResult(centres, vs.astype(np.float32), sim, list(texts), batch["tokens"][0],
                       batch["images"][0].numpy(), occupied_only=not all_voxels)


def run_query(config: str, weights: str, texts: Sequence[str], out: str | Path, *, index: int | None = None,
              token: str | None = None, split: str | None = None, clip_weights: str | None = None,
              random_text: bool = False, templates: bool = False, all_voxels: bool = False,
              png: str | Path | None = None, device: str = "cpu", overrides: Sequence[str] = ()) -> tuple[Path, Path]:
    """The whole ``scripts/query.py`` job: writes the HTML viewer ``out`` and the PNG (default: ``out`` with
    ``.png``). Returns both paths. Raises :class:`QueryError` with a one-line message on bad input."""
    from pop3d.cli_checks import load_student
    from pop3d.config import ConfigError, load_config
    from pop3d.query_viewer import render_query_png, write_query_html
    from pop3d.factory import grid_spec_of
    from shards.loader import read_sample

    if not texts or any(not t.strip() for t in texts):
        raise QueryError("give at least one non-empty --text")
    if (index is None) == (token is None):
        raise QueryError("give exactly one of --index N and --token T")
    if index is not None and index < 0:
        raise QueryError("--index must be >= 0")
    if random_text == (clip_weights is not None):
        raise QueryError("give exactly one of --clip-weights FILE (a local open_clip ViT-B-16 file) and "
                         "--random-text-embeddings")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise QueryError(f"--out {out}: must end with .html")
    png = Path(png) if png is not None else out.with_suffix(".png")
    try:
        cfg = load_config(config, list(overrides))
    except (ConfigError, FileNotFoundError) as exc:
        raise QueryError(f"config error: {exc}") from None
    dev = torch.device(device)
    queries = (random_query_embeddings(texts, cfg.model.feature_dim) if random_text
               else clip_query_embeddings(texts, clip_weights, templates, dev))
    if queries.shape[1] != cfg.model.feature_dim:
        raise QueryError(f"the text embeddings have {queries.shape[1]} dims, the student predicts "
                         f"{cfg.model.feature_dim} (model.feature_dim of {config})")
    grid = grid_spec_of(cfg)
    try:
        batch = read_sample(cfg.data.shards, split or cfg.data.val_split, grid, index=index, token=token,
                            eval_gt=False)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        raise QueryError(str(exc)) from None
    try:
        model, _ = load_student(cfg, weights, config)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # the loader's messages name the file
        msg = str(exc).splitlines()[0]
        raise QueryError(msg if str(weights) in msg else f"{weights}: {msg}") from None
    model.to(dev)
    result = query_sample(model, batch, queries, texts, grid, device=dev,
                          student_image_hw=cfg.data.student_image_hw, all_voxels=all_voxels)
    notes = ["RANDOM text embeddings: similarities mean nothing"] if random_text else []
    title = f"{split or cfg.data.val_split} sample {result.token} | weights {Path(weights).name}"
    write_query_html(result, out, title=title, notes=notes)
    render_query_png(result, png, title=title + ("  |  " + notes[0] if notes else ""))
    return out, png
