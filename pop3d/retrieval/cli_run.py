"""``scripts/retrieval.py``'s run: query embeddings, the student (and MaskCLIP baseline), the tables and files.

The script parses its arguments and checks the inputs (weights, query source, benchmark, shards); this module
does the rest.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from pop3d.retrieval.benchmark import TABLE_SPLITS, BenchmarkEntry


def query_embeddings(queries: list[str], dim: int, *, random_queries: bool, query_embeddings_path: str | None,
                     clip_weights: str | None, device, progress: bool) -> tuple[dict[str, torch.Tensor], str]:
    """One embedding (dim,) per distinct query, and where they came from ("random", the file or the CLIP weights)."""
    from pop3d.retrieval.queries import clip_query_embeddings, load_query_embeddings, random_query_embeddings

    if random_queries:
        from p3d_common.banner import warn_meaningless

        warn_meaningless("RANDOM QUERY EMBEDDINGS: the APs below are meaningless; they only show that the pipeline runs.")
        return random_query_embeddings(queries, dim), "random"
    if query_embeddings_path:
        return load_query_embeddings(query_embeddings_path, queries), str(query_embeddings_path)
    return clip_query_embeddings(queries, clip_weights, device=device, progress=progress), str(clip_weights)


def run_retrieval(cfg, entries: list[BenchmarkEntry], *, weights: str | os.PathLike, config_path: str | os.PathLike,
                  benchmark: Path, splits: list[str], random_queries: bool, query_embeddings_path: str | None,
                  clip_weights: str | None, save_query_embeddings_path: str | None, device: str, out: Path,
                  maskclip: bool, allow_missing: bool, num_workers: int | None, progress: bool) -> int:
    """Score the benchmark ``entries``: print one table per split and write the results under ``out``.

    Under ``accelerate launch`` (N processes) every rank scores its share of the samples, the results are
    gathered and rank 0 prints and writes them. Returns the exit status: 0, or 2 after a one-line error when the
    query embeddings are not the student's width.
    """
    from pop3d.evaluate_run import eval_device, load_reported_student
    from pop3d.factory import grid_spec_of
    from pop3d.retrieval.queries import save_query_embeddings
    from pop3d.retrieval.report import format_table, summarize, write_results
    from pop3d.retrieval.run import evaluate_retrieval

    accelerator, dev = eval_device(device)
    is_main = accelerator is None or accelerator.is_main_process
    progress = progress and is_main
    queries = [e.query for e in entries]
    if is_main:
        print(f"benchmark {benchmark}: {len(entries)} entries, {len(set(queries))} distinct queries "
              f"({', '.join(f'{s} {sum(e.split == s for e in entries)}' for s in splits)})"
              + (f", on {accelerator.num_processes} processes" if accelerator is not None else ""))
    dim = cfg.model.feature_dim
    emb, source = query_embeddings(queries, dim, random_queries=random_queries,
                                   query_embeddings_path=query_embeddings_path, clip_weights=clip_weights,
                                   device=dev, progress=progress)
    got = next(iter(emb.values())).shape[0]
    if got != dim:
        if is_main:
            print(f"error: {source}: query embeddings have {got} dims, the student predicts {dim} "
                  "(model.feature_dim)", file=sys.stderr)
        return 2
    if save_query_embeddings_path and is_main:
        save_query_embeddings(save_query_embeddings_path, emb, source)
        print(f"wrote query embeddings to {save_query_embeddings_path}")

    model = load_reported_student(cfg, weights, config_path)
    model.to(dev)
    teacher = None
    if maskclip:
        from pop3d.factory import build_run_teacher

        teacher = build_run_teacher(cfg, dev)
    report = evaluate_retrieval(
        model, teacher, entries, emb, cfg.data.shards, grid_spec_of(cfg), device=dev,
        student_image_hw=cfg.data.student_image_hw,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        progress=progress, allow_missing=allow_missing, accelerator=accelerator)
    if not is_main:
        return 0
    table_splits = [s for s in TABLE_SPLITS if s in splits or s == "valtest"]
    summaries = summarize(report.results, table_splits)
    print()
    for s in summaries:
        print(format_table(s) + "\n")
    for line in report.summary_lines():
        print(line)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    paths = write_results(out, report, summaries, stamp, extra={
        "weights": str(weights), "config": str(config_path), "benchmark": str(benchmark),
        "queries": source, "random_queries": bool(random_queries), "maskclip": teacher is not None,
        "teacher_weights": None if teacher is None else cfg.teacher.weights, "splits": list(splits)})
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
