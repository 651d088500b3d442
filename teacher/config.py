"""What a run config says about the teacher (torch-free: reading a YAML needs neither torch nor the disk).

Checks here look at the values only; whether the weights file exists is checked where the teacher is
built (:func:`teacher.live.build_teacher_from_config`), so a config can be read, printed and compared on a
machine without the teacher checkpoint.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

TeacherKind = Literal["maskclip_plus", "maskclip_vit"]
Sampler = Literal["exact", "grid_sample"]
ResizeMethod = Literal["cv2", "float"]
AmpDtype = Literal["bfloat16", "float16", "none"]

KINDS: tuple[str, ...] = typing.get_args(TeacherKind)
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
RESIZE_METHODS: tuple[str, ...] = typing.get_args(ResizeMethod)
AMP_DTYPE_NAMES: tuple[str, ...] = typing.get_args(AmpDtype)
#: (W_max, H_max) of the original keep-ratio resize: 1600x900 -> 1820x1024 (docs/teacher.md §1.3).
DEFAULT_RESIZE_FIT: tuple[int, int] = (2048, 1024)


@dataclass
class TeacherConfig:
    """The frozen 2D teacher; validated at construction (:meth:`validate`).

    kind: ``maskclip_plus`` (DeepLab student, POP-3D's targets) or ``maskclip_vit`` (MaskCLIP ViT-B/16).
    weights: converted ``.safetensors`` (teacher/checkpoint.py), or None for RANDOM weights (loud warning).
    resize_fit: (W_max, H_max) of the keep-ratio resize; (2048, 1024) is the original (1600x900 -> 1820x1024).
    chunk: images per network forward (bounds activation memory); 0 = all images of the batch at once.
    amp_dtype: autocast dtype on CUDA (``bfloat16`` | ``float16`` | ``none``); CPU always runs fp32.
    sampler: ``exact`` (original double resize + nearest read) or ``grid_sample`` (one bilinear read).
    resize_method: ``cv2`` (fixed-point emulation of cv2 INTER_LINEAR, default) or ``float`` (±1 LSB).
    fold_bn: fold BatchNorm into the convs after loading (exact in eval; DeepLab only).
    channels_last / compile: CUDA speed knobs.
    random_arch: sizes of a random-weight network (DeepLabArch / open_clip vision config), tests only.
    """

    kind: TeacherKind = "maskclip_plus"
    weights: str | None = None
    resize_fit: tuple[int, int] = DEFAULT_RESIZE_FIT
    chunk: int = 6
    amp_dtype: AmpDtype = "bfloat16"
    sampler: Sampler = "exact"
    resize_method: ResizeMethod = "cv2"
    fold_bn: bool = True
    channels_last: bool = True
    compile: bool = False
    random_arch: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key of the first invalid value (values only; no file access)."""
        for key, allowed in (("kind", KINDS), ("sampler", SAMPLERS), ("resize_method", RESIZE_METHODS),
                             ("amp_dtype", AMP_DTYPE_NAMES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"TeacherConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        fit = tuple(int(v) for v in self.resize_fit)
        if len(fit) != 2 or min(fit) <= 0:
            raise ValueError(f"TeacherConfig.resize_fit must be two positive ints (W, H), got {self.resize_fit!r}")
        self.resize_fit = fit
        if int(self.chunk) < 0:
            raise ValueError(f"TeacherConfig.chunk must be >= 0, got {self.chunk}")
        if self.weights is not None and not str(self.weights).endswith(".safetensors"):
            raise ValueError(f"TeacherConfig.weights: {self.weights}: run-time weights must be .safetensors "
                             f"(convert the released .pth with teacher.checkpoint)")
