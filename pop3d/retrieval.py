"""Open-vocabulary 3D retrieval benchmark of POP-3D (pipeline.md §5), with the live teacher as the baseline.

On disk (the original's release, ``retrieval_benchmark/``)::

    retrieval_anns_<split>.csv            one sample per line: token;split;ann_path;pts_path;query
    annotations/<token>__retrieval.npy    binary relevance of every keyframe LiDAR point, shape (N,)

Per benchmark sample (a keyframe and one free-text query):

* the query is embedded by the CLIP ViT-B/16 text tower with the 85 templates (per template L2-normalised,
  averaged, re-normalised): one vector ``q`` (C,);
* POP3D: the student predicts a feature at EVERY LiDAR point (grid coordinates clipped to the volume, as in
  training) and scores ``s_i = <f_i, q>`` (raw dot product, features not normalised);
* ``mAP`` = AP of those scores over all N points; ``mAP visible`` = AP over the visible (point, camera)
  multiset: a point seen by k cameras appears k times (the original's ``matching_points``);
* MaskCLIP baseline: the live teacher's feature at each visible projection, scored the same way; only
  ``mAP visible`` exists ('N/A' for all points: the teacher sees no invisible point);
* AP is sklearn's non-interpolated ``average_precision_score`` per sample
  (:func:`pop3d.metrics.average_precision`); a split's number is the mean over its samples x 100 with one
  decimal; ``valtest`` = val ∪ test.

Fixed relative to the original (pipeline.md §6-9): an annotation whose length differs from the sample's
point count is skipped AND counted and reported (the original skipped it with a print); a missing
annotation or CSV is an error naming the file (the original printed and went on); samples with no
predicted-occupied voxel do not crash (no voxel pass is needed for retrieval). A sample with no relevant
point in the set has AP 0.0 (sklearn's value since 1.1, hence the original's) and counts in the mean.
"""
from __future__ import annotations

import json
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pop3d.evaluate import predict_sample
from pop3d.metrics import average_precision
from teacher.weights_io import atomic_path

log = logging.getLogger("pop3d.retrieval")

#: Splits of the benchmark files, and the rows of the result tables.
SPLITS: tuple[str, ...] = ("train", "val", "test")
TABLE_SPLITS: tuple[str, ...] = ("train", "val", "test", "valtest")
CSV_FIELDS: tuple[str, ...] = ("token", "split", "ann_path", "pts_path", "query")


class BenchmarkError(ValueError):
    """A benchmark file is missing or malformed; the message starts with the file's path."""


# ---------------------------------------------------------------------------------------------------------
# benchmark files
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchmarkEntry:
    """One benchmark line and its relevance: (token, split, query) + ``relevant`` bool (N_ann,)."""

    token: str
    split: str
    query: str
    ann_file: Path
    source: str
    """``<csv path>:<line>`` the entry comes from."""
    relevant: np.ndarray = field(repr=False)


def csv_path(benchmark_dir: str | os.PathLike, split: str) -> Path:
    return Path(benchmark_dir) / f"retrieval_anns_{split}.csv"


def annotation_path(benchmark_dir: str | os.PathLike, token: str) -> Path:
    return Path(benchmark_dir) / "annotations" / f"{token}__retrieval.npy"


def load_annotation(path: str | os.PathLike) -> np.ndarray:
    """``<token>__retrieval.npy`` -> bool (N,) relevance. Accepts bool or integer/float 0/1 arrays of shape
    (N,), (N, 1) or (1, N). Raises :class:`BenchmarkError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: annotation file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # any unreadable file is reported with its path
        raise BenchmarkError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise BenchmarkError(f"{path}: expected a 1-D per-point relevance array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise BenchmarkError(f"{path}: relevance must be bool or numeric 0/1, got dtype {arr.dtype}")
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            raise BenchmarkError(f"{path}: relevance must be binary; {int(bad.sum())} values are not 0/1 "
                                 f"(e.g. {arr[bad][:3].tolist()})")
    return arr.astype(bool)


def read_benchmark(benchmark_dir: str | os.PathLike, splits: tuple[str, ...] | list[str] = SPLITS
                   ) -> list[BenchmarkEntry]:
    """Read ``retrieval_anns_<split>.csv`` of ``splits`` and every annotation they name (fails early).

    Only token, split and query of a line are used (as the original); the annotation is
    ``annotations/<token>__retrieval.npy`` under ``benchmark_dir``. The split of an entry is the CSV's
    ``split`` field. Blank lines and a header line ``token;split;...`` are skipped.
    """
    root = Path(benchmark_dir)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: benchmark directory not found")
    entries: list[BenchmarkEntry] = []
    for split in splits:
        if split not in SPLITS:
            raise BenchmarkError(f"unknown benchmark split {split!r}; allowed: {list(SPLITS)}")
        path = csv_path(root, split)
        if not path.is_file():
            raise BenchmarkError(f"{path}: benchmark CSV not found")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = [c.strip() for c in line.split(";")]  # plain split, as the original (no CSV quoting)
            if lineno == 1 and row[0].lower() == "token":
                continue
            if len(row) != len(CSV_FIELDS):
                raise BenchmarkError(f"{path}:{lineno}: expected {len(CSV_FIELDS)} ';'-separated fields "
                                     f"{'/'.join(CSV_FIELDS)}, got {len(row)}: {';'.join(row)!r}")
            token, row_split, _ann, _pts, query = row
            if row_split not in SPLITS:
                raise BenchmarkError(f"{path}:{lineno}: split field {row_split!r} is not one of {list(SPLITS)}")
            if not token or not query:
                raise BenchmarkError(f"{path}:{lineno}: empty token or query")
            ann = annotation_path(root, token)
            entries.append(BenchmarkEntry(token, row_split, query, ann, f"{path}:{lineno}", load_annotation(ann)))
    return entries


# ---------------------------------------------------------------------------------------------------------
# query embeddings
# ---------------------------------------------------------------------------------------------------------


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
    from teacher.weights_io import save_safetensors

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: query embeddings are written as .safetensors")
    names = list(embeddings)
    save_safetensors({"embeddings": torch.stack([embeddings[q].float().cpu() for q in names])}, path,
                     {"format": "pop3d-retrieval-queries", "queries": json.dumps(names),
                      "templates": "85 (teacher/text.py)", "source": source})


def load_query_embeddings(path: str | os.PathLike, queries: list[str]) -> dict[str, torch.Tensor]:
    """Read a file of :func:`save_query_embeddings`; every query in ``queries`` must be in it."""
    from teacher.weights_io import load_safetensors

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
    log.warning("!" * 100)
    log.warning("RANDOM QUERY EMBEDDINGS: the retrieval numbers are MEANINGLESS (tests / quick start only); "
                "pass --clip-weights or --query-embeddings for real numbers.")
    log.warning("!" * 100)
    out = {}
    for q in sorted(set(queries)):
        g = torch.Generator().manual_seed(zlib.crc32(q.encode("utf-8")))
        out[q] = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    return out


# ---------------------------------------------------------------------------------------------------------
# per-sample scores and APs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """APs of one benchmark entry (fractions in [0, 1]; 0.0 when no relevant point is in the set)."""

    split: str
    token: str
    query: str
    ap_all: float
    """POP3D, every LiDAR point."""
    ap_visible: float
    """POP3D, the visible (point, camera) multiset."""
    ap_visible_maskclip: float | None
    """The teacher at the visible projections; None when the baseline was not run."""
    num_points: int
    num_relevant: int
    num_visible: int
    """Visible (point, camera) pairs M."""
    num_visible_relevant: int

    def line(self) -> str:
        """``split;token;query;mAP;mAP_visible;N/A;mAP_visible_maskclip`` as the original's results file."""
        mc = "N/A" if self.ap_visible_maskclip is None else repr(self.ap_visible_maskclip)
        return f"{self.split};{self.token};{self.query};{self.ap_all!r};{self.ap_visible!r};N/A;{mc}"


def query_scores(features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Raw dot products: features (P, C), query (C,) -> (P,) float32 (no normalisation, as the original)."""
    return features.float() @ query.to(features.device, torch.float32)


def sample_aps(point_scores: torch.Tensor, relevant: torch.Tensor, proj_point: torch.Tensor,
               teacher_scores: torch.Tensor | None = None) -> tuple[float, float, float | None]:
    """APs of one sample.

    point_scores: (N,) student score of every LiDAR point; relevant: (N,) bool; proj_point: (M,) int64 point
    index of each visible (point, camera) projection (a point seen by k cameras appears k times);
    teacher_scores: (M,) teacher score of each projection, or None.
    Returns (AP over the N points, AP over the M projections, teacher AP over the M projections or None).
    """
    point_scores, relevant, proj_point = point_scores.cpu(), relevant.cpu().bool(), proj_point.cpu().long()
    if point_scores.shape != relevant.shape:
        raise ValueError(f"{tuple(point_scores.shape)} scores for {tuple(relevant.shape)} relevance values")
    vis_rel = relevant[proj_point]
    ap_all = average_precision(point_scores, relevant)
    ap_vis = average_precision(point_scores[proj_point], vis_rel)
    ap_mc = None
    if teacher_scores is not None:
        if teacher_scores.shape != proj_point.shape:
            raise ValueError(f"{tuple(teacher_scores.shape)} teacher scores for {tuple(proj_point.shape)} projections")
        ap_mc = average_precision(teacher_scores.cpu(), vis_rel)
    return ap_all, ap_vis, ap_mc


@torch.no_grad()
def student_point_features(model, batch: dict[str, Any], student_image_hw=None) -> torch.Tensor:
    """Student feature at every LiDAR point of a batch of size 1 (on the batch's device): (N, C).

    Called as the original retrieval/eval did: ``features`` = float grid coordinates of all points
    (out-of-range points clipped to the border voxels), no voxel pass.
    """
    out = predict_sample(model, batch, batch["images"].device, student_image_hw, voxel_features=False)
    return out.logits_pts_fts[0]


# ---------------------------------------------------------------------------------------------------------
# the run over the shards
# ---------------------------------------------------------------------------------------------------------


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
                             shuffle=False, eval_gt=False, tokens=set(remaining))
        for batch in loader:
            token = batch["tokens"][0]
            remaining.discard(token)
            yield split, batch
            if not remaining:
                break


@torch.no_grad()
def evaluate_retrieval(model, teacher, entries: list[BenchmarkEntry], queries: dict[str, torch.Tensor],
                       shards: str, grid, *, device: torch.device, student_image_hw=None,
                       num_workers: int = 0, progress: bool = True, allow_missing: bool = False
                       ) -> RetrievalReport:
    """Run the benchmark: every entry's sample is read from the shards (any split) by token.

    model: the student (eval mode is set here); teacher: a LiveTeacher or None (no MaskCLIP baseline);
    queries: {query: (C,)}; grid: the student's GridSpec. An entry whose annotation length differs from the
    sample's point count is skipped and reported. A token found in no shard is an error unless
    ``allow_missing`` (then it is reported). Results come back in benchmark order.
    """
    from tqdm.auto import tqdm

    from pop3d.training import batch_to_device

    dim = next(iter(queries.values())).shape[0] if queries else None
    by_token: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.query not in queries:
            raise BenchmarkError(f"{e.source}: query {e.query!r} has no embedding")
        by_token.setdefault(e.token, []).append(i)
    model.eval()
    results: dict[int, SampleResult] = {}
    mismatched: dict[int, Skipped] = {}
    bar = tqdm(total=len(entries), desc="retrieval", disable=not progress, dynamic_ncols=True)
    for shard_split, batch in iterate_benchmark_samples(shards, set(by_token), grid, num_workers):
        token = batch["tokens"][0]
        n_points = int(batch["points"][0].shape[0])
        todo = []
        for i in by_token[token]:
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
        if not todo:
            continue
        batch = batch_to_device(batch, device)
        feats = student_point_features(model, batch, student_image_hw)
        if dim is not None and feats.shape[1] != dim:
            raise ValueError(f"the student predicts {feats.shape[1]}-d features, the queries are {dim}-d")
        t_feats = None
        if teacher is not None:
            t_feats = teacher(batch["images"], batch["proj_batch"], batch["proj_cam"], batch["proj_rowcol"])
            if dim is not None and t_feats.shape[1] != dim:
                raise ValueError(f"the teacher gives {t_feats.shape[1]}-d features, the queries are {dim}-d")
        proj_point = batch["proj_point"].cpu()
        for i in todo:
            e = entries[i]
            q = queries[e.query]
            rel = torch.from_numpy(e.relevant)
            ap_all, ap_vis, ap_mc = sample_aps(
                query_scores(feats, q).cpu(), rel, proj_point,
                None if t_feats is None else query_scores(t_feats, q).cpu())
            results[i] = SampleResult(e.split, token, e.query, ap_all, ap_vis, ap_mc, n_points, int(rel.sum()),
                                      int(proj_point.numel()), int(rel[proj_point].sum()))
            bar.update(1)
    bar.close()
    missing = [Skipped(entries[i].token, entries[i].split, entries[i].query, "sample not found in any shard")
               for i in range(len(entries)) if i not in results and i not in mismatched]
    if missing and not allow_missing:
        toks = sorted({m.token for m in missing})
        raise BenchmarkError(f"{shards}: {len(toks)} benchmark samples are in no shard split "
                             f"{_shard_splits(shards)}: {toks[:8]} (build the shards of every split, or pass "
                             f"--allow-missing to report them)")
    return RetrievalReport([results[i] for i in sorted(results)], [mismatched[i] for i in sorted(mismatched)],
                           missing, len(entries), teacher is not None)


# ---------------------------------------------------------------------------------------------------------
# tables and files
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SplitSummary:
    """Means x 100 over a split's samples (None: no sample with a defined AP)."""

    split: str
    samples: int
    pop3d_map: float | None
    pop3d_map_visible: float | None
    maskclip_map_visible: float | None
    undefined: dict[str, int]
    """Samples excluded from each mean because their AP is undefined (no relevant point in the set)."""


def _in_split(sample_split: str, table_split: str) -> bool:
    """The original's membership rule: ``valtest`` holds val and test samples."""
    return sample_split == table_split or (table_split == "valtest" and sample_split in ("val", "test"))


def _mean100(values: list[float | None]) -> tuple[float | None, int]:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return (100.0 * float(np.mean(ok)) if ok else None), len(values) - len(ok)


def summarize(results: list[SampleResult], table_splits: tuple[str, ...] | list[str] = TABLE_SPLITS
              ) -> list[SplitSummary]:
    """One :class:`SplitSummary` per table split (``valtest`` = val ∪ test)."""
    out = []
    for split in table_splits:
        rs = [r for r in results if _in_split(r.split, split)]
        a, na = _mean100([r.ap_all for r in rs])
        v, nv = _mean100([r.ap_visible for r in rs])
        have_mc = any(r.ap_visible_maskclip is not None for r in rs)
        m, nm = _mean100([r.ap_visible_maskclip for r in rs]) if have_mc else (None, 0)
        out.append(SplitSummary(split, len(rs), a, v, m, {"mAP": na, "mAP visible": nv, "MaskCLIP mAP visible": nm}))
    return out


def _fmt(v: float | None) -> str:
    return "N/A" if v is None else f"{v:.1f}"


def format_table(s: SplitSummary) -> str:
    """The original's PrettyTable layout: title '<split> (<n> samples)', columns method | mAP | mAP visible."""
    header = ["method", "mAP", "mAP visible"]
    rows = [["POP3D", _fmt(s.pop3d_map), _fmt(s.pop3d_map_visible)],
            ["MaskCLIP", "N/A", _fmt(s.maskclip_map_visible)]]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    title = f"{s.split} ({s.samples} samples)"
    inner = len(sep) - 2
    if len(title) + 2 > inner:  # widen the last column so the title fits
        widths[-1] += len(title) + 2 - inner
        sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        inner = len(sep) - 2

    def row(cells: list[str]) -> str:
        return "|" + "|".join(" " + c.center(w) + " " for c, w in zip(cells, widths)) + "|"

    lines = ["+" + "-" * inner + "+", "|" + title.center(inner) + "|", sep, row(header), sep,
             *[row(r) for r in rows], sep]
    notes = [f"{k}: {n} sample(s) without a relevant point excluded" for k, n in s.undefined.items() if n]
    return "\n".join(lines + notes)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_results(out_dir: str | os.PathLike, report: RetrievalReport, summaries: list[SplitSummary],
                  stamp: str, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write (atomically) ``results_<stamp>.txt`` (one line per sample, the original's format),
    ``results_tables_<stamp>.txt`` (the tables) and ``results_<stamp>.json`` (everything). Returns the paths."""
    out = Path(out_dir)
    paths = {"samples": out / f"results_{stamp}.txt", "tables": out / f"results_tables_{stamp}.txt",
             "json": out / f"results_{stamp}.json"}
    _atomic_write_text(paths["samples"], "".join(r.line() + "\n" for r in report.results))
    tables = "\n\n".join(format_table(s) for s in summaries)
    notes = report.summary_lines()
    _atomic_write_text(paths["tables"], tables + "\n\n" + "\n".join(notes) + "\n")

    def clean(v: Any) -> Any:  # JSON has no NaN
        return None if isinstance(v, float) and math.isnan(v) else v

    payload = {
        **(extra or {}),
        "tables": {s.split: {"samples": s.samples, "pop3d_mAP": s.pop3d_map,
                             "pop3d_mAP_visible": s.pop3d_map_visible,
                             "maskclip_mAP_visible": s.maskclip_map_visible, "undefined_ap": s.undefined}
                   for s in summaries},
        "entries": report.entries,
        "evaluated": len(report.results),
        "skipped_length_mismatch": [asdict(s) for s in report.skipped_length_mismatch],
        "missing_from_shards": [asdict(s) for s in report.missing_from_shards],
        "samples": [{k: clean(v) for k, v in asdict(r).items()} for r in report.results],
    }
    _atomic_write_text(paths["json"], json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return paths
