"""DeepLab teacher: key layouts (R50/R101, from the spec table), strict loading, outputs, BN folding."""
from __future__ import annotations

import pytest
import torch

from teacher.checkpoint import convert_maskclip_plus, load_maskclip_plus
from teacher.deeplab import DeepLabArch, MaskClipPlusDeepLab, expected_keys, infer_arch, load_strict

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def spec_keys(depth: int) -> set[str]:
    """Written from teacher.md §4.1's table, independently of teacher.deeplab."""
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    keys = set()
    for conv, bn in (("0", "1"), ("3", "4"), ("6", "7")):
        keys.add(f"backbone.stem.{conv}.weight")
        keys |= {f"backbone.stem.{bn}.{s}" for s in BN}
    for li, nb in enumerate(blocks):
        for b in range(nb):
            for j in "123":
                keys.add(f"backbone.layer{li + 1}.{b}.conv{j}.weight")
                keys |= {f"backbone.layer{li + 1}.{b}.bn{j}.{s}" for s in BN}
        keys.add(f"backbone.layer{li + 1}.0.downsample.0.weight")
        keys |= {f"backbone.layer{li + 1}.0.downsample.1.{s}" for s in BN}
    for i in range(4):
        keys.add(f"decode_head.decode_module.aspp_modules.{i}.conv.weight")
        keys |= {f"decode_head.decode_module.aspp_modules.{i}.bn.{s}" for s in BN}
    return keys


@pytest.mark.parametrize("depth,n_backbone", [(50, 330), (101, 636)])
def test_key_layout_real_sizes(depth, n_backbone):
    want = spec_keys(depth)
    assert sum(k.startswith("backbone.") for k in want) == n_backbone
    assert len(want) == n_backbone + 24
    assert expected_keys(depth) == want
    with torch.device("meta"):
        model = MaskClipPlusDeepLab(DeepLabArch(depth=depth))
    sd = model.state_dict()
    assert set(sd) == want
    # real shapes of a few keys (teacher.md §4.1)
    assert tuple(sd["backbone.stem.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["backbone.stem.6.weight"].shape) == (64, 32, 3, 3)
    assert tuple(sd["backbone.layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(sd["decode_head.decode_module.aspp_modules.3.conv.weight"].shape) == (512, 2048, 3, 3)
    n_params = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert abs(n_params / 1e6 - {50: 61.3, 101: 80.3}[depth]) < 0.2


def _random_sd(arch: DeepLabArch, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = MaskClipPlusDeepLab(arch).state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        else:
            out[k] = torch.randn(v.shape, generator=g) * (0.3 if v.dim() > 1 else 0.1)
    return out


@pytest.mark.parametrize("depth", [50, 101])
def test_strict_load_from_pth_small_widths(tmp_path, depth):
    arch = DeepLabArch(depth=depth, base_channels=2, stem_channels=4, aspp_channels=3)
    sd = _random_sd(arch)
    assert set(sd) == spec_keys(depth)
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "c.pth")
    summary = convert_maskclip_plus(tmp_path / "c.pth", tmp_path / "c.safetensors", quiet=True)
    assert summary["arch"] == arch
    model = load_maskclip_plus(tmp_path / "c.safetensors")
    assert model.arch == arch and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 40, 72)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 5, 9)
    assert float(y.min()) >= 0


def test_strict_load_rejects_wrong_depth():
    sd = _random_sd(DeepLabArch(depth=50, base_channels=2, stem_channels=4, aspp_channels=3))
    model = MaskClipPlusDeepLab(DeepLabArch(depth=101, base_channels=2, stem_channels=4, aspp_channels=3))
    with pytest.raises(ValueError, match=r"306 missing: backbone\.layer3\.10\."):
        load_strict(model, sd, "x.safetensors")


def test_infer_arch_and_output_size():
    arch = DeepLabArch(depth=50, base_channels=4, stem_channels=6, aspp_channels=5)
    assert infer_arch(_random_sd(arch)) == arch
    model = MaskClipPlusDeepLab(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 114)).shape == (1, 5, 8, 15)   # 1024x1820 -> 128x228 at /16 scale


def test_fold_batchnorm_exact():
    arch = DeepLabArch(depth=50, base_channels=4, stem_channels=8, aspp_channels=6)
    model = MaskClipPlusDeepLab(arch)
    model.load_state_dict(_random_sd(arch, 3))
    model.eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ref = model(x)
        got = model.fold_batchnorm()(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1)
