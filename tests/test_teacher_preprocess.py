"""Preprocessing: mmcv sizes, resize vs cv2 INTER_LINEAR, the fixture's network image, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _paths import FIXTURES

from teacher.preprocess import (
    bgr_hwc_to_rgb_chw,
    normalize,
    preprocess,
    rescale_size,
    resize_uint8,
    resize_uint8_cv2,
)

cv2 = pytest.importorskip("cv2")
FIXTURE = FIXTURES / "teacher_tiny"


def test_rescale_size_mmcv():
    assert rescale_size((900, 1600)) == (1024, 1820)
    assert rescale_size((900, 1600), (1024, 512)) == (512, 910)
    assert rescale_size((900, 1600), (512, 256)) == (256, 455)
    assert rescale_size((900, 1600), (1600, 900)) == (900, 1600)


@pytest.mark.parametrize("src,dst", [((90, 160), (102, 182)), ((900, 1600), (256, 455)), ((37, 53), (64, 91))])
def test_resize_vs_cv2(src, dst):
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    ref = torch.from_numpy(cv2.resize(im, dst[::-1], interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)[None].float()
    t = torch.from_numpy(im).permute(2, 0, 1)[None]
    flt = resize_uint8(t, dst)
    emu = resize_uint8_cv2(t, dst)
    assert (flt - ref).abs().max() <= 1 and (emu - ref).abs().max() <= 1
    assert (emu != ref).float().mean() < 0.01


@pytest.mark.skipif(not (FIXTURE / "inputs.pt").is_file(), reason="fixture not present")
def test_resize_vs_fixture_network_image():
    inputs = torch.load(FIXTURE / "inputs.pt", weights_only=True)
    image = bgr_hwc_to_rgb_chw(inputs["image_bgr"])
    ref = bgr_hwc_to_rgb_chw(inputs["resized_bgr"]).float()
    size = rescale_size(tuple(image.shape[-2:]))
    assert size == tuple(ref.shape[-2:])
    emu, flt = resize_uint8_cv2(image, size), resize_uint8(image, size)
    assert (emu - ref).abs().max() <= 1 and (flt - ref).abs().max() <= 1
    assert (emu != ref).float().mean() < 1e-3
    x = preprocess(image)
    assert torch.allclose(x, normalize(emu))


def test_normalize_rgb_imagenet():
    x = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert normalize(x).abs().max() < 1e-6
