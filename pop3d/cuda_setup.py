"""CUDA speed switches, the batch prefetcher and the step timer used by training and evaluation.

* :class:`SpeedConfig` (the ``speed:`` section of a run config) and :func:`apply_speed_settings`: TF32
  matmuls / convolutions, ``cudnn.benchmark``, channels_last and ``torch.compile`` for the student's
  backbone + FPN (static shapes: six images of one size); the teacher's compile is ``teacher.compile``.
  On CPU every switch is a no-op.
* :class:`DevicePrefetcher`: wraps a batch iterator; copies the NEXT batch's step tensors (``keys``) to the
  GPU on a side stream while the current step runs (pinned memory + ``non_blocking``); the other values
  (points, labels, voxel labels, eval GT) stay on the host.
* :class:`StepTimer`: CUDA-event intervals (teacher, student forward, backward, optimiser) read only when
  asked (on log steps: one event synchronisation); on CPU host ``perf_counter`` intervals, labelled
  ``timer: "host"``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pop3d.factory import batch_to_device

# The batch entries the training step reads (pop3d/training.py): the rest never leave the host.
TRAIN_KEYS = ("images", "lidar2img", "proj_batch", "proj_cam", "proj_rowcol", "proj_point", "grid_ind",
              "occupancy", "photometric")
# What evaluation reads on the device (pop3d/evaluate.py); the GT stays on the host.
EVAL_KEYS = ("images", "lidar2img", "grid_ind")


@dataclass
class SpeedConfig:
    """CUDA speed switches (no effect on CPU). Defaults are the fast settings; outputs differ from strict
    fp32 only by TF32 rounding (matmuls/convolutions with 10-bit mantissa inputs, fp32 accumulation)."""

    tf32: bool = True
    """Allow TF32 in matmuls and cuDNN convolutions (``torch.backends.*.allow_tf32``)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the (static) image shapes."""
    channels_last: bool = True
    """Student backbone + FPN weights and images in channels_last (NHWC) memory format."""
    compile_backbone: bool = False
    """``torch.compile`` the student's backbone and FPN (static shapes). First step compiles (~1 min)."""
    pin_memory: bool = True
    """DataLoader ``pin_memory`` on CUDA, so host->device copies are asynchronous."""
    prefetch: bool = True
    """Copy the next batch to the GPU on a side stream while the current step runs."""


def apply_speed_settings(speed: SpeedConfig | None, device: torch.device, student: torch.nn.Module | None = None
                         ) -> dict[str, Any]:
    """Set the global backend flags and prepare ``student`` (in place); returns what was applied."""
    speed = speed or SpeedConfig()
    applied: dict[str, Any] = {"device": str(device)}
    if torch.device(device).type != "cuda":
        return applied
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32
    torch.set_float32_matmul_precision("high" if speed.tf32 else "highest")
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    applied.update(tf32=speed.tf32, cudnn_benchmark=speed.cudnn_benchmark)
    if student is not None:
        applied.update(prepare_student(student, speed))
    return applied


def prepare_student(student: torch.nn.Module, speed: SpeedConfig) -> dict[str, Any]:
    """channels_last and/or torch.compile of ``student.img_backbone`` / ``student.img_neck`` (in place).

    The compiled modules replace the attributes' ``forward`` only, so parameter names, the state dict and
    DDP wrapping are unchanged.
    """
    out: dict[str, Any] = {}
    backbone = getattr(student, "img_backbone", None)
    neck = getattr(student, "img_neck", None)
    if backbone is None or neck is None:
        return out
    if speed.channels_last:
        backbone.to(memory_format=torch.channels_last)
        neck.to(memory_format=torch.channels_last)
        _channels_last_input(backbone)
        out["channels_last"] = True
    if speed.compile_backbone:
        for mod in (backbone, neck):
            mod.forward = torch.compile(mod.forward, dynamic=False)
        out["compile_backbone"] = True
    return out


def _channels_last_input(backbone: torch.nn.Module) -> None:
    """Convert the backbone's input to channels_last (a pre-forward hook; no-op if it already is)."""
    if getattr(backbone, "_pop3d_channels_last_hook", False):
        return

    def hook(_mod, args):
        x = args[0]
        if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, *args[1:])

    backbone.register_forward_pre_hook(hook)
    backbone._pop3d_channels_last_hook = True


move_batch = batch_to_device  # one home: pop3d.factory.batch_to_device (accelerate's send_to_device)


def _record_stream(batch: dict[str, Any], stream) -> None:
    for value in batch.values():
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, torch.Tensor) and v.is_cuda:
                v.record_stream(stream)


class DevicePrefetcher:
    """Iterate device batches, the next one already on its way to the GPU (CUDA) while the step runs.

    On CPU (or ``enabled=False``) it only moves ``keys`` to ``device`` when a batch is taken.
    """

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device,
                 keys: Sequence[str] | None = TRAIN_KEYS, enabled: bool = True) -> None:
        self._it = iter(batches)
        self.device = torch.device(device)
        self.keys = keys
        self.enabled = enabled and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.enabled else None
        self._next: dict[str, Any] | None = None
        if self.enabled:
            self._preload()

    def _preload(self) -> None:
        try:
            host = next(self._it)
        except StopIteration:
            self._next = None
            return
        with torch.cuda.stream(self._stream):
            self._next = move_batch(host, self.device, self.keys, non_blocking=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.enabled:
            return move_batch(next(self._it), self.device, self.keys)
        if self._next is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        batch = self._next
        _record_stream(batch, current)
        self._preload()
        return batch


class StepTimer:
    """Named intervals of one step: ``mark(name)`` ends the interval ``name`` (started at the previous mark
    or ``start()``). CUDA: events, read by :meth:`read` (synchronises the last event: call it on log steps);
    CPU: ``perf_counter`` (exact there, the CPU runs synchronously)."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_events" if self.cuda else "host"
        self._marks: list[tuple[str, Any]] = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        if not self._marks:
            self.start()
        self._marks.append((name, self._now()))

    def read(self) -> dict[str, float]:
        """{``<name>_ms``: interval} for the marks since :meth:`start`."""
        if len(self._marks) < 2:
            return {}
        if self.cuda:
            self._marks[-1][1].synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self._marks[:-1], self._marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else 1e3 * (b - a)
            out[f"{name}_ms"] = out.get(f"{name}_ms", 0.0) + ms
        return out
