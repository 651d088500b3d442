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
predicted-occupied voxel do not crash (no voxel pass is needed for retrieval); a sample with no relevant
point in the set has AP 0.0 (sklearn's value since 1.1, hence the original's) and counts in the mean.

Layout: ``benchmark`` (the CSV + annotation files), ``queries`` (query embeddings), ``scoring`` (scores and
APs of one sample), ``run`` (the pass over the shards), ``report`` (tables and result files), ``cli_run``
(``scripts/retrieval.py``'s run).
"""
from __future__ import annotations

# ruff: noqa: F401  (the imports below are the re-exports)
from pop3d.retrieval.benchmark import (
    CSV_FIELDS,
    SPLITS,
    TABLE_SPLITS,
    BenchmarkEntry,
    BenchmarkError,
    annotation_path,
    csv_path,
    load_annotation,
    read_benchmark,
)
from pop3d.retrieval.queries import (
    clip_query_embeddings,
    load_query_embeddings,
    random_query_embeddings,
    save_query_embeddings,
)
from pop3d.retrieval.report import SplitSummary, format_table, summarize, write_results
from pop3d.retrieval.run import (
    RetrievalReport,
    Skipped,
    evaluate_retrieval,
    iterate_benchmark_samples,
)
from pop3d.retrieval.scoring import SampleResult, query_scores, sample_aps, student_point_features
