"""Typed run configuration, loaded from YAML in ``configs/`` and validated at start-up.

A run config has five sections, each a dataclass::

    model:   pop3d.model.config.StudentConfig   (the TPVFormer student)
    teacher: teacher.config.TeacherConfig       (the frozen 2D teacher)
    data:    DataConfig                         (shards, grid, image size for the student)
    train:   TrainConfig                        (optimiser, schedule, losses, precision)
    eval:    EvalConfig                         (zero-shot evaluation)

Unknown keys, wrong types and out-of-range values are errors that name the YAML file and the key, e.g.
``configs/tiny.yaml: train.lr: expected a number, got 'fast'``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

if typing.TYPE_CHECKING:
    from pop3d.model.config import StudentConfig
    from teacher.config import TeacherConfig


class ConfigError(ValueError):
    """An invalid configuration; the message names the file and the key."""


@dataclass
class DataConfig:
    """Where the shards are and how samples become student inputs."""

    shards: str = "data/shards"
    """Folder holding ``manifest.json`` and the tar shards (scripts/build_shards.py)."""
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    shuffle_buffer: int = 0
    """Training: shuffle each slot's samples inside blocks of this many consecutive positions, across shard
    boundaries (0: shard-level shuffling only). Seeded by (seed, epoch): resume and process count unaffected."""
    student_image_hw: tuple[int, int] | None = None
    """Resize the six images to (H, W) for the student (None: original size, as the paper). ``lidar2img``
    is rescaled to match; the teacher always gets the original images."""
    photometric_aug: bool = True
    """PhotoMetricDistortion on the student's images in training (never on the teacher's)."""

    def validate(self) -> None:
        _check_int(self, "num_workers", lo=0)
        _check_int(self, "shuffle_buffer", lo=0)
        for name in ("shards", "train_split", "val_split"):
            if not getattr(self, name):
                raise ValueError(f"{name}: must not be empty")
        if self.student_image_hw is not None:
            h, w = self.student_image_hw
            if h <= 0 or w <= 0:
                raise ValueError(f"student_image_hw: must be positive, got {list(self.student_image_hw)}")


@dataclass
class TrainConfig:
    """Optimiser, schedule, losses and precision (pipeline.md §3; defaults are the official run)."""

    epochs: int = 12
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    lr: float = 1e-4
    """Base LR. The official config says 2e-4 but the command line default 1e-4 always won (pipeline.md §3.4)."""
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.01
    grad_max_norm: float = 35.0
    warmup_steps: int = 500
    warmup_lr_init: float = 1e-5
    lr_min: float = 1e-6
    feature_loss_weight: float = 1.0
    batch_size: int = 1
    """Samples per process per micro-step (the official run: 1, student.md §6). A global step reads
    processes x grad_accum_steps x batch_size samples; the loss is the mean of the samples' losses."""
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    """Save a resumable state every this many steps (and at every epoch end)."""
    output_dir: str = "runs/pop3d"
    init_weights: str | None = None
    """safetensors to start from: a converted FCOS3D file (backbone + neck) or a full POP-3D checkpoint."""
    init_kind: Literal["fcos3d", "pop3d"] = "fcos3d"

    val_every_epochs: int = 1
    """Validate on ``data.val_split`` after every this many epochs (0: never)."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (plus the best by validation mIoU); older ones are deleted."""
    tensorboard: bool = True
    """Write TensorBoard events to ``<output_dir>/tensorboard`` (accelerate's tracker)."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every", "save_every", "keep_checkpoints"):
            _check_int(self, name, lo=1)
        for name in ("warmup_steps", "seed", "val_every_epochs"):
            _check_int(self, name, lo=0)
        if self.max_steps is not None:
            _check_int(self, "max_steps", lo=1)
        if self.seed >= 2 ** 63:
            raise ValueError(f"seed: must be < 2**63, got {self.seed}")
        for name in ("lr", "warmup_lr_init", "lr_min", "grad_max_norm"):
            _check_float(self, name, positive=True)
        for name in ("backbone_lr_mult", "weight_decay", "feature_loss_weight"):
            _check_float(self, name, positive=False)
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min: must be <= lr ({self.lr}), got {self.lr_min}")
        if self.warmup_lr_init > self.lr:
            raise ValueError(f"warmup_lr_init: must be <= lr ({self.lr}), got {self.warmup_lr_init}")
        if not self.output_dir:
            raise ValueError("output_dir: must not be empty")


@dataclass
class EvalConfig:
    """Zero-shot evaluation (pipeline.md §4)."""

    text_embeddings: str | None = None
    """safetensors from scripts/text_embeddings.py (or the converted zeroshot_weights.pth)."""
    normalized_cosine: bool = False
    """Score with cosine instead of the official raw dot product."""
    max_samples: int | None = None

    def validate(self) -> None:
        if self.max_samples is not None:
            _check_int(self, "max_samples", lo=1)


def _check_int(obj: Any, name: str, lo: int) -> None:
    value = getattr(obj, name)
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")


def _check_float(obj: Any, name: str, positive: bool) -> None:
    """A finite number, > 0 (``positive``) or >= 0; the message names the key."""
    value = getattr(obj, name)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")


@dataclass
class RunConfig:
    """The five sections of a run config (:func:`load_config`)."""

    model: StudentConfig
    teacher: TeacherConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    speed: Any = None
    """pop3d.cuda_setup.SpeedConfig (CUDA speed switches); None = its defaults."""


def _section_types() -> dict[str, type]:
    # Imported here: `pop3d.model` imports torch; `import pop3d.config` itself stays light.
    from pop3d.cuda_setup import SpeedConfig
    from pop3d.model.config import StudentConfig
    from teacher.config import TeacherConfig

    return {"model": StudentConfig, "teacher": TeacherConfig, "data": DataConfig, "train": TrainConfig,
            "eval": EvalConfig, "speed": SpeedConfig}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        if msg.split(":", 1)[0] in names:  # "key: problem" -> "<file>: section.key: problem"
            raise ConfigError(f"{where}.{msg}") from exc
        raise ConfigError(f"{where}: {msg}") from exc
    return obj


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config from YAML.

    ``overrides`` are ``section.key=value`` strings (value parsed as YAML), e.g. ``train.max_steps=10``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = yaml.safe_load(value)
    sections = _section_types()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(sections)}")
    built = {name: _build(cls, raw.get(name), f"{path}: {name}") for name, cls in sections.items()}
    return RunConfig(**built)


def config_to_dict(cfg: Any) -> Any:
    """Plain dict of a (nested) config, for logging and saving next to checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def add_config_arguments(parser) -> None:
    """``--config FILE`` and repeatable ``--set section.key=value`` on an argparse parser."""
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.max_steps=10")


def config_from_args(args) -> RunConfig | None:
    """Load the config named by :func:`add_config_arguments`; print the error and return None if invalid."""
    try:
        return load_config(args.config, args.set)
    except ConfigError as exc:
        import sys

        print(f"config error: {exc}", file=sys.stderr)
        return None
