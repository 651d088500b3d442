"""The benchmark run: every entry's sample read from the shards by token, scored by the student (and teacher)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pop3d.retrieval.benchmark import SPLITS, BenchmarkEntry, BenchmarkError
from pop3d.retrieval.scoring import SampleResult, query_scores, sample_aps, student_point_features

log = logging.getLogger("pop3d.retrieval")


@dataclass
class Skipped:
    """An entry that was not evaluated, and why."""

    token: str
    split: str
    query: str
    reason: str
    file: str = ""


@dataclass
class RetrievalReport:
    results: list[SampleResult]
    skipped_length_mismatch: list[Skipped]
    missing_from_shards: list[Skipped]
    entries: int
    maskclip: bool

    def summary_lines(self) -> list[str]:
        lines = [f"evaluated {len(self.results)} of {self.entries} benchmark entries"]
        if self.skipped_length_mismatch:
            lines.append(f"SKIPPED {len(self.skipped_length_mismatch)} entries whose annotation length differs "
                         f"from the sample's point count:")
            lines += [f"  {s.file}: {s.reason}" for s in self.skipped_length_mismatch]
        if self.missing_from_shards:
            lines.append(f"SKIPPED {len(self.missing_from_shards)} entries whose sample is in no shard:")
            lines += [f"  {s.split} {s.token} [{s.query}]" for s in self.missing_from_shards]
        return lines


def _shard_splits(source: str) -> list[str]:
    """Splits available in a shard source (manifest splits, else the SPLITS that have shards)."""
    from shards.loader import list_shards
    from shards.writer import read_manifest

    if source.endswith(".json") or os.path.exists(os.path.join(source, "manifest.json")):
        manifest, _ = read_manifest(source)
        return list(manifest["splits"])
    found = []
    for split in SPLITS:
        try:
            list_shards(source, split)
        except ValueError:
            continue
        found.append(split)
    return found


def iterate_benchmark_samples(shards: str, tokens: set[str], grid, num_workers: int = 0):
    """Yield (shard split, batch of size 1) for every sample whose token is in ``tokens``, searching the
    shards of every split; stops as soon as all tokens were found. Other samples are dropped before decode."""
    from shards.loader import list_shards, make_loader

    remaining = set(tokens)
    for split in _shard_splits(shards):
        if not remaining:
            return
        urls, _ = list_shards(shards, split)
        loader = make_loader(shards, split, batch_size=1, num_workers=min(num_workers, len(urls)), grid=grid,
                             shuffle=False, eval_gt=False, tokens=set(remaining),
                             split_nodes=False)  # under N processes the tokens are split, not the shards
        for batch in loader:
            token = batch["tokens"][0]
            remaining.discard(token)
            yield split, batch
            if not remaining:
                break


@torch.no_grad()
def evaluate_retrieval(model, teacher, entries: list[BenchmarkEntry], queries: dict[str, torch.Tensor],
                       shards: str, grid, *, device: torch.device, student_image_hw=None,
                       num_workers: int = 0, progress: bool = True, allow_missing: bool = False,
                       accelerator=None) -> RetrievalReport:
    """Run the benchmark: every entry's sample is read from the shards (any split) by token.

    model: the student (eval mode is set here); teacher: a LiveTeacher or None (no MaskCLIP baseline);
    queries: {query: (C,)}; grid: the student's GridSpec. An entry whose annotation length differs from the
    sample's point count is skipped and reported. A token found in no shard is an error unless
    ``allow_missing`` (then it is reported). Results come back in benchmark order.

    With an ``accelerator`` of N processes, rank r scores the samples ``sorted(tokens)[r::N]`` and the entries'
    results are gathered (``accelerate.utils.gather_object``): every rank returns the whole report, equal to a
    one-process run's.
    """
    from tqdm.auto import tqdm

    from pop3d.factory import batch_to_device

    dim = next(iter(queries.values())).shape[0] if queries else None
    by_token = _entries_by_token(entries, queries)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = set(sorted(by_token)[rank::world])
    model.eval()
    results: dict[int, SampleResult] = {}
    mismatched: dict[int, Skipped] = {}
    bar = tqdm(total=sum(len(by_token[t]) for t in mine), desc="retrieval", disable=not progress,
               dynamic_ncols=True)
    for shard_split, batch in iterate_benchmark_samples(shards, mine, grid, num_workers):
        todo = _usable_entries(entries, by_token[batch["tokens"][0]], batch, shard_split, mismatched, bar)
        if not todo:
            continue
        batch = batch_to_device(batch, device)
        feats, t_feats = _point_features(model, teacher, batch, student_image_hw, dim)
        for i in todo:
            results[i] = _score_entry(entries[i], batch, queries, feats, t_feats)
            bar.update(1)
    bar.close()
    if world > 1:
        results, mismatched = _gathered(results), _gathered(mismatched)
    missing = [Skipped(entries[i].token, entries[i].split, entries[i].query, "sample not found in any shard")
               for i in range(len(entries)) if i not in results and i not in mismatched]
    if missing and not allow_missing:
        toks = sorted({m.token for m in missing})
        raise BenchmarkError(f"{shards}: {len(toks)} benchmark samples are in no shard split "
                             f"{_shard_splits(shards)}: {toks[:8]} (build the shards of every split, or pass "
                             f"--allow-missing to report them)")
    return RetrievalReport([results[i] for i in sorted(results)], [mismatched[i] for i in sorted(mismatched)],
                           missing, len(entries), teacher is not None)


def _gathered(per_rank: dict[int, Any]) -> dict[int, Any]:
    """{entry index: value} of every process, merged (each entry is scored by exactly one rank)."""
    from accelerate.utils import gather_object

    return dict(gather_object(sorted(per_rank.items(), key=lambda kv: kv[0])))


def _entries_by_token(entries: list[BenchmarkEntry], queries: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Entry indices per sample token; an entry whose query has no embedding is an error."""
    by_token: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.query not in queries:
            raise BenchmarkError(f"{e.source}: query {e.query!r} has no embedding")
        by_token.setdefault(e.token, []).append(i)
    return by_token


def _usable_entries(entries: list[BenchmarkEntry], indices: list[int], batch: dict[str, Any], shard_split: str,
                    mismatched: dict[int, Skipped], bar) -> list[int]:
    """The entries of this sample whose annotation length equals its point count; the others are recorded in
    ``mismatched`` (and counted on ``bar``). A CSV split that differs from the shard's is warned about."""
    token = batch["tokens"][0]
    n_points = int(batch["points"][0].shape[0])
    todo = []
    for i in indices:
        e = entries[i]
        if e.split != shard_split:
            log.warning("%s: sample %s is listed as %s but stored in the %s shards (the CSV split is used)",
                        e.source, token, e.split, shard_split)
        if e.relevant.shape[0] != n_points:
            mismatched[i] = Skipped(token, e.split, e.query, f"{e.relevant.shape[0]} relevance values for "
                                    f"{n_points} LiDAR points", str(e.ann_file))
            log.warning("SKIPPED %s: %s", e.ann_file, mismatched[i].reason)
            bar.update(1)
        else:
            todo.append(i)
    return todo


def _point_features(model, teacher, batch: dict[str, Any], student_image_hw, dim: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student features at every LiDAR point (N, C) and teacher features at every projection (M, C) or None;
    a feature size other than the queries' ``dim`` is an error."""
    feats = student_point_features(model, batch, student_image_hw)
    if dim is not None and feats.shape[1] != dim:
        raise ValueError(f"the student predicts {feats.shape[1]}-d features, the queries are {dim}-d")
    t_feats = None
    if teacher is not None:
        t_feats = teacher(batch["images"], batch["proj_batch"], batch["proj_cam"], batch["proj_rowcol"])
        if dim is not None and t_feats.shape[1] != dim:
            raise ValueError(f"the teacher gives {t_feats.shape[1]}-d features, the queries are {dim}-d")
    return feats, t_feats


def _score_entry(e: BenchmarkEntry, batch: dict[str, Any], queries: dict[str, torch.Tensor],
                 feats: torch.Tensor, t_feats: torch.Tensor | None) -> SampleResult:
    """The APs of one entry from the sample's point (and projection) features."""
    proj_point = batch["proj_point"].cpu()
    q = queries[e.query]
    rel = torch.from_numpy(e.relevant)
    ap_all, ap_vis, ap_mc = sample_aps(
        query_scores(feats, q).cpu(), rel, proj_point,
        None if t_feats is None else query_scores(t_feats, q).cpu())
    return SampleResult(e.split, e.token, e.query, ap_all, ap_vis, ap_mc, int(batch["points"][0].shape[0]),
                        int(rel.sum()), int(proj_point.numel()), int(rel[proj_point].sum()))
