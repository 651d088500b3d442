"""The free-text query viewer: the HTML page in a real headless Chromium (no script errors, a drawn 3D canvas
whose colours follow the selected query), the PNG, and scripts/query.py end to end on the synthetic data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pop3d.query import QueryResult
from pop3d.query_viewer import cube_mesh, query_html, render_query_png, write_query_html

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1400, 900)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must have it: apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return exe


def run_chromium(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
           "--use-angle=swiftshader", "--enable-logging=stderr", "--v=0", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def fake_result(n_side: int = 12) -> QueryResult:
    """A block of voxels; query 0 grows along x, query 1 along y: two clearly different colourings."""
    ii, jj, kk = np.meshgrid(np.arange(n_side), np.arange(n_side), np.arange(3), indexing="ij")
    idx = np.stack([ii, jj, kk], -1).reshape(-1, 3)
    vs = np.array([1.0, 1.0, 1.0], np.float32)
    centres = ((idx + 0.5) * vs - [n_side / 2, n_side / 2, 2.0]).astype(np.float32)
    sim = np.stack([idx[:, 0] / n_side, idx[:, 1] / n_side]).astype(np.float32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 3, 90, 160), dtype=np.uint8)
    return QueryResult(centres, vs, sim, ["a parked car", "a tree </script>"], "tok", images)


def test_cube_mesh_puts_eight_corners_around_each_centre():
    verts, faces = cube_mesh(np.array([[0, 0, 0], [10, 0, 0]], np.float32), np.array([1, 2, 4], np.float32))
    assert verts.shape == (16, 3) and faces.shape == (24, 3)
    np.testing.assert_allclose(verts[:8].min(0), [-0.5, -1, -2])
    np.testing.assert_allclose(verts[8:].max(0), [10.5, 1, 2])
    assert faces[:12].max() == 7 and faces[12:].min() == 8
    # every cube face (6 per cube) appears as two triangles whose corners share one coordinate value
    for tri in faces[:12]:
        p = verts[tri]
        assert any(np.ptp(p[:, d]) == 0 for d in range(3))


def test_page_is_self_contained():
    page = query_html(fake_result(4), title="t", notes=["RANDOM"])
    import re

    import plotly

    bundle = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text(encoding="utf-8")
    assert bundle[:2000] in page  # plotly.js inlined, not fetched
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)  # nothing remote
    assert "Plotly.newPlot" in page and page.count("data:image/jpeg;base64,") == 6
    assert "a tree <\\/script>" in page  # a query text cannot close the data script


def _plot_area(png: Path) -> np.ndarray:
    from PIL import Image

    im = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    assert im.shape[:2] == (WINDOW[1], WINDOW[0])
    return im[200:700, 60:760]  # inside the 3D plot box (left of the camera column, below the header)


@pytest.mark.slow
def test_viewer_in_headless_chromium(tmp_path):
    page = write_query_html(fake_result(), tmp_path / "query.html", title="test", notes=["RANDOM"])
    dom = run_chromium(page.as_uri() + "#q=1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-plot-ready="1"' in html, "the plot was never drawn"
    import re

    assert not re.search(r"<html[^>]*data-js-errors", html), html[-3000:]
    assert '<ul id="js-errors"></ul>' in html, html[-3000:]  # nothing was reported on the page
    assert 'data-webgl="1"' in html, "no WebGL context on the plot canvas"
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not [ln for ln in console if "Uncaught" in ln or "Error" in ln], console

    # the check sees errors: the same page with a failing script reports it
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("</body>", "<script>noSuchFunction();</script></body>"))
    bad_dom = run_chromium(bad.as_uri(), "--dump-dom").stdout
    assert re.search(r'<html[^>]*data-js-errors="1"', bad_dom) and "noSuchFunction" in bad_dom

    shots = {}
    for q in (0, 1):
        out = tmp_path / f"shot{q}.png"
        r = run_chromium(page.as_uri() + f"#q={q}", f"--screenshot={out}")
        assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
        shots[q] = _plot_area(out)
    for q, area in shots.items():
        colourful = (area.max(-1) - area.min(-1)) > 60  # viridis voxels; background, axes, text are grey
        assert area.std() > 10 and colourful.sum() > 5000, (q, area.std(), colourful.sum())
    # the two queries colour the same voxels differently
    assert np.abs(shots[0] - shots[1]).max(-1).mean() > 5


def test_png(tmp_path):
    out = render_query_png(fake_result(6), tmp_path / "q.png", title="t")
    from PIL import Image

    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[0] > 400 and im.std() > 10


@pytest.mark.slow
def test_query_cli_end_to_end_and_errors(shard_root, tmp_path):
    import torch

    from pop3d.config import load_config
    from pop3d.training import build_student, save_student

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}"])
    torch.manual_seed(0)
    weights = tmp_path / "student.safetensors"
    save_student(build_student(cfg), weights, cfg, 0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(ROOT / "scripts" / "query.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"data.shards={shard_root}", "--set", "data.num_workers=0", "--weights", str(weights)]
    out = tmp_path / "q.html"
    r = subprocess.run(base + ["--random-text-embeddings", "--text", "a parked car", "--text", "a tree",
                               "--index", "0", "--all-voxels", "--out", str(out)],
                       check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    page = out.read_text()
    assert "RANDOM text embeddings" in page and "a parked car" in page
    assert f"all {25 * 25 * 4} voxels" in page  # tiny grid, every voxel with --all-voxels
    assert out.with_suffix(".png").stat().st_size > 10000
    r = subprocess.run(base + ["--text", "x", "--out", str(tmp_path / "e.html"), "--random-text-embeddings",
                               "--index", "999"], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "no sample" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    from pop3d.query import QueryError, run_query

    cfg_path = str(ROOT / "configs" / "tiny.yaml")
    for kwargs, needle in (({"clip_weights": str(tmp_path / "none.safetensors"), "index": 0}, "not found"),
                           ({"index": 0}, "--clip-weights"),
                           ({"random_text": True, "index": 0, "token": "t"}, "exactly one of --index"),
                           ({"random_text": True, "index": 0, "out": tmp_path / "x.png"}, "must end with .html")):
        kwargs = {"out": tmp_path / "e.html", **kwargs}
        with pytest.raises(QueryError, match=needle):
            run_query(cfg_path, str(weights), ["x"], overrides=[f"data.shards={shard_root}"], **kwargs)
