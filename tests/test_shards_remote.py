"""Shards from a URL: a local http.server on 127.0.0.1, fsspec's memory filesystem, and pipe: commands."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _damage import damage

from shards.errors import ShardReadError
from shards.loader import make_loader, read_sample

REPO = Path(__file__).resolve().parents[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture()
def served(shard_root: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(http://127.0.0.1:PORT/shards, local copy it serves) from a thread of this process."""
    root = tmp_path / "www"
    shutil.copytree(shard_root, root / "shards")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/shards", root / "shards"
    finally:
        server.shutdown()
        server.server_close()


def batches(source: str, split: str = "val", workers: int = 0) -> list[dict]:
    return list(make_loader(source, split, num_workers=workers, eval_gt=True))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b] and a
    for x, y in zip(a, b):
        for k in ("images", "lidar2img", "occupancy", "eval_gt", "proj_rowcol"):
            assert torch.equal(x[k], y[k]), k
        assert all(torch.equal(p, q) for p, q in zip(x["points"], y["points"]))


def test_http_source_gives_the_local_batches(served, shard_root: str) -> None:
    url, _ = served
    local = batches(shard_root)
    assert_same_batches(batches(url), local)
    assert_same_batches(batches(url + "/", workers=1), local)  # trailing slash, DataLoader worker
    assert read_sample(url, "val", index=1)["tokens"] == local[1]["tokens"]


def test_http_damage_and_missing_shard_are_named_by_url(served) -> None:
    url, local = served
    key, member = damage(local / "val-000000.tar", "flipped_byte")
    with pytest.raises(ShardReadError) as info:
        batches(url)
    assert str(info.value).startswith(f"{url}/val-000000.tar: sample {key}: member {member}: checksum mismatch")
    (local / "val-000000.tar").unlink()
    with pytest.raises(ShardReadError, match=f"{url}/val-000000.tar: cannot open: HTTP 404"):
        batches(url)
    with pytest.raises(ShardReadError, match=f"{url}/nowhere/manifest.json: cannot open: HTTP 404"):
        batches(url + "/nowhere")


def test_http_5xx_is_retried_then_named(served, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from shards import remote

    url, _ = served
    monkeypatch.setattr(remote, "HTTP_RETRY_WAITS_S", (0.01, 0.01))
    calls: list[str] = []
    real = remote.urllib.request.urlopen

    def flaky(u, timeout):  # the first attempt at every file fails with 503
        calls.append(u)
        if calls.count(u) == 1:
            raise remote.urllib.error.HTTPError(u, 503, "Service Unavailable", {}, None)
        return real(u, timeout=timeout)

    monkeypatch.setattr(remote.urllib.request, "urlopen", flaky)
    with caplog.at_level("WARNING"):
        assert len(batches(url)) == 2
    assert "HTTP 503; retry 1 of 2" in caplog.text

    def down(u, timeout):
        raise remote.urllib.error.HTTPError(u, 502, "Bad Gateway", {}, None)

    monkeypatch.setattr(remote.urllib.request, "urlopen", down)
    with pytest.raises(ShardReadError, match=f"{url}/manifest.json: cannot open: HTTP 502"):
        batches(url)


def test_verify_shards_over_http(served, capsys) -> None:
    url, local = served
    spec = importlib.util.spec_from_file_location("verify_shards", REPO / "scripts" / "verify_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([url, "--no-progress"]) == 0
    key, member = damage(local / "train-000001.tar", "truncated_npy")
    assert mod.main([url, "--no-progress", "--splits", "train"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {url}/train-000001.tar: sample {key}: member {member}: checksum mismatch" in out


def test_fsspec_memory_and_pipe_sources(shard_root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in sorted(os.listdir(shard_root)):
        if os.path.isfile(os.path.join(shard_root, name)):
            with open(os.path.join(shard_root, name), "rb") as src, fs.open(f"/pop3d-test/{name}", "wb") as dst:
                dst.write(src.read())
    local = batches(shard_root)
    assert_same_batches(batches("memory://pop3d-test"), local)
    assert_same_batches(batches(f"pipe:cat {shard_root}/{{name}}"), local)
    with pytest.raises(ShardReadError, match="must contain {name}"):
        batches(f"pipe:cat {shard_root}/manifest.json")
    with pytest.raises(ShardReadError, match="command exited with status"):
        batches("pipe:cat /nonexistent-pop3d/{name}")


@pytest.mark.slow
def test_training_steps_from_http(served, tmp_path: Path) -> None:
    url, _ = served
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
           "--set", f"data.shards={url}", "--set", "train.max_steps=2", "--set", f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "student.safetensors").is_file()
