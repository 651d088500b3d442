"""Retrieval benchmark (pipeline.md §5): benchmark files, APs vs sklearn, the visible multiset, valtest, skipped
annotations, the shard token filter, and the scripts on a synthetic benchmark in the original format."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pop3d.config import load_config
from pop3d.retrieval import (
    BenchmarkError,
    SampleResult,
    evaluate_retrieval,
    format_table,
    load_query_embeddings,
    random_query_embeddings,
    read_benchmark,
    sample_aps,
    save_query_embeddings,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(shard_root: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}", "data.num_workers=0"])


@pytest.fixture(scope="module")
def bench(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrieval_benchmark")
    info = _script("make_synthetic_retrieval").make_benchmark(synthetic_root, out)
    assert info["samples"] == {"train": 4, "val": 2, "test": 2}, info
    return out


@pytest.fixture(scope="module")
def tiny(shard_root):
    from pop3d.factory import build_student
    from teacher.live import build_teacher_from_config

    cfg = _cfg(shard_root)
    torch.manual_seed(0)
    return cfg, build_student(cfg).eval(), build_teacher_from_config(cfg.teacher)


@pytest.fixture(scope="module")
def run(bench, tiny, shard_root):
    """evaluate_retrieval on all 8 synthetic entries, recording what sample_aps received."""
    import pop3d.retrieval.run as R  # evaluate_retrieval looks sample_aps up in its own module
    from pop3d.factory import grid_spec_of

    cfg, model, teacher = tiny
    entries = read_benchmark(bench)
    queries = random_query_embeddings([e.query for e in entries], cfg.model.feature_dim)
    calls = []
    orig = R.sample_aps

    def spy(*args):
        out = orig(*args)
        calls.append((args, out))
        return out

    R.sample_aps = spy
    try:
        report = evaluate_retrieval(model, teacher, entries, queries, shard_root, grid_spec_of(cfg),
                                    device=torch.device("cpu"), student_image_hw=cfg.data.student_image_hw,
                                    progress=False)
    finally:
        R.sample_aps = orig
    return entries, queries, report, calls


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------


def test_sample_aps_equal_sklearn_with_ties_and_duplicated_projections():
    g = torch.Generator().manual_seed(3)
    n = 500
    scores = torch.randint(0, 40, (n,), generator=g).float()  # many ties
    rel = torch.rand(n, generator=g) < 0.2
    proj = torch.cat([torch.randperm(n, generator=g)[:300], torch.randperm(n, generator=g)[:120]])
    t_scores = torch.randn(proj.numel(), generator=g)
    ap_all, ap_vis, ap_mc = sample_aps(scores, rel, proj, t_scores)
    assert ap_all == pytest.approx(average_precision_score(rel.numpy(), scores.numpy()), abs=1e-12)
    assert ap_vis == pytest.approx(average_precision_score(rel[proj].numpy(), scores[proj].numpy()), abs=1e-12)
    assert ap_mc == pytest.approx(average_precision_score(rel[proj].numpy(), t_scores.numpy()), abs=1e-12)
    # the multiset differs from the set of visible points: duplicates count
    uniq = torch.unique(proj)
    assert ap_vis != pytest.approx(average_precision_score(rel[uniq].numpy(), scores[uniq].numpy()), abs=1e-9)
    assert sample_aps(scores, rel, proj)[2] is None


def test_end_to_end_aps_equal_sklearn_on_the_same_scores(run, tiny, shard_root):
    from pop3d.factory import grid_spec_of
    from pop3d.retrieval import query_scores, student_point_features
    from shards.loader import make_loader

    entries, queries, report, calls = run
    assert len(report.results) == len(entries) == len(calls) == 8
    assert not report.skipped_length_mismatch and not report.missing_from_shards
    assert [(r.token, r.split, r.query) for r in report.results] == [(e.token, e.split, e.query) for e in entries]
    assert len({r.num_points for r in report.results}) == 8  # calls and results pair up by point count
    for ((scores, rel, proj, t_scores), _), r in zip(sorted(calls, key=lambda c: c[0][0].shape[0]),
                                                     sorted(report.results, key=lambda r: r.num_points)):
        assert scores.shape == rel.shape == (r.num_points,) and 0 < r.num_relevant < r.num_points
        assert r.ap_all == pytest.approx(average_precision_score(rel.numpy(), scores.numpy()), abs=1e-12)
        assert r.ap_visible == pytest.approx(
            average_precision_score(rel[proj].numpy(), scores[proj].numpy()), abs=1e-12)
        assert r.ap_visible_maskclip == pytest.approx(
            average_precision_score(rel[proj].numpy(), t_scores.numpy()), abs=1e-12)
    # the scores are the raw dot products of the student's point features with the query (one sample)
    cfg, model, _ = tiny
    e = entries[0]
    batch = next(iter(make_loader(shard_root, e.split, grid=grid_spec_of(cfg), eval_gt=False, tokens={e.token})))
    feats = student_point_features(model, batch, cfg.data.student_image_hw)
    expect = feats @ queries[e.query]
    got = next(c[0][0] for c in calls if c[0][0].shape[0] == batch["points"][0].shape[0])
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(query_scores(feats, queries[e.query]), expect)


def test_visible_multiset_has_one_entry_per_point_camera_projection(run, shard_root, tiny):
    from pop3d.factory import grid_spec_of
    from shards.geometry import project_all_cameras
    from shards.loader import make_loader

    entries, _, report, calls = run
    cfg = tiny[0]
    e = entries[-1]
    batch = next(iter(make_loader(shard_root, e.split, grid=grid_spec_of(cfg), eval_gt=False, tokens={e.token})))
    n = batch["points"][0].shape[0]
    (_, rel, proj, t_scores), _ = next(c for c in calls if c[0][0].shape[0] == n)
    # independent count: project every point into every camera (the original's rule, shards.geometry)
    import tarfile

    from shards.loader import list_shards
    from shards.schema import decode_arrays

    urls, _ = list_shards(shard_root, e.split)
    fields = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.startswith(e.token + "."):
                    fields[m.name.split(".", 1)[1]] = tf.extractfile(m).read()
    d = decode_arrays(fields)
    h, w = (int(x) for x in d["meta"]["img_hw"])
    cam, pidx, _ = project_all_cameras(d["points"], d["lidar2cam"], d["cam_intrinsic"], (h, w))
    assert proj.numel() == t_scores.numel() == len(pidx)  # one entry per (point, camera) pair
    assert torch.equal(torch.bincount(proj, minlength=n), torch.from_numpy(np.bincount(pidx, minlength=n)))
    assert (torch.bincount(proj) > 1).any()  # points seen by two cameras are counted twice
    r = next(r for r in report.results if r.num_points == n)
    assert r.num_visible == len(pidx) and r.num_visible_relevant == int(rel[proj].sum())
    assert set(cam.tolist()) <= set(range(6))


def test_valtest_is_val_union_test(run):
    _, _, report, _ = run
    summ = {s.split: s for s in summarize(report.results)}
    assert [s for s in summ] == ["train", "val", "test", "valtest"]
    assert summ["valtest"].samples == summ["val"].samples + summ["test"].samples == 4
    vt = [r for r in report.results if r.split in ("val", "test")]
    assert summ["valtest"].pop3d_map == pytest.approx(100 * np.mean([r.ap_all for r in vt]))
    assert summ["valtest"].pop3d_map_visible == pytest.approx(100 * np.mean([r.ap_visible for r in vt]))
    assert summ["valtest"].maskclip_map_visible == pytest.approx(100 * np.mean([r.ap_visible_maskclip for r in vt]))
    table = format_table(summ["valtest"])
    assert "valtest (4 samples)" in table and f"{summ['valtest'].pop3d_map:.1f}" in table
    assert "| MaskCLIP |" in table and "N/A" in table


def test_summary_excludes_undefined_aps_and_counts_them():
    rs = [SampleResult("val", "a", "q", 0.5, 0.25, None, 10, 1, 12, 1),
          SampleResult("test", "b", "q", float("nan"), float("nan"), None, 10, 0, 12, 0)]
    s = {x.split: x for x in summarize(rs)}
    assert s["valtest"].samples == 2 and s["valtest"].pop3d_map == pytest.approx(50.0)
    assert s["valtest"].undefined["mAP"] == 1 and s["valtest"].maskclip_map_visible is None
    assert s["train"].samples == 0 and s["train"].pop3d_map is None
    assert rs[0].line() == "val;a;q;0.5;0.25;N/A;N/A"


# ---------------------------------------------------------------------------------------------------------
# benchmark files
# ---------------------------------------------------------------------------------------------------------


def test_mismatched_annotation_is_skipped_counted_and_reported(bench, tiny, shard_root, tmp_path):
    from pop3d.factory import grid_spec_of

    b = tmp_path / "bench"
    shutil.copytree(bench, b)
    entries = read_benchmark(b, ["val"])
    bad = b / "annotations" / f"{entries[0].token}__retrieval.npy"
    np.save(bad, np.load(bad)[:-3])
    entries = read_benchmark(b, ["val"])
    cfg, model, _ = tiny
    queries = random_query_embeddings([e.query for e in entries], cfg.model.feature_dim)
    report = evaluate_retrieval(model, None, entries, queries,
                                shard_root, grid_spec_of(cfg), device=torch.device("cpu"),
                                student_image_hw=cfg.data.student_image_hw, progress=False)
    assert len(report.results) == 1 and len(report.skipped_length_mismatch) == 1
    sk = report.skipped_length_mismatch[0]
    assert sk.token == entries[0].token and sk.file == str(bad)
    assert report.results[0].ap_visible_maskclip is None
    text = "\n".join(report.summary_lines())
    assert "SKIPPED 1" in text and str(bad) in text and "evaluated 1 of 2" in text


def test_sample_in_no_shard_is_an_error_unless_allowed(tiny, shard_root, tmp_path):
    from pop3d.factory import grid_spec_of

    b = tmp_path / "bench"
    (b / "annotations").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (b / f"retrieval_anns_{split}.csv").write_text("")
    (b / "retrieval_anns_val.csv").write_text("f" * 32 + ";val;x;y;fire hydrant\n")
    np.save(b / "annotations" / f"{'f' * 32}__retrieval.npy", np.zeros(4, bool))
    entries = read_benchmark(b)
    cfg, model, _ = tiny
    kw = {"device": torch.device("cpu"), "progress": False}
    q = random_query_embeddings(["fire hydrant"], cfg.model.feature_dim)
    with pytest.raises(BenchmarkError, match="1 benchmark samples are in no shard"):
        evaluate_retrieval(model, None, entries, q, shard_root, grid_spec_of(cfg), **kw)
    report = evaluate_retrieval(model, None, entries, q, shard_root, grid_spec_of(cfg), allow_missing=True, **kw)
    assert not report.results and [m.token for m in report.missing_from_shards] == ["f" * 32]
    assert "in no shard" in "\n".join(report.summary_lines())


def test_missing_or_malformed_files_give_errors_naming_the_file(bench, tmp_path):
    b = tmp_path / "bench"
    shutil.copytree(bench, b)
    (b / "retrieval_anns_test.csv").unlink()
    with pytest.raises(BenchmarkError, match=str(b / "retrieval_anns_test.csv")):
        read_benchmark(b)
    token = read_benchmark(b, ["val"])[0].token
    ann = b / "annotations" / f"{token}__retrieval.npy"
    np.save(ann, np.full(5, 2, np.int64))
    with pytest.raises(BenchmarkError, match=f"{ann}: relevance must be binary"):
        read_benchmark(b, ["val"])
    ann.unlink()
    with pytest.raises(BenchmarkError, match=f"{ann}: annotation file not found"):
        read_benchmark(b, ["val"])
    (b / "retrieval_anns_train.csv").write_text("abc;train;x;y\n")
    with pytest.raises(BenchmarkError, match=f"{b / 'retrieval_anns_train.csv'}:1: expected 5"):
        read_benchmark(b, ["train"])
    with pytest.raises(BenchmarkError, match="benchmark directory not found"):
        read_benchmark(tmp_path / "nowhere")


def test_query_embeddings_roundtrip_and_missing_query(tmp_path):
    emb = random_query_embeddings(["car", "bus"], 8)
    assert set(emb) == {"car", "bus"} and torch.allclose(emb["car"].norm(), torch.tensor(1.0))
    assert torch.equal(emb["car"], random_query_embeddings(["car"], 8)["car"])  # seeded by the text
    path = tmp_path / "q.safetensors"
    save_query_embeddings(path, emb, "random")
    back = load_query_embeddings(path, ["bus"])
    assert list(back) == ["bus"] and torch.equal(back["bus"], emb["bus"])
    with pytest.raises(BenchmarkError, match=f"{path}: 1 benchmark queries have no embedding"):
        load_query_embeddings(path, ["car", "tram"])


def test_clip_query_embeddings_use_the_85_templates(monkeypatch):
    import teacher.text as T
    from pop3d.retrieval import clip_query_embeddings

    torch.manual_seed(0)
    small = T.build_text_model(None, model_cfg={
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
    monkeypatch.setattr(T, "build_text_model", lambda weights: small)
    emb = clip_query_embeddings(["fire hydrant", "car", "car"], "unused.safetensors")
    assert list(emb) == ["car", "fire hydrant"]
    sentences = [t.format("car") for t in T.PROMPT_TEMPLATES]
    assert len(sentences) == 85
    with torch.no_grad():
        e = small.encode_text(__import__("open_clip").get_tokenizer("ViT-B-16")(sentences)).float()
    e = torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(emb["car"], e, rtol=1e-4, atol=1e-5)


def test_loader_token_filter_drops_samples_before_decode(shard_root, monkeypatch):
    import shards.loader as L

    calls = []
    orig = L.process_sample
    monkeypatch.setattr(L, "process_sample", lambda fields, *a: calls.append(fields["__key__"]) or orig(fields, *a))
    all_tokens = [b["tokens"][0] for b in L.make_loader(shard_root, "train", eval_gt=False)]
    assert len(all_tokens) == 4 and len(calls) == 4
    calls.clear()
    got = [b["tokens"][0] for b in L.make_loader(shard_root, "train", eval_gt=False, tokens={all_tokens[2], "x"})]
    assert got == [all_tokens[2]] and calls == [all_tokens[2]]
    assert list(L.make_loader(shard_root, "train", eval_gt=False, tokens=set())) == []


# ---------------------------------------------------------------------------------------------------------
# scripts
# ---------------------------------------------------------------------------------------------------------


def test_script_runs_on_the_synthetic_benchmark_and_prints_the_table(bench, tiny, shard_root, tmp_path, capsys):
    from pop3d.factory import save_student

    cfg, model, _ = tiny
    weights = tmp_path / "student.safetensors"
    save_student(model, weights, cfg, 0)
    out = tmp_path / "results"
    rc = _script("retrieval").main([
        "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.shards={shard_root}",
        "--set", "data.num_workers=0", "--weights", str(weights), "--benchmark", str(bench), "--random-queries",
        "--splits", "val", "test", "--out", str(out), "--no-progress", "--device", "cpu",
        "--save-query-embeddings", str(tmp_path / "q.safetensors")])
    text = capsys.readouterr().out
    assert rc == 0, text
    for title in ("val (2 samples)", "test (2 samples)", "valtest (4 samples)"):
        assert title in text
    assert "train (" not in text and "|  POP3D   |" in text and "| MaskCLIP | N/A |" in text
    assert "evaluated 4 of 4 benchmark entries" in text
    lines = next(out.glob("results_2*.txt")).read_text().splitlines()
    assert len(lines) == 4 and all(len(line.split(";")) == 7 and line.split(";")[5] == "N/A" for line in lines)
    assert "valtest (4 samples)" in next(out.glob("results_tables_*.txt")).read_text()
    js = json.loads(next(out.glob("results_*.json")).read_text())
    assert js["tables"]["valtest"]["samples"] == 4 and js["random_queries"] is True and js["evaluated"] == 4
    saved = load_query_embeddings(tmp_path / "q.safetensors", [s["query"] for s in js["samples"]])
    assert all(v.shape == (cfg.model.feature_dim,) for v in saved.values())


def test_make_synthetic_retrieval_writes_the_original_format(bench, synthetic_root):
    for split in ("train", "val", "test"):
        for line in (bench / f"retrieval_anns_{split}.csv").read_text().splitlines():
            token, sp, ann, pts, query = line.split(";")
            assert sp == split and ann == f"annotations/{token}__retrieval.npy"
            rel = np.load(bench / ann)
            n = (Path(synthetic_root) / pts).stat().st_size // 20
            assert rel.dtype == bool and rel.shape == (n,) and rel.sum() >= 10 and query


@pytest.mark.slow
def test_retrieval_on_two_processes_gives_the_one_process_results(bench, tiny, shard_root, tmp_path):
    """`accelerate launch --num_processes 2 scripts/retrieval.py`: each rank scores half of the samples, the
    entries are gathered, and rank 0 writes every entry's APs and the tables of a one-process run."""
    import os
    import subprocess
    import sys

    from pop3d.factory import save_student

    cfg, model, _ = tiny
    weights = tmp_path / "student.safetensors"
    save_student(model, weights, cfg, 0)
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"data.shards={shard_root}",
            "--set", "data.num_workers=0", "--weights", str(weights), "--benchmark", str(bench), "--random-queries",
            "--no-progress", "--device", "cpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29551"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    results = {}
    for name, prefix in (("one", [sys.executable]), ("two", launch)):
        cmd = [*prefix, str(ROOT / "scripts" / "retrieval.py"), *args, "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        files = list((tmp_path / name).glob("results_2*.json"))
        assert len(files) == 1, files  # rank 0 alone writes
        results[name] = json.loads(files[0].read_text())
    one, two = results["one"], results["two"]
    assert one["evaluated"] == two["evaluated"] == 8 and one["entries"] == two["entries"] == 8
    assert one["samples"] == two["samples"] and one["tables"] == two["tables"]
    assert all(s["ap_visible_maskclip"] is not None for s in two["samples"])
