"""Every command-line error a user can cause ends in ONE line on stderr that names the file or key and says
what to do, with exit status 2 and no traceback (subprocess runs of the real scripts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one non-empty stderr line starting 'error:' that contains every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))
             and " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained tiny student saved as training saves it (with its config.yaml beside it)."""
    from pop3d.config import load_config
    from pop3d.factory import build_student, save_student

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY)
    path = run / "student.safetensors"
    save_student(build_student(cfg), path, cfg, 0)
    return path


@pytest.fixture(scope="module")
def other_config_weights(tmp_path_factory) -> Path:
    """Weights of a tiny student with 64-d features, in a run folder with its own config.yaml."""
    import yaml

    from pop3d.config import config_to_dict, load_config
    from pop3d.factory import build_student, save_student

    run = tmp_path_factory.mktemp("run64")
    cfg = load_config(TINY, ["model.feature_dim=64", "model.hidden_dims_ft=64"])
    save_student(build_student(cfg), run / "student.safetensors", cfg, 0)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run / "student.safetensors"


def shards_set(shards) -> list[str]:
    return ["--set", f"data.shards={shards}", "--set", "data.num_workers=0"]


# ---------------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------------


def test_missing_or_empty_shard_folder_says_to_run_build_shards(weights, tmp_path):
    missing = tmp_path / "no_such_shards"
    proc = run_script("eval", "--config", TINY, *shards_set(missing), "--weights", str(weights),
                      "--random-text-embeddings")
    one_line_error(proc, str(missing), "data.shards", "scripts/build_shards.py")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("visualize", "--config", TINY, *shards_set(empty), "--weights", str(weights),
                      "--random-text-embeddings", "--out", str(tmp_path / "x.png"))
    one_line_error(proc, str(empty), "'val'", "scripts/build_shards.py")
    proc = run_script("train", "--config", TINY, *shards_set(empty), "--set", f"train.output_dir={tmp_path / 'r'}")
    one_line_error(proc, str(empty), "'train'", "scripts/build_shards.py")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------


def test_pth_as_weights_says_to_convert(tmp_path):
    pth = tmp_path / "pop3d_weights.pth"
    pth.write_bytes(b"not read")
    proc = run_script("eval", "--config", TINY, "--weights", str(pth), "--random-text-embeddings")
    one_line_error(proc, str(pth), "--weights", "scripts/convert_weights.py pop3d")
    proc = run_script("retrieval", "--config", TINY, "--weights", str(pth), "--benchmark", str(tmp_path),
                      "--random-queries")
    one_line_error(proc, str(pth), "scripts/convert_weights.py")


def test_weights_of_another_config_say_to_use_the_runs_config(other_config_weights, shard_root, tmp_path):
    proc = run_script("eval", "--config", TINY, *shards_set(shard_root), "--weights", str(other_config_weights),
                      "--random-text-embeddings", "--out", str(tmp_path / "e.json"))
    line = one_line_error(proc, str(other_config_weights), "another model configuration", "feature_dim 64 vs 512",
                          f"--config {other_config_weights.parent / 'config.yaml'}")
    assert len(line) < 400
    assert not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------------------------------------------------
# text embeddings, CLIP weights
# ---------------------------------------------------------------------------------------------------------


def test_missing_text_embeddings_file_says_how_to_make_one(weights, shard_root, tmp_path):
    missing = tmp_path / "nuscenes_text.safetensors"
    proc = run_script("eval", "--config", TINY, *shards_set(shard_root), "--weights", str(weights),
                      "--text-embeddings", str(missing))
    one_line_error(proc, str(missing), "--text-embeddings", "scripts/text_embeddings.py")
    proc = run_script("visualize", "--config", TINY, *shards_set(shard_root), "--weights", str(weights),
                      "--set", f"eval.text_embeddings={missing}", "--out", str(tmp_path / "v.png"))
    one_line_error(proc, str(missing), "eval.text_embeddings", "--random-text-embeddings")


def _benchmark(folder: Path, splits: dict[str, str]) -> Path:
    (folder / "annotations").mkdir(parents=True)
    for split in ("train", "val", "test"):
        tok = splits.get(split)
        line = f"{tok};{split};annotations/{tok}__retrieval.npy;samples/LIDAR_TOP/x.pcd.bin;car\n" if tok else ""
        (folder / f"retrieval_anns_{split}.csv").write_text(line)
        if tok:
            np.save(folder / "annotations" / f"{tok}__retrieval.npy", np.zeros(4, bool))
    return folder


def test_missing_clip_weights_file(weights, tmp_path):
    bench = _benchmark(tmp_path / "bench", {"val": "a" * 32})
    missing = tmp_path / "clip_vit_b16.safetensors"
    proc = run_script("retrieval", "--config", TINY, "--weights", str(weights), "--benchmark", str(bench),
                      "--clip-weights", str(missing))
    one_line_error(proc, str(missing), "--clip-weights", "nothing is downloaded")
    proc = run_script("text_embeddings", "--clip-weights", str(missing), "--out", str(tmp_path / "t.safetensors"))
    one_line_error(proc, str(missing), "--clip-weights")


def test_retrieval_split_without_shards_fails_before_the_work_naming_allow_missing(weights, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": {}, "val": {}}}))
    bench = _benchmark(tmp_path / "bench", {"val": "a" * 32, "test": "b" * 32})
    proc = run_script("retrieval", "--config", TINY, *shards_set(shards), "--weights", str(weights),
                      "--benchmark", str(bench), "--random-queries", "--out", str(tmp_path / "res"))
    one_line_error(proc, str(shards), "['test']", "--allow-missing", "--splits train val")
    assert "weights" not in proc.stdout and not (tmp_path / "res").exists()   # nothing was loaded or run


# ---------------------------------------------------------------------------------------------------------
# training into a folder that holds a run
# ---------------------------------------------------------------------------------------------------------


def test_train_refuses_a_folder_holding_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    proc = run_script("train", "--config", TINY, "--set", f"train.output_dir={out}")
    one_line_error(proc, str(out), "log.jsonl", "--resume", "--overwrite")
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
    proc = run_script("train", "--config", TINY, "--set", f"train.output_dir={out}", "--resume", "--overwrite")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# strict JSON of the eval results
# ---------------------------------------------------------------------------------------------------------


def test_eval_json_has_null_and_a_count_where_a_value_is_undefined():
    import torch

    import pop3d.evaluate_run as mod
    from pop3d.metrics import MeanIoU

    meter = MeanIoU([1, 2, 3], ["a", "b", "c"])
    meter.update(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 2, 2]))   # class 3 never in the GT
    js = mod.meter_json(meter)
    text = json.dumps(js, allow_nan=False)
    assert js["iou"] == {"a": 0.5, "b": pytest.approx(1 / 3), "c": None} and js["undefined"] == 1
    empty = mod.meter_json(MeanIoU([1, 2], ["a", "b"]))
    assert empty["miou_present"] is None and empty["undefined"] == 2
    assert "NaN" not in text + json.dumps(empty, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------
# the synthetic data maker re-runs cleanly
# ---------------------------------------------------------------------------------------------------------


def test_make_synthetic_nuscenes_reuses_what_it_wrote(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_synth_script", ROOT / "scripts" / "make_synthetic_nuscenes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []

    def fake(out, seed=0, overwrite=False, **kw):  # stands in for the (slow) generator, same contract
        root = Path(out)
        if (root / "samples").exists() and not overwrite:
            raise FileExistsError(f"{root} already holds ['samples']")
        (root / "samples").mkdir(parents=True, exist_ok=True)
        (root / "samples" / "a.jpg").write_bytes(bytes([seed]) * 10)
        calls.append(overwrite)
        return root

    monkeypatch.setattr(mod, "make_synthetic_nuscenes", fake)
    out = tmp_path / "nusc"
    assert mod.main(["--out", str(out)]) == 0 and calls == [False]
    assert mod.main(["--out", str(out)]) == 0 and calls == [False]          # reused, not regenerated
    assert "reusing" in capsys.readouterr().out
    assert mod.main(["--out", str(out), "--seed", "3"]) == 2                   # other arguments: refused
    assert "--overwrite" in capsys.readouterr().err
    (out / "samples" / "a.jpg").write_bytes(b"changed")
    assert mod.main(["--out", str(out)]) == 2                                  # a changed file: refused
    assert "a.jpg: missing or changed" in capsys.readouterr().err
    assert mod.main(["--out", str(out), "--overwrite"]) == 0 and calls == [False, True]
    assert (out / "samples" / "a.jpg").read_bytes() == bytes([0]) * 10
    info = json.loads((out / mod.MARKER).read_text())
    assert info["complete"] and info["files"] == {"samples/a.jpg": 10}
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("user data")
    assert mod.main(["--out", str(other)]) == 2 and calls == [False, True]     # never writes into other data
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
