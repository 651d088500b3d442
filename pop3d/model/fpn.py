"""mmdet 2.x ``FPN`` as configured by POP-3D: no norm, no activation, extra stride-2 convs on the output.

Names: ``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv`` (mmcv ConvModule wraps the conv as ``.conv``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """A bare conv with bias, named ``conv`` like mmcv's ConvModule without norm/activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Feature pyramid: ``start_level=0``, ``add_extra_convs='on_output'``, ``relu_before_extra_convs=True``.

    inputs: C3..C5 [(N, in_channels[i], H_i, W_i)] -> ``num_outs`` maps (N, out_channels, h_l, w_l).
    Top-down uses nearest upsampling to the explicit size of the finer map. The first extra level is a
    3x3 stride-2 conv on the last *output*; a ReLU precedes only the second and later extra convs (mmdet 2.x),
    so with ``num_outs = len(in_channels) + 1`` there is no ReLU anywhere.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, num_outs: int):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"FPN num_outs ({num_outs}) must be >= number of inputs ({len(in_channels)})")
        self.num_ins, self.num_outs = len(in_channels), num_outs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        convs = [ConvModule(out_channels, out_channels, 3, padding=1) for _ in in_channels]
        convs += [ConvModule(out_channels, out_channels, 3, stride=2, padding=1)
                  for _ in range(num_outs - self.num_ins)]
        self.fpn_convs = nn.ModuleList(convs)
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != self.num_ins:
            raise ValueError(f"FPN expects {self.num_ins} feature maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(self.num_ins - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_ins)]
        for i in range(self.num_ins, self.num_outs):
            src = outs[-1] if i == self.num_ins else F.relu(outs[-1])
            outs.append(self.fpn_convs[i](src))
        return outs
