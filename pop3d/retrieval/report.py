"""Tables (means x 100 per split) and the result files of a retrieval run."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p3d_common.atomic import atomic_write_text
from pop3d.retrieval.benchmark import TABLE_SPLITS
from pop3d.retrieval.run import RetrievalReport
from pop3d.retrieval.scoring import SampleResult


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


def write_results(out_dir: str | os.PathLike, report: RetrievalReport, summaries: list[SplitSummary],
                  stamp: str, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write (atomically) ``results_<stamp>.txt`` (one line per sample, the original's format),
    ``results_tables_<stamp>.txt`` (the tables) and ``results_<stamp>.json`` (everything). Returns the paths."""
    out = Path(out_dir)
    paths = {"samples": out / f"results_{stamp}.txt", "tables": out / f"results_tables_{stamp}.txt",
             "json": out / f"results_{stamp}.json"}
    atomic_write_text(paths["samples"], "".join(r.line() + "\n" for r in report.results))
    tables = "\n\n".join(format_table(s) for s in summaries)
    notes = report.summary_lines()
    atomic_write_text(paths["tables"], tables + "\n\n" + "\n".join(notes) + "\n")

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
    atomic_write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
    return paths
