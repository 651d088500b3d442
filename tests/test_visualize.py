"""pop3d/visualize.py and scripts/visualize.py: BEV orientation and colours, PCA colours of teacher features,
and one PNG of a synthetic sample from a tiny random-weight student."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pop3d.visualize import (
    CLASS_COLORS,
    UNOBSERVED_COLOR,
    bev_image,
    downsample_labels,
    render_sample,
    teacher_pca_colors,
)

ROOT = Path(__file__).resolve().parents[1]


def test_bev_image_colours_and_orientation():
    # X=3, Y=2, Z=3; z index 0 is the bottom.
    v = np.full((3, 2, 3), 17, dtype=np.uint8)
    v[0, 0] = (4, 17, 16)      # car below vegetation: the top one (vegetation) is seen
    v[1, 0] = (11, 255, 17)    # driveable surface under unobserved/free
    v[2, 0] = (17, 7, 255)     # pedestrian under an unobserved voxel: still the highest drawn one
    v[0, 1] = (17, 17, 17)     # free column
    v[1, 1] = (17, 255, 255)   # partly observed, nothing occupied: free
    v[2, 1] = (255, 255, 255)  # never observed
    img = bev_image(v)
    assert img.shape == (2, 3, 3) and img.dtype == np.uint8
    # pixel [r, c] = column (x=c, y=Y-1-r): x to the right, y up
    assert (img[1, 0] == CLASS_COLORS[16]).all()
    assert (img[1, 1] == CLASS_COLORS[11]).all()
    assert (img[1, 2] == CLASS_COLORS[7]).all()
    assert (img[0, 0] == CLASS_COLORS[17]).all()
    assert (img[0, 1] == CLASS_COLORS[17]).all()
    assert (img[0, 2] == UNOBSERVED_COLOR).all()
    # torch input, custom empty colour
    img_t = bev_image(torch.from_numpy(v).long(), empty_color=(1, 2, 3))
    assert (img_t[0, 0] == (1, 2, 3)).all() and (img_t[1, 0] == CLASS_COLORS[16]).all()
    with pytest.raises(ValueError):
        bev_image(np.full((2, 2, 2), 40))


def test_bev_image_of_an_asymmetric_shape():
    v = np.full((5, 4, 2), 17)
    v[4, 3, 0] = 4  # largest x, largest y: top-right pixel
    v[0, 0, 1] = 1  # smallest x, smallest y: bottom-left pixel
    img = bev_image(v)
    assert img.shape == (4, 5, 3)
    assert (img[0, 4] == CLASS_COLORS[4]).all() and (img[3, 0] == CLASS_COLORS[1]).all()
    drawn = (img != CLASS_COLORS[17]).any(-1)
    assert drawn.sum() == 2


def test_teacher_pca_colors_deterministic_in_range_and_separating():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    feats = torch.cat([a + 0.1 * torch.randn(200, 64, generator=g), b + 0.1 * torch.randn(300, 64, generator=g)])
    c1, c2 = teacher_pca_colors(feats), teacher_pca_colors(feats.clone().numpy())
    assert c1.shape == (500, 3) and c1.dtype == np.uint8
    assert np.array_equal(c1, c2)
    ca, cb = c1[:200].astype(float), c1[200:].astype(float)
    between = np.linalg.norm(ca.mean(0) - cb.mean(0))
    within = max(ca.std(0).max(), cb.std(0).max())
    assert between > 150 and within < 0.25 * between, (between, within)
    # the same features in another order get the same colours (sign and scale do not depend on order)
    perm = torch.randperm(500, generator=g)
    assert np.abs(teacher_pca_colors(feats[perm]).astype(int) - c1[perm.numpy()].astype(int)).max() <= 1
    assert teacher_pca_colors(np.zeros((0, 8))).shape == (0, 3)
    assert (teacher_pca_colors(np.ones((4, 8))) == 128).all()  # no variation: mid grey


def test_downsample_labels_majority_per_block():
    v = np.full((4, 4, 1), 17)
    v[0, 0, 0] = v[1, 0, 0] = 4
    v[0, 1, 0] = 7
    v[3, 3, 0] = 255
    d = downsample_labels(v, 2)
    assert d.shape == (2, 2, 1)
    assert d[0, 0, 0] == 4 and d[1, 1, 0] == 17 and d[0, 1, 0] == 17


def test_render_sample_without_gt_with_teacher_dots():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 3, 90, 160), dtype=np.uint8)
    pred = np.full((10, 10, 4), 17)
    pred[2:5, 3:6, 0] = 11
    pred[6, 6, 1:3] = 4
    cam = np.repeat(np.arange(6), 5)
    rowcol = np.stack([rng.integers(1, 89, 30), rng.integers(1, 159, 30)], 1)
    fig = render_sample(images, pred, None, (cam, rowcol, teacher_pca_colors(rng.normal(size=(30, 16)))))
    assert len(fig.axes) >= 6 + 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["front left", "front", "front right"]
    assert titles[3:6] == ["back left", "back", "back right"]


def _load_script():
    spec = importlib.util.spec_from_file_location("visualize_script", ROOT / "scripts" / "visualize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_writes_a_png_of_a_synthetic_sample(shard_root, tmp_path, capsys):
    from pop3d.config import load_config
    from pop3d.factory import build_student, save_student

    overrides = [f"data.shards={shard_root}", "data.num_workers=0"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(0)
    weights = tmp_path / "student.safetensors"
    save_student(build_student(cfg), weights, cfg, step=0)
    out = tmp_path / "pics" / "sample.png"
    script = _load_script()

    def argv(index: int, path: Path) -> list[str]:
        return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", overrides[0], "--set", overrides[1],
                "--weights", str(weights), "--split", "val", "--index", str(index), "--random-text-embeddings",
                "--teacher", "--out", str(path)]

    assert script.main(argv(1, out)) == 0
    printed = capsys.readouterr().out
    assert "RANDOM TEXT EMBEDDINGS" in printed and f"wrote {out.resolve()}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["sample.png"]  # no temporary file left
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert 1000 <= im.width <= 4000 and 600 <= im.height <= 3000
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 20  # not blank
    assert len(np.unique(px.reshape(-1, 3)[::7], axis=0)) > 200

    # unknown index: a clear error, nothing written
    bad = tmp_path / "bad.png"
    assert script.main(argv(999, bad)) == 2
    assert "no sample with index 999" in capsys.readouterr().err
    assert not bad.exists()
