"""MaskCLIP+ student as POP-3D's feature extraction ran it: dilated ResNetV1c + ASPPv2 (summed branches).

Only the network that produced the distilled features is built (teacher.md §1.1-1.2): no ViT, no text
classifier. Parameter names mirror mmseg so a converted checkpoint loads by exact key names:

- ``backbone.stem.{0,1,3,4,6,7}``: deep stem, three 3x3 convs (widths stem/2, stem/2, stem; the first at
  stride 2), each followed by BN and ReLU, then a 3x3 stride-2 max-pool;
- ``backbone.layer{1..4}.{b}.{conv,bn}{1,2,3}`` and ``backbone.layer{i}.0.downsample.{0,1}``: bottlenecks
  (expansion 4), style "pytorch" (stride on conv2), stage strides (1,2,1,1), dilations (1,1,2,4) with
  contract_dilation (first block of a dilated stage at half the dilation);
- ``decode_head.decode_module.aspp_modules.{i}.{conv,bn}``: four 3x3 convs (no bias) with dilation = padding
  = 6/12/18/24, each + BN + ReLU; the four branch outputs are summed.

Output: raw, unnormalised, non-negative features at stride 8, e.g. (N, 512, 128, 228) for a
(N, 3, 1024, 1820) input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from p3d_common.safetensors_io import describe_mismatch

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
LAYER3_BLOCKS_TO_DEPTH = {blocks[2]: depth for depth, blocks in STAGE_BLOCKS.items()}
STAGE_STRIDES = (1, 2, 1, 1)
STAGE_DILATIONS = (1, 1, 2, 4)
BN_EPS = 1e-5
ASPP_PREFIX = "decode_head.decode_module.aspp_modules"
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class DeepLabArch:
    """Sizes of the network; the real MaskCLIP+ student is ``DeepLabArch(depth=50 or 101)``.

    ``stem_channels`` is the width of the last stem conv (the first two have half of it);
    ``base_channels`` the bottleneck width of layer1 (doubling per stage, outputs x4);
    ``aspp_channels`` the feature dimension C of the output.
    """

    depth: int = 50
    base_channels: int = 64
    stem_channels: int = 64
    aspp_channels: int = 512
    aspp_dilations: tuple[int, ...] = field(default=(6, 12, 18, 24))

    def __post_init__(self) -> None:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"DeepLabArch: depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}")
        for name in ("base_channels", "stem_channels", "aspp_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DeepLabArch: {name} must be positive, got {getattr(self, name)}")
        if self.stem_channels % 2:
            raise ValueError(f"DeepLabArch: stem_channels must be even, got {self.stem_channels}")
        object.__setattr__(self, "aspp_dilations", tuple(int(d) for d in self.aspp_dilations))

    @property
    def out_channels(self) -> int:
        """Channels of layer4's output (2048 for the real model)."""
        return self.base_channels * 8 * 4


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class Bottleneck(nn.Module):
    """ResNet bottleneck, style "pytorch": 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), residual, ReLU.

    (N, inplanes, H, W) -> (N, 4*planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _res_layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """One stage; contract_dilation: the first block runs at dilation//2 when dilation > 1."""
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), _bn(planes * 4))
    first_dilation = dilation // 2 if dilation > 1 else dilation
    layers = [Bottleneck(inplanes, planes, stride, first_dilation, downsample)]
    layers += [Bottleneck(planes * 4, planes, 1, dilation, None) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetV1cDilated(nn.Module):
    """ResNetV1c-d8: deep stem + 4 dilated stages. (N, 3, H, W) -> (N, 32*base, ceil-ish H/8, W/8)."""

    def __init__(self, arch: DeepLabArch):
        super().__init__()
        s = arch.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, s // 2, 3, stride=2, padding=1, bias=False), _bn(s // 2), nn.ReLU(inplace=True),
            nn.Conv2d(s // 2, s // 2, 3, padding=1, bias=False), _bn(s // 2), nn.ReLU(inplace=True),
            nn.Conv2d(s // 2, s, 3, padding=1, bias=False), _bn(s), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = s
        for i, blocks in enumerate(STAGE_BLOCKS[arch.depth]):
            planes = arch.base_channels * 2**i
            self.add_module(f"layer{i + 1}",
                            _res_layer(inplanes, planes, blocks, STAGE_STRIDES[i], STAGE_DILATIONS[i]))
            inplanes = planes * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ConvBNReLU(nn.Module):
    """mmcv ConvModule as used by the ASPP: conv (no bias) -> BN -> ReLU, names ``conv`` / ``bn``."""

    def __init__(self, cin: int, cout: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn = _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ASPPSum(nn.Module):
    """ASPPv2 without classifier: sum of the dilated branches. (N, Cin, h, w) -> (N, C, h, w), C >= 0."""

    def __init__(self, cin: int, cout: int, dilations: tuple[int, ...]):
        super().__init__()
        self.aspp_modules = nn.ModuleList([ConvBNReLU(cin, cout, d) for d in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.aspp_modules[0](x)
        for branch in self.aspp_modules[1:]:
            out = out + branch(x)
        return out


class _DecodeHead(nn.Module):
    """Holds ``decode_module`` so that the parameter names read ``decode_head.decode_module.…``."""

    def __init__(self, arch: DeepLabArch):
        super().__init__()
        self.decode_module = ASPPSum(arch.out_channels, arch.aspp_channels, arch.aspp_dilations)


class MaskClipPlusDeepLab(nn.Module):
    """The MaskCLIP+ student: ImageNet-normalised RGB (N, 3, H, W) float -> raw features (N, C, h, w).

    h = ceil(ceil(ceil(H/2)/2)/2) (conv/pool arithmetic: 1024 -> 128, 1820 -> 228); features are
    non-negative and not L2-normalised (teacher.md §1.2).
    """

    def __init__(self, arch: DeepLabArch):
        super().__init__()
        self.arch = arch
        self.backbone = ResNetV1cDilated(arch)
        self.decode_head = _DecodeHead(arch)

    @property
    def out_channels(self) -> int:
        return self.arch.aspp_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head.decode_module(self.backbone(x))

    @torch.no_grad()
    def fold_batchnorm(self) -> MaskClipPlusDeepLab:
        """Fold every eval-mode BN into the conv before it (exact up to float rounding); returns self.

        Afterwards the convs carry a bias and the BNs are Identity; the state dict no longer has the mmseg
        layout, so fold only after loading.
        """
        def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                              padding=conv.padding, dilation=conv.dilation, bias=True,
                              device=conv.weight.device, dtype=conv.weight.dtype)
            fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
            return fused

        stem = self.backbone.stem
        for ci, bi in ((0, 1), (3, 4), (6, 7)):
            stem[ci] = fold(stem[ci], stem[bi])
            stem[bi] = nn.Identity()
        for mod in self.modules():
            if isinstance(mod, Bottleneck):
                for i in (1, 2, 3):
                    setattr(mod, f"conv{i}", fold(getattr(mod, f"conv{i}"), getattr(mod, f"bn{i}")))
                    setattr(mod, f"bn{i}", nn.Identity())
                if mod.downsample is not None:
                    mod.downsample[0] = fold(mod.downsample[0], mod.downsample[1])
                    mod.downsample[1] = nn.Identity()
            elif isinstance(mod, ConvBNReLU):
                mod.conv = fold(mod.conv, mod.bn)
                mod.bn = nn.Identity()
        return self


# ----------------------------------------------------------------------------------------------------
# Key layout and architecture inference from a state dict
# ----------------------------------------------------------------------------------------------------

def expected_keys(depth: int, num_aspp: int = 4) -> set[str]:
    """The exact key set of the teacher subset for ResNetV1c-``depth`` + ``num_aspp`` ASPP branches.

    330 backbone keys for R50, 636 for R101 (stem 18, 18 per bottleneck, 6 per downsample), 6 per ASPP
    branch. Built from the layout rules only, independently of the module tree.
    """
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"unsupported depth {depth}; expected one of {sorted(STAGE_BLOCKS)}")
    keys: set[str] = set()
    for ci, bi in ((0, 1), (3, 4), (6, 7)):
        keys.add(f"backbone.stem.{ci}.weight")
        keys.update(f"backbone.stem.{bi}.{s}" for s in BN_SUFFIXES)
    for layer, blocks in enumerate(STAGE_BLOCKS[depth], start=1):
        for b in range(blocks):
            p = f"backbone.layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.add(f"{p}.conv{i}.weight")
                keys.update(f"{p}.bn{i}.{s}" for s in BN_SUFFIXES)
        keys.add(f"backbone.layer{layer}.0.downsample.0.weight")
        keys.update(f"backbone.layer{layer}.0.downsample.1.{s}" for s in BN_SUFFIXES)
    for i in range(num_aspp):
        keys.add(f"{ASPP_PREFIX}.{i}.conv.weight")
        keys.update(f"{ASPP_PREFIX}.{i}.bn.{s}" for s in BN_SUFFIXES)
    return keys


def infer_arch(sd: dict[str, torch.Tensor], source: str = "<state dict>",
               aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)) -> DeepLabArch:
    """Depth (count of ``backbone.layer3.<i>`` blocks: 6 -> 50, 23 -> 101) and widths from the tensors.

    Raises ValueError naming ``source`` when the layout is not a ResNetV1c + ASPP teacher.
    """
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"{source}: no backbone.layer3.* keys; not a MaskCLIP+ DeepLab checkpoint")
    n3 = max(blocks) + 1
    if n3 not in LAYER3_BLOCKS_TO_DEPTH:
        raise ValueError(f"{source}: layer3 has {n3} blocks; expected 6 (ResNet-50) or 23 (ResNet-101)")
    needed = ("backbone.stem.6.weight", "backbone.layer1.0.conv1.weight", f"{ASPP_PREFIX}.0.conv.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"{source}: missing {missing}; cannot infer the widths")
    n_aspp = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(ASPP_PREFIX) + r"\.(\d+)\.", k))})
    if n_aspp != len(aspp_dilations):
        raise ValueError(f"{source}: {n_aspp} ASPP branches, but {len(aspp_dilations)} dilations configured "
                         f"{tuple(aspp_dilations)}")
    return DeepLabArch(depth=LAYER3_BLOCKS_TO_DEPTH[n3],
                       base_channels=int(sd["backbone.layer1.0.conv1.weight"].shape[0]),
                       stem_channels=int(sd["backbone.stem.6.weight"].shape[0]),
                       aspp_channels=int(sd[f"{ASPP_PREFIX}.0.conv.weight"].shape[0]),
                       aspp_dilations=tuple(aspp_dilations))


def load_strict(model: MaskClipPlusDeepLab, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Strict load by exact key names; an error names missing / unexpected / mis-shaped keys and ``source``."""
    own = model.state_dict()
    diff = describe_mismatch({k: tuple(v.shape) for k, v in sorted(sd.items())},
                             {k: tuple(v.shape) for k, v in sorted(own.items())})
    if diff is not None:
        raise ValueError(f"{source}: does not fit {model.arch}: {diff}")
    model.load_state_dict(sd, strict=True)
