"""LiveTeacher: frozen-ness, projections -> targets, chunking, config validation, random-weight warning."""
from __future__ import annotations

import logging

import pytest
import torch

from teacher.config import TeacherConfig
from teacher.live import LiveTeacher, build_teacher, build_teacher_from_config
from teacher.preprocess import rescale_size
from teacher.sampling import official_double_resize

TINY = {"depth": 50, "base_channels": 2, "stem_channels": 4, "aspp_channels": 5}
FIT = (256, 128)           # 160x90 images -> 228x128 network input (same ratio as 1600x900 -> 1820x1024)


@pytest.fixture(scope="module")
def teacher() -> LiveTeacher:
    torch.manual_seed(0)
    return build_teacher("maskclip_plus", None, resize_fit=FIT, random_arch=TINY, chunk=4)


def _images(b: int = 2, h: int = 90, w: int = 160) -> torch.Tensor:
    return torch.randint(0, 256, (b, 6, 3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_frozen(teacher):
    assert not teacher.training
    teacher.train()
    assert not teacher.training and not teacher.net.training
    assert all(not p.requires_grad for p in teacher.parameters())
    imgs = _images(1)
    out = teacher(imgs, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 5]), torch.tensor([[1, 1], [5, 7], [88, 158]]))
    assert out.dtype == torch.float32 and out.shape == (3, 5) and not out.requires_grad
    # the targets can be used in a student loss
    student = torch.zeros(3, 5, requires_grad=True)
    torch.nn.functional.mse_loss(student, out).backward()
    assert student.grad is not None


def test_targets_equal_official_chain(teacher):
    imgs = _images(2)
    g = torch.Generator().manual_seed(3)
    m = 400
    pb = torch.randint(0, 2, (m,), generator=g)
    pc = torch.randint(0, 6, (m,), generator=g)
    rc = torch.stack([torch.randint(0, 90, (m,), generator=g), torch.randint(0, 160, (m,), generator=g)], 1)
    # the same point seen by two cameras gets two (different) targets
    pb[:2] = 1
    pc[:2] = torch.tensor([2, 3])
    rc[:2] = torch.tensor([40, 80])
    out = teacher(imgs, pb, pc, rc)
    feats, net_hw = teacher.features(imgs.reshape(12, 3, 90, 160))
    assert net_hw == rescale_size((90, 160), FIT) == (128, 228)
    full = official_double_resize(feats, net_hw, (90, 160))            # (12, C, 90, 160)
    ref = full[pb * 6 + pc, :, rc[:, 0], rc[:, 1]]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1)
    assert not torch.equal(out[0], out[1])
    assert float(out.min()) >= 0


def test_only_used_images_run_and_chunking_is_invisible(teacher):
    imgs = _images(2)
    pb, pc = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 5])
    rc = torch.tensor([[10, 20], [30, 40], [50, 60]])
    calls = []
    handle = teacher.net.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        a = teacher(imgs, pb, pc, rc)
    finally:
        handle.remove()
    assert sum(calls) == 3                      # 3 images own projections, the other 9 are never run
    other = LiveTeacher(teacher.net, TeacherConfig(resize_fit=FIT, chunk=1))
    assert torch.allclose(a, other(imgs, pb, pc, rc), atol=1e-6)


def test_no_projection_no_target(teacher):
    out = teacher(_images(1), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, 5)


def test_rejects_projection_outside_image(teacher):
    with pytest.raises(ValueError, match="outside"):
        teacher(_images(1), torch.tensor([0]), torch.tensor([0]), torch.tensor([[90, 3]]))
    with pytest.raises(ValueError, match="uint8"):
        teacher(_images(1).float(), torch.tensor([0]), torch.tensor([0]), torch.tensor([[0, 0]]))


def test_grid_sample_option_close(teacher):
    imgs = _images(1)
    pb, pc = torch.zeros(50, dtype=torch.long), torch.arange(50) % 6
    rc = torch.stack([torch.arange(50) + 20, torch.arange(50) * 3], 1)
    approx = LiveTeacher(teacher.net, TeacherConfig(resize_fit=FIT, sampler="grid_sample"))(imgs, pb, pc, rc)
    exact = teacher(imgs, pb, pc, rc)
    assert float((approx - exact).norm() / exact.norm()) < 0.05


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        TeacherConfig(kind="dino")
    with pytest.raises(ValueError, match="sampler"):
        TeacherConfig(sampler="nearest")
    with pytest.raises(ValueError, match="safetensors"):
        TeacherConfig(weights=str(tmp_path / "x.pth"))
    missing = TeacherConfig(weights=str(tmp_path / "x.safetensors"))  # values only: no file access here
    with pytest.raises(ValueError, match="teacher.weights: .*x.safetensors: no such file"):
        build_teacher_from_config(missing)


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        build_teacher("maskclip_plus", None, resize_fit=FIT, random_arch=TINY)
    assert "RANDOM WEIGHTS" in caplog.text


def test_vit_teacher_selectable():
    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "patch_size": 16, "head_width": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    t = build_teacher("maskclip_vit", None, resize_fit=(64, 32), random_arch=cfg)
    out = t(_images(1, 45, 80), torch.tensor([0, 0]), torch.tensor([0, 3]), torch.tensor([[0, 0], [44, 79]]))
    assert out.shape == (2, 8)


def test_sync_free_path_gives_the_same_targets(teacher):
    """The training step's sync-free forward (every image run, device-side range check) equals the default,
    with every image used, with unused images, with several chunks and with the grid_sample sampler."""
    imgs = _images(2)
    g = torch.Generator().manual_seed(5)
    m = 40
    pb, pc = torch.randint(0, 2, (m,), generator=g), torch.randint(0, 6, (m,), generator=g)
    rc = torch.stack([torch.randint(0, 90, (m,), generator=g), torch.randint(0, 160, (m,), generator=g)], 1)
    cases = [(pb, pc, rc), (torch.tensor([0, 1, 1]), torch.tensor([4, 0, 5]), rc[:3])]
    for chunk, sampler in ((4, "exact"), (12, "exact"), (5, "grid_sample")):
        t = LiveTeacher(teacher.net, TeacherConfig(resize_fit=FIT, chunk=chunk, sampler=sampler))
        for b_, c_, r_ in cases:
            # equal up to the network's batch-composition rounding (chunks of different images: ~1 ulp)
            torch.testing.assert_close(t(imgs, b_, c_, r_, sync_free=True), t(imgs, b_, c_, r_), rtol=1e-6,
                                       atol=1e-6)
    with pytest.raises(RuntimeError, match="outside"):
        teacher(_images(1), torch.tensor([0]), torch.tensor([0]), torch.tensor([[90, 3]]), sync_free=True)
