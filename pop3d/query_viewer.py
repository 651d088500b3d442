"""Drawing a :class:`pop3d.query.QueryResult`: a self-contained HTML viewer (plotly, inlined) and a PNG.

HTML page: the voxels as cubes (a plotly ``Mesh3d``, eight vertices and twelve triangles per voxel) coloured by
their similarity with the selected query (orbit, zoom, pan with the mouse), a selector for the query, and the
six camera images beside it (JPEG, base64 in the page). plotly.js is inlined, so the file opens without
network. Script errors on the page are listed at its bottom (and counted in ``data-js-errors`` on ``<html>``);
``data-plot-ready="1"`` on ``<body>`` once the plot is drawn (tests read both from the DOM). ``page.html#q=N``
opens with query N selected.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Camera order of the images (shards.geometry.CAMERAS) and their display layout (front row, back row).
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LAYOUT = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
COLORSCALE = "Viridis"

_CUBE_VERTS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)], np.float32)
_CUBE_FACES = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                        [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], np.int32)


def cube_mesh(centres: np.ndarray, voxel_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (8P, 3) float32 and triangles (12P, 3) int32 of P axis-aligned voxels."""
    c = np.asarray(centres, np.float32)
    verts = (c[:, None, :] + _CUBE_VERTS[None] * np.asarray(voxel_size, np.float32)).reshape(-1, 3)
    faces = (_CUBE_FACES[None] + 8 * np.arange(len(c), dtype=np.int32)[:, None, None]).reshape(-1, 3)
    return verts, faces


def _jpeg_b64(img_chw: np.ndarray, width: int = 480, quality: int = 82) -> str:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(np.asarray(img_chw).transpose(1, 2, 0)))
    im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(result, q: int):
    import plotly.graph_objects as go

    sim = result.similarity
    verts, faces = cube_mesh(result.centres, result.voxel_size)
    vals = np.repeat(sim[q], 8) if sim.shape[1] else np.zeros(0, np.float32)
    lo = result.centres.min(0) - result.voxel_size if len(result.centres) else np.zeros(3)
    hi = result.centres.max(0) + result.voxel_size if len(result.centres) else np.ones(3)
    span = np.maximum(hi - lo, 1e-3)
    mesh = go.Mesh3d(x=verts[:, 0], y=verts[:, 1], z=verts[:, 2], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
                     intensity=vals, colorscale=COLORSCALE, flatshading=True, name="voxels",
                     cmin=float(sim[q].min()) if sim.shape[1] else 0.0,
                     cmax=float(sim[q].max()) if sim.shape[1] else 1.0,
                     colorbar={"title": {"text": "cosine similarity"}},
                     lighting={"ambient": 0.75, "diffuse": 0.5, "specular": 0.05},
                     hovertemplate="x %{x:.1f} m, y %{y:.1f} m, z %{z:.1f} m<br>similarity %{intensity:.3f}"
                                   "<extra></extra>")
    fig = go.Figure(mesh)
    fig.update_layout(
        margin={"l": 0, "r": 0, "t": 0, "b": 0}, paper_bgcolor="white",
        scene={"aspectmode": "manual",
               "aspectratio": {"x": 1.0, "y": float(span[1] / span[0]),
                               "z": float(max(3.0 * span[2] / span[0], 0.06))},
               "xaxis": {"title": {"text": "x (m)"}}, "yaxis": {"title": {"text": "y (m), forward"}},
               "zaxis": {"title": {"text": "z (m)"}},
               "camera": {"eye": {"x": 0.7, "y": -2.3, "z": 1.6}}}, autosize=True)
    return fig


_HEAD_SCRIPT = """
window.__pop3dErrors = [];
function __pop3dReport(msg) {
  window.__pop3dErrors.push(String(msg));
  document.documentElement.setAttribute('data-js-errors', String(window.__pop3dErrors.length));
  var ul = document.getElementById('js-errors');
  if (ul) { var li = document.createElement('li'); li.textContent = String(msg); ul.appendChild(li); }
}
window.addEventListener('error', function (e) {
  __pop3dReport((e.message || 'error') + ' (' + (e.filename || '') + ':' + (e.lineno || '') + ')');
});
window.addEventListener('unhandledrejection', function (e) { __pop3dReport('unhandled rejection: ' + e.reason); });
"""

_POST_SCRIPT = r"""
var gd = document.getElementById('{plot_id}');
var data = JSON.parse(document.getElementById('query-data').textContent);
function decode(b64) {
  var s = atob(b64), bytes = new Uint8Array(s.length);
  for (var i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}
var sims = data.similarity.map(decode);
function show(q) {
  var s = sims[q], v = new Float32Array(s.length * 8);
  for (var i = 0; i < s.length; i++) for (var k = 0; k < 8; k++) v[8 * i + k] = s[i];
  Plotly.restyle(gd, {intensity: [v], cmin: [data.min[q]], cmax: [data.max[q]]}, [0]);
  document.getElementById('stats').textContent = data.count + ' voxels; similarity ' +
      data.min[q].toFixed(3) + ' .. ' + data.max[q].toFixed(3) + ' (mean ' + data.mean[q].toFixed(3) + ')';
}
var sel = document.getElementById('query');
sel.addEventListener('change', function (e) { show(parseInt(e.target.value, 10)); });
var m = /^#q=(\d+)$/.exec(location.hash), q0 = m ? parseInt(m[1], 10) : 0;  // link to a query: page.html#q=1
if (!(q0 < sims.length)) q0 = 0;
sel.value = String(q0);
show(q0);
var canvas = gd.querySelector('canvas');
document.body.setAttribute('data-webgl', canvas && canvas.getContext('webgl') ? '1' : '0');
document.body.setAttribute('data-plot-ready', '1');
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 8px 14px; background: #f3f3f3; border-bottom: 1px solid #ddd; }
header h1 { font-size: 16px; margin: 0 0 4px 0; } .note { color: #b00; font-weight: bold; }
#controls { padding: 6px 14px; } #controls select { font-size: 14px; } #stats { margin-left: 14px; color: #555; }
#main { display: flex; gap: 10px; padding: 0 10px 10px 10px; }
#plotbox { flex: none; width: 58vw; height: 78vh; min-width: 300px; border: 1px solid #ddd; overflow: hidden; }
#plotbox > div, #plot { height: 100%; width: 100%; }
#cams { flex: 1 1 0; min-width: 0; display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; align-content: start; }
#cams figure { margin: 0; } #cams img { width: 100%; display: block; }
#cams figcaption { font-size: 11px; text-align: center; color: #555; }
#js-errors { color: #b00; font-family: monospace; }
"""


def query_html(result, *, title: str = "", notes: Sequence[str] = ()) -> str:
    """The viewer page as one HTML string (plotly.js inlined, about 5 MB + the voxels)."""
    fig = _figure(result, 0)
    sim = result.similarity
    payload = {
        "texts": result.texts, "count": int(sim.shape[1]),
        "similarity": [base64.b64encode(np.ascontiguousarray(s, np.float32).tobytes()).decode("ascii") for s in sim],
        "min": [float(s.min()) if s.size else 0.0 for s in sim],
        "max": [float(s.max()) if s.size else 1.0 for s in sim],
        "mean": [float(s.mean()) if s.size else 0.0 for s in sim],
    }
    plot = fig.to_html(include_plotlyjs=True, full_html=False, div_id="plot", post_script=_POST_SCRIPT,
                       config={"displaylogo": False, "responsive": True})
    options = "".join(f'<option value="{i}">{html.escape(t)}</option>' for i, t in enumerate(result.texts))
    cams = "".join(
        f'<figure><img alt="{c}" src="data:image/jpeg;base64,{_jpeg_b64(result.images[CAMERAS.index(c)])}">'
        f'<figcaption>{c.removeprefix("CAM_").replace("_", " ").lower()}</figcaption></figure>' for c in LAYOUT)
    what = (f"{sim.shape[1]} voxels predicted occupied" if result.occupied_only
            else f"all {sim.shape[1]} voxels (occupied or not)")
    note_html = "".join(f'<div class="note">{html.escape(n)}</div>' for n in notes)
    empty = "" if sim.shape[1] else '<div class="note">no voxel is predicted occupied in this sample</div>'
    data_json = json.dumps(payload).replace("</", "<\\/")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>POP-3D query viewer</title>'
            f"<script>{_HEAD_SCRIPT}</script><style>{_CSS}</style></head><body>"
            f"<header><h1>POP-3D free-text query: {html.escape(title)}</h1>"
            f"<div>{what}, coloured by the cosine similarity of their predicted CLIP feature with "
            f"the query. Drag to orbit, scroll to zoom. Frame: LiDAR (y forwards), z exaggerated 3x.</div>"
            f"{note_html}{empty}</header>"
            f'<div id="controls"><label>query <select id="query">{options}</select></label><span id="stats">'
            f'</span></div><script type="application/json" id="query-data">{data_json}</script>'
            f'<div id="main"><div id="plotbox">{plot}</div><div id="cams">{cams}</div></div><ul id="js-errors"></ul></body></html>\n')


def write_query_html(result, path: str | Path, *, title: str = "", notes: Sequence[str] = ()) -> Path:
    """Write the viewer page atomically; returns the path."""
    from p3d_common.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(query_html(result, title=title, notes=notes), encoding="utf-8")
    return path


def render_query_png(result, path: str | Path, *, title: str = "", dpi: int = 100, max_points: int = 20000) -> Path:
    """The same as a PNG: the six cameras, then one 3D view per query (voxel centres coloured by similarity)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from p3d_common.atomic import atomic_path

    q = len(result.texts)
    cols = min(q, 3)
    rows = -(-q // cols)
    fig = Figure(figsize=(6.0 * max(cols, 2), 4.2 + 4.6 * rows), dpi=dpi, layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[4.2, 4.6 * rows])
    cam_grid = outer[0].subgridspec(2, 3, wspace=0.01, hspace=0.02)
    for n, c in enumerate(LAYOUT):
        ax = fig.add_subplot(cam_grid[n // 3, n % 3])
        ax.imshow(np.asarray(result.images[CAMERAS.index(c)]).transpose(1, 2, 0)[::2, ::2])
        ax.set_axis_off()
        ax.set_title(c.removeprefix("CAM_").replace("_", " ").lower(), fontsize=9, pad=2)
    qgrid = outer[1].subgridspec(rows, cols)
    c = result.centres
    step = max(1, -(-len(c) // max_points))
    for i, text in enumerate(result.texts):
        ax = fig.add_subplot(qgrid[i // cols, i % cols], projection="3d")
        s = result.similarity[i]
        if len(c):
            sc = ax.scatter(c[::step, 0], c[::step, 1], c[::step, 2], c=s[::step], cmap="viridis", marker="s",
                            s=6, linewidths=0, depthshade=False)
            fig.colorbar(sc, ax=ax, shrink=0.6, label="cosine similarity")
            span = np.maximum(c.max(0) - c.min(0), 1e-3)
            ax.set_box_aspect((span[0], span[1], max(3 * span[2], 0.06 * span[0])))
        else:
            ax.text2D(0.5, 0.5, "no voxel predicted occupied", transform=ax.transAxes, ha="center")
        ax.view_init(elev=35, azim=-100)
        ax.set_title(f'"{text}"', fontsize=11)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
