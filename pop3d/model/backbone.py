"""mmdet 2.x ``ResNet(style='caffe')`` with frozen BatchNorm and DCNv2 (mmcv ``ModulatedDeformConv2dPack``).

Parameter and buffer names are those of mmdet/mmcv so that official checkpoints load with the identity map:
``conv1``, ``bn1``, ``layer{1..4}.{b}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.{0,1}}`` and, in DCN blocks,
``conv2.weight`` + ``conv2.conv_offset.{weight,bias}``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import deform_conv2d


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics and never updates them.

    Same state-dict names as ``nn.BatchNorm2d`` (weight, bias, running_mean, running_var,
    num_batches_tracked); weight and bias have ``requires_grad=False``. This is mmdet's
    ``norm_cfg=dict(type='BN2d', requires_grad=False), norm_eval=True``:
    ``y = (x - rm) / sqrt(rv + eps) * w + b``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class ModulatedDeformConv2dPack(nn.Module):
    """DCNv2 with its own offset/mask predictor, laid out as mmcv's ``ModulatedDeformConv2dPack``.

    ``conv_offset`` (Conv2d in -> 3*k*k) predicts per tap (dy, dx) pairs in channels [0, 2kk) and a mask
    logit in [2kk, 3kk); the mask goes through a sigmoid. Computed with ``torchvision.ops.deform_conv2d``
    (same offset layout, sampling position and bilinear/out-of-range rules as mmcv's kernel). No bias.
    x (N, Cin, H, W) -> (N, Cout, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.conv_offset = nn.Conv2d(in_channels, 3 * kernel_size * kernel_size, kernel_size, stride=stride,
                                     padding=padding, dilation=dilation, bias=True)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        # fp32 always (torchvision has no bf16 CPU kernel; its CUDA autocast rule casts to fp32 anyway)
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(x.to(dt), offset.to(dt), self.weight.to(dt), None, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, mask=torch.sigmoid(mask.to(dt)))
        return out.to(x.dtype)


class Bottleneck(nn.Module):
    """Caffe-style bottleneck (stride on the 1x1 ``conv1``), expansion 4.

    x (N, inplanes, H, W) -> (N, 4*planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dcn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        if dcn:
            self.conv2 = ModulatedDeformConv2dPack(planes, planes, 3, stride=1, padding=1)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                            FrozenBatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """mmdet 2.x ResNet (caffe) returning C3, C4, C5 (``out_indices=(1, 2, 3)``), ``frozen_stages=1``.

    Stage ``s`` (1..4) has width ``base_channels * 2**(s-1)`` (output x4), stride 1, 2, 2, 2, DCNv2 in
    stages 3 and 4. The stem and layer1 never get gradients; every BN is frozen.

    x (N, 3, H, W) -> [(N, 8b, H/8, W/8), (N, 16b, H/16, W/16), (N, 32b, H/32, W/32)], b = base_channels.
    """

    def __init__(self, stage_blocks: tuple[int, int, int, int] = (3, 4, 23, 3), base_channels: int = 64,
                 stem_channels: int = 64, stage_with_dcn: tuple[bool, ...] = (False, False, True, True),
                 checkpoint_stages: tuple[int, ...] = ()):
        super().__init__()
        self.checkpoint_stages = tuple(checkpoint_stages)
        self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem_channels
        for i, n in enumerate(stage_blocks):
            planes = base_channels * 2 ** i
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, dcn=stage_with_dcn[i]))
                inplanes = planes * 4
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._freeze_stem_and_layer1()
        self.init_weights()

    def _freeze_stem_and_layer1(self) -> None:
        for m in (self.conv1, self.bn1, self.layer1):
            for p in m.parameters():
                p.requires_grad_(False)

    def init_weights(self) -> None:
        """mmdet defaults (Kaiming fan_out on convs, BN 1/0, zero-init bn3); DCN offsets stay exactly 0."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.endswith("conv_offset") or isinstance(m, ModulatedDeformConv2dPack):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():  # frozen stem + layer1 (no parameter there needs a gradient)
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer1(x)
        outs = []
        for s in (2, 3, 4):
            layer = getattr(self, f"layer{s}")
            if s in self.checkpoint_stages and torch.is_grad_enabled():
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = layer(x)
            outs.append(x)
        return outs
