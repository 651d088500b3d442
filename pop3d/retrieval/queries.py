"""Query embeddings: CLIP text tower (85 templates), a saved file of them, or random ones (tests only)."""
from __future__ import annotations

import json
import logging
import os
import zlib

import torch

from p3d_common.banner import warn_meaningless
from pop3d.retrieval.benchmark import BenchmarkError

log = logging.getLogger("pop3d.retrieval")


def clip_query_embeddings(queries: list[str], clip_weights: str | os.PathLike, device: str | torch.device = "cpu",
                          batch_size: int = 256, progress: bool = False) -> dict[str, torch.Tensor]:
    """CLIP ViT-B/16 (LOCAL open_clip weights) x the 85 templates -> {query: unit vector (512,)}."""
    from teacher.text import PROMPT_TEMPLATES, build_text_model, encode_phrases

    unique = sorted(set(queries))
    model = build_text_model(clip_weights)
    emb = encode_phrases(model, unique, PROMPT_TEMPLATES, batch_size=batch_size, device=device,
                         progress=progress)
    return dict(zip(unique, emb))


def save_query_embeddings(path: str | os.PathLike, embeddings: dict[str, torch.Tensor],
                          source: str = "") -> None:
    """Write {query: (C,)} as .safetensors: tensor ``embeddings`` (Q, C) + metadata ``queries`` (JSON list)."""
    from p3d_common.safetensors_io import save_safetensors

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: query embeddings are written as .safetensors")
    names = list(embeddings)
    save_safetensors({"embeddings": torch.stack([embeddings[q].float().cpu() for q in names])}, path,
                     {"format": "pop3d-retrieval-queries", "queries": json.dumps(names),
                      "templates": "85 (teacher/text.py)", "source": source})


def load_query_embeddings(path: str | os.PathLike, queries: list[str]) -> dict[str, torch.Tensor]:
    """Read a file of :func:`save_query_embeddings`; every query in ``queries`` must be in it."""
    from p3d_common.safetensors_io import load_safetensors

    tensors, meta = load_safetensors(path)
    if "embeddings" not in tensors or "queries" not in meta:
        raise BenchmarkError(f"{path}: expected a tensor 'embeddings' (Q, C) and metadata 'queries' "
                             f"(scripts/retrieval.py --save-query-embeddings writes one)")
    names = json.loads(meta["queries"])
    emb = tensors["embeddings"].float()
    if emb.dim() != 2 or emb.shape[0] != len(names):
        raise BenchmarkError(f"{path}: 'embeddings' {tuple(emb.shape)} does not match {len(names)} queries")
    table = dict(zip(names, emb))
    missing = sorted(set(queries) - set(table))
    if missing:
        raise BenchmarkError(f"{path}: {len(missing)} benchmark queries have no embedding: {missing[:8]}")
    return {q: table[q] for q in sorted(set(queries))}


def random_query_embeddings(queries: list[str], dim: int) -> dict[str, torch.Tensor]:
    """Random unit vectors, one per query (seeded by the query text): tests / quick start only."""
    warn_meaningless("RANDOM QUERY EMBEDDINGS: the retrieval numbers are MEANINGLESS (tests / quick start only); "
                     "pass --clip-weights or --query-embeddings for real numbers.", log)
    out = {}
    for q in sorted(set(queries)):
        g = torch.Generator().manual_seed(zlib.crc32(q.encode("utf-8")))
        out[q] = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    return out
