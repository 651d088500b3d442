"""Configuration of the POP-3D student (TPVFormer-04 + occupancy head + CLIP-feature head).

The defaults are the paper's values (POP-3D ``config/pop3d_maskclip_12ep.py``). Every size of the network is
derived from these fields by the rules below, never from fixed numbers:

* backbone: mmdet ResNet-``depth`` caffe style, stem ``stem_channels`` (64), stage widths
  ``base_channels * 2**i``, DCNv2 in stages 3 and 4, outputs of stages 2-4;
* FPN: ``in_channels = base_channels * 4 * (2, 4, 8)``, ``out_channels = dim``, ``num_outs = levels``;
* head: ``embed_dims = dim``, positional encoding ``num_feats = dim // 2``, FFN ``ffn_dim`` (``2 * dim``);
* aggregator: ``in = out = dim``, occupancy hidden ``2 * dim``, feature branch hidden/out ``hidden_dims_ft``,
  output ``feature_dim``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

AttentionBackend = Literal["auto", "pytorch", "triton", "mmcv"]  # = pop3d.model.msda.BACKENDS
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_POSITIVE_INTS = ("tpv_h", "tpv_w", "tpv_z", "dim", "levels", "num_layers", "num_heads", "ffn_dim",
                  "cvha_num_points", "num_cams", "base_channels", "stem_channels", "num_classes",
                  "feature_dim", "hidden_dims_ft", "dec_layers_occupancy", "dec_layers_features")


@dataclass
class StudentConfig:
    """Every knob of the student. Field names of the fixture ``config.json`` are kept verbatim."""

    # TPV grid and transformer sizes
    tpv_h: int = 100
    tpv_w: int = 100
    tpv_z: int = 8
    dim: int = 256
    levels: int = 4
    num_points_in_pillar: tuple[int, int, int] = (4, 32, 32)
    num_points: tuple[int, int, int] = (8, 64, 64)
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int | None = None  # None -> 2 * dim
    dropout: float = 0.1
    cvha_num_points: int = 4  # points per head in the HW-plane self-attention
    num_cams: int = 6
    pc_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    # backbone
    depth: Literal[50, 101, 152] = 101
    base_channels: int = 64
    stem_channels: int = 64
    # aggregator
    num_classes: int = 2
    feature_dim: int = 512
    hidden_dims_ft: int = 1024
    dec_layers_occupancy: int = 2
    dec_layers_features: int = 2
    # training-time behaviour and implementation choices (no weights involved)
    grid_mask: bool = True
    grid_mask_prob: float = 0.7
    attention_backend: AttentionBackend = "auto"
    activation_checkpointing: bool = False  # layer3 blocks + aggregator MLPs, non-reentrant

    def __post_init__(self) -> None:
        self.num_points_in_pillar = tuple(int(v) for v in self.num_points_in_pillar)
        self.num_points = tuple(int(v) for v in self.num_points)
        self.pc_range = tuple(float(v) for v in self.pc_range)
        if self.ffn_dim is None:
            self.ffn_dim = 2 * self.dim
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key of the first invalid value (checked at construction)."""
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"StudentConfig.{name} must be a positive integer, got {v!r}")
        if self.dim % 2:
            raise ValueError(f"StudentConfig.dim must be even (positional encoding uses dim/2 feats), got {self.dim}")
        if self.dim % self.num_heads:
            raise ValueError(f"StudentConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.levels < 3:
            raise ValueError(f"StudentConfig.levels must be >= 3 (the FPN has 3 inputs C3-C5 and adds extra "
                             f"levels), got {self.levels}")
        for name, n, what in (("num_points_in_pillar", 3, "HW, ZH, WZ"), ("num_points", 3, "HW, ZH, WZ"),
                              ("pc_range", 6, "xmin, ymin, zmin, xmax, ymax, zmax")):
            if len(getattr(self, name)) != n:
                raise ValueError(f"StudentConfig.{name} needs {n} values ({what})")
        self._validate_points()
        lo, hi = self.pc_range[:3], self.pc_range[3:]
        if not all(math.isfinite(v) for v in self.pc_range):
            raise ValueError("StudentConfig.pc_range must be finite")
        if not all(h > lo_ for lo_, h in zip(lo, hi)):
            raise ValueError(f"StudentConfig.pc_range max must exceed min, got {self.pc_range}")
        if self.depth not in RESNET_DEPTHS:
            raise ValueError(f"StudentConfig.depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"StudentConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.grid_mask_prob <= 1.0:
            raise ValueError(f"StudentConfig.grid_mask_prob must be in [0, 1], got {self.grid_mask_prob}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"StudentConfig.attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")

    def _validate_points(self) -> None:
        """Sampling points per pillar / per query must tile the three planes consistently."""
        za, pts = self.num_points_in_pillar, self.num_points
        if not all(v > 0 for v in za + pts):
            raise ValueError("StudentConfig.num_points_in_pillar and num_points must be positive")
        if za[1] != za[2]:
            raise ValueError(f"StudentConfig.num_points_in_pillar[1] must equal num_points_in_pillar[2], got {za}")
        if za[1] % za[0] or za[2] % za[0]:
            raise ValueError(f"StudentConfig.num_points_in_pillar[1:] must be multiples of "
                             f"num_points_in_pillar[0], got {za}")
        if pts[0] % za[0]:
            raise ValueError(f"StudentConfig.num_points[0] ({pts[0]}) must be a multiple of "
                             f"num_points_in_pillar[0] ({za[0]})")
        for i in (1, 2):
            mult = za[i] // za[0]
            if pts[i] != pts[0] * mult:
                raise ValueError(f"StudentConfig.num_points[{i}] must be num_points[0] * num_points_in_pillar[{i}] "
                                 f"/ num_points_in_pillar[0] = {pts[0] * mult}, got {pts[i]}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def fpn_in_channels(self) -> tuple[int, int, int]:
        """Channels of C3, C4, C5: ``base_channels * 4 * (2, 4, 8)``."""
        return tuple(self.base_channels * 4 * m for m in (2, 4, 8))

    @property
    def pos_feats(self) -> int:
        return self.dim // 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def plane_sizes(self) -> tuple[int, int, int]:
        """Number of queries of the HW, ZH and WZ planes."""
        return (self.tpv_h * self.tpv_w, self.tpv_z * self.tpv_h, self.tpv_w * self.tpv_z)

    @property
    def points_multiplier(self) -> tuple[int, int, int]:
        """Sub-queries per query of each plane (``num_points_in_pillar[i] // num_points_in_pillar[0]``)."""
        za = self.num_points_in_pillar
        return tuple(z // za[0] for z in za)

    @property
    def min_image_divisor(self) -> int:
        """Image H and W must be multiples of this (stride of C5, the deepest backbone output)."""
        return 32

    # ---- (de)serialisation ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudentConfig:
        """Build from a dict (e.g. a fixture ``config.json``); ``kind`` is ignored, unknown keys are an error."""
        d = dict(d)
        kind = d.pop("kind", "student")
        if kind != "student":
            raise ValueError(f"config kind is {kind!r}, expected 'student'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown StudentConfig keys: {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def paper(cls) -> StudentConfig:
        return cls()
