"""The training loop: a shard batch -> live teacher targets -> student forward -> losses -> AdamW step.

Accelerate owns devices, processes and mixed precision. What it does *not* get:

- the data loader: the WebDataset pipeline already splits shards by node and worker; ``accelerator.prepare``
  would wrap it in ``IterableDatasetShard`` and split the stream a second time. Every rank iterates its own
  loader and moves batches to its device; every rank runs the same number of steps per epoch (a rank whose
  shards run out starts its stream again), so DDP never waits on a missing rank;
- the teacher: frozen, in eval mode, under ``no_grad``, on every rank's own device, never in the optimiser,
  never in a saved state.

Per step (batch size 1 per process, as the official model):

    images uint8 (1,6,3,900,1600) --teacher--> targets (M, C) at proj_rowcol of camera proj_cam
    images --prepare_student_inputs (aug, caffe norm, pad)--> TPVFormer(points=None, features=grid_ind[proj_point])
    loss = lovasz + CE on logits_vox vs occupancy  +  w * MSE(logits_pts_fts, targets)
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from pop3d.config import RunConfig, config_to_dict
from pop3d.cuda_setup import TRAIN_KEYS, DevicePrefetcher, SpeedConfig, StepTimer, apply_speed_settings
from pop3d.losses import LossTerms, pop3d_loss
from pop3d.preprocess import prepare_student_inputs
from pop3d.schedule import build_optimizer, build_scheduler

log = logging.getLogger("pop3d.train")

STATE_FILE = "trainer_state.json"


def build_student(cfg: RunConfig):
    from pop3d.model.tpvformer import TPVFormer

    return TPVFormer(cfg.model)


def grid_spec_of(cfg: RunConfig):
    """The voxel grid of the student config as the shards' GridSpec."""
    from shards.geometry import GridSpec

    m = cfg.model
    return GridSpec(pc_min=tuple(m.pc_range[:3]), pc_max=tuple(m.pc_range[3:]), size=(m.tpv_w, m.tpv_h, m.tpv_z))


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensors (and lists of tensors) of a batch dict to ``device``; other values pass through."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            out[key] = value
    return out


def feature_points(batch: dict[str, Any]) -> torch.Tensor:
    """Grid coordinates of every projection, for batch size 1: (1, M, 3) float32.

    A point seen by k cameras appears k times, each paired with its own teacher target (pipeline.md §1.9).
    """
    if len(batch["grid_ind"]) != 1:
        raise ValueError("the training step expects batch size 1 per process")
    return batch["grid_ind"][0][batch["proj_point"]].unsqueeze(0).float()


def compute_loss(model, teacher, batch: dict[str, Any], cfg: RunConfig, generator: torch.Generator | None,
                 train: bool = True, timer=None) -> tuple[LossTerms, dict[str, float]]:
    """One forward of teacher and student on a device batch; returns the loss terms and timings (ms).

    With a ``timer`` (pop3d.cuda_setup.StepTimer, CUDA events) it marks ``teacher`` and ``student_fwd`` and
    the timings dict is empty (read the timer on log steps); without, host timers (exact on CPU only).
    """
    t0 = time.perf_counter()
    targets = teacher(batch["images"], batch["proj_batch"], batch["proj_cam"], batch["proj_rowcol"],
                      sync_free=True)
    t1 = time.perf_counter()
    if timer is not None:
        timer.mark("teacher")
    imgs, lidar2img, img_shape = prepare_student_inputs(
        batch["images"], batch["lidar2img"], out_hw=cfg.data.student_image_hw,
        photometric=train and cfg.data.photometric_aug, generator=generator)
    out = model(imgs, lidar2img, img_shape, points=None, features=feature_points(batch), voxel_features=False)
    pred = out.logits_pts_fts[0]
    terms = pop3d_loss(out.logits_vox, batch["occupancy"], pred, targets.to(pred.dtype),
                       feature_weight=cfg.train.feature_loss_weight)
    t2 = time.perf_counter()
    if timer is not None:
        timer.mark("student_fwd")
        return terms, {}
    return terms, {"teacher_ms": 1e3 * (t1 - t0), "student_fwd_ms": 1e3 * (t2 - t1)}


def _repeat(loader) -> Iterator[dict[str, Any]]:
    """Iterate ``loader`` forever (each pass reshuffles shards), so every rank can take the same step count."""
    for epoch in itertools.count():
        loader.dataset.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader yielded no sample: check the shards and the split name")


def _latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]  # only complete checkpoints
    return ckpts[-1] if ckpts else None


def save_student(model, path: Path, cfg: RunConfig, step: int) -> None:
    """Student weights only (never the teacher), as safetensors, with the config in the metadata."""
    from teacher.weights_io import save_safetensors

    save_safetensors(model.state_dict(), path, metadata={"format": "pop3d-student", "step": str(step),
                                            "model_config": config_to_dict(cfg.model)})


def train(cfg: RunConfig, *, resume: bool = False) -> Path:
    """Run training as configured; returns the path of the final student safetensors."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    from pop3d.checkpoint import load_student_weights
    from shards.loader import list_shards, make_loader
    from teacher.live import build_teacher_from_config

    tc = cfg.train
    out_dir = Path(tc.output_dir)
    # cpu=True on machines without CUDA: only then does accelerate join the gloo process group that
    # `accelerate launch --multi_gpu` / torchrun set up (without it every process trains alone, silently).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"the launcher started {launched} processes but accelerate joined "
                           f"{accelerator.num_processes}; on CPU-only machines launch with "
                           f"`accelerate launch --multi_gpu --num_processes N` or torchrun")
    set_seed(tc.seed, device_specific=True)
    is_main = accelerator.is_main_process
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    model = build_student(cfg)
    if tc.init_weights:
        report = load_student_weights(model, tc.init_weights, kind=tc.init_kind)
        accelerator.print(f"init weights {tc.init_weights}: {report}")
    speed = getattr(cfg, "speed", None) or SpeedConfig()
    accelerator.print(f"speed settings: {apply_speed_settings(speed, accelerator.device, model)}")
    teacher = build_teacher_from_config(cfg.teacher, device=accelerator.device)

    world = accelerator.num_processes
    _, counts = list_shards(cfg.data.shards, cfg.data.train_split)
    if not counts:
        raise ValueError(f"{cfg.data.shards}: no manifest.json with sample counts (scripts/build_shards.py writes it)")
    n_train = sum(counts.values())
    steps_per_epoch = max(1, n_train // (world * tc.batch_size * tc.grad_accum_steps))
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    optimizer = build_optimizer(model, tc.lr, tc.backbone_lr_mult, tc.weight_decay)
    scheduler = build_scheduler(optimizer, steps_per_epoch * tc.epochs, tc.warmup_steps, tc.warmup_lr_init,
                                tc.lr_min)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if resume:
        ckpt = _latest_checkpoint(out_dir)
        if ckpt is None:
            accelerator.print(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}; starting fresh")
        else:
            accelerator.load_state(str(ckpt))
            step = json.loads((ckpt / STATE_FILE).read_text())["step"]
            accelerator.print(f"resumed from {ckpt} at step {step}")

    loader = make_loader(cfg.data.shards, cfg.data.train_split, batch_size=tc.batch_size,
                         num_workers=cfg.data.num_workers, grid=grid_spec_of(cfg), shuffle=True, seed=tc.seed,
                         eval_gt=False, shuffle_buffer=cfg.data.shuffle_buffer,
                         pin_memory=speed.pin_memory and accelerator.device.type == "cuda")
    stream = _repeat(loader)
    # Skip what a resumed run already consumed (the stream's order is a function of the seed).
    for _ in range(step * tc.grad_accum_steps):
        next(stream)
    device_batches = DevicePrefetcher(stream, accelerator.device, TRAIN_KEYS, enabled=speed.prefetch)
    timer = StepTimer(accelerator.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # read on log steps only

    generator = torch.Generator().manual_seed(tc.seed * 1000 + accelerator.process_index + step)
    model.train()
    accelerator.print(
        f"training: {n_train} samples, {world} process(es), {steps_per_epoch} steps/epoch, {total_steps} steps "
        f"(batch {tc.batch_size} x accum {tc.grad_accum_steps} x {world}), precision {tc.mixed_precision}")
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    t_last = time.perf_counter()
    while step < total_steps:
        timer.start()
        for _ in range(tc.grad_accum_steps):
            batch = next(device_batches)
            with accelerator.accumulate(model):
                terms, _ = compute_loss(model, teacher, batch, cfg, generator, train=True, timer=timer)
                nonfinite |= ~torch.isfinite(terms.total.detach())  # no host sync: checked on log steps
                accelerator.backward(terms.total)
                timer.mark("student_bwd")
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                timer.mark("optimizer")
        scheduler.step()
        step += 1
        bar.update(1)
        saving = step % tc.save_every == 0 or step % steps_per_epoch == 0 or step == total_steps
        if (step % tc.log_every == 0 or saving) and bool(nonfinite):  # never log on or save past a bad step
            raise FloatingPointError(f"non-finite loss at a step <= {step} (since the last check): "
                                     f"{terms.as_floats()} (last sample {batch['tokens']})")
        if step % tc.log_every == 0 or step == total_steps:
            timings = {**timer.read(), "timer": timer.kind}
            now = time.perf_counter()
            record = {"step": step, "epoch": (step - 1) // steps_per_epoch, **terms.as_floats(),
                      "lr": optimizer.param_groups[0]["lr"], "s_per_step": (now - t_last) / tc.log_every,
                      **timings}
            t_last = now
            bar.set_postfix(loss=f"{record['total']:.4f}", feat=f"{record['feature']:.4f}")
            if is_main:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("step %d/%d loss %.4f (lovasz %.4f ce %.4f feat %.4f) lr %.2e teacher %.0f ms",
                         step, total_steps, record["total"], record["lovasz"], record["ce"], record["feature"],
                         record["lr"], record["teacher_ms"])
        if saving:
            ckpt = out_dir / "checkpoints" / f"step_{step:07d}"
            accelerator.save_state(str(ckpt))
            if is_main:
                (ckpt / STATE_FILE).write_text(json.dumps({"step": step}))  # written last: marks it complete
    bar.close()
    accelerator.wait_for_everyone()
    final = out_dir / "student.safetensors"
    if is_main:
        save_student(accelerator.unwrap_model(model), final, cfg, step)
        accelerator.print(f"saved student weights to {final}")
    return final
