"""The training loop: a shard batch -> live teacher targets -> student forward -> losses -> AdamW step.

Accelerate owns devices, processes, mixed precision, gradient accumulation and the TensorBoard tracker. What
it does *not* get:

- the data: ``shards/order.py`` plans which samples every (epoch, step, rank, micro-step) reads; a global
  step reads ``world * grad_accum * batch_size`` slots, so the global batch is the same for every
  factorisation of it (processes, accumulation, batch), and a resumed run starts at the right shard and
  sample without decoding anything it skips;
- the random draws: photometric augmentation, GridMask and dropout draw from generators seeded by
  (seed, epoch, sample token); the photometric parameters are drawn in the loader's workers
  (:class:`TrainSampleExtras`) and only applied in the step. The student's initialisation and a random
  teacher are seeded by the config alone. Nothing random lives in a process, so a checkpoint needs no RNG state;
- the checkpoints: ``pop3d/run_state.py`` writes safetensors + JSON atomically and never reads a pickle;
- the teacher: frozen, in eval mode, under ``no_grad``, never in the optimiser, never in a saved state.

Per micro-step (B = train.batch_size samples per process; the official model: 1):

    images uint8 (B,6,3,900,1600) --teacher--> targets (M, C) at proj_rowcol of image proj_batch*6 + proj_cam
    images --prepare_student_inputs (aug with the loader's parameters, caffe norm, pad)-->
        TPVFormer(points=None, features=grid_ind[proj_point] per sample, padded to (B, max M_b, 3))
    loss = mean over the B samples of [lovasz + CE on logits_vox vs occupancy + w * MSE(its M_b features)]

A batch of B equals B separate samples (B accumulation micro-steps at batch 1) in the loss, its gradient and
every random draw except dropout, which draws one mask per batch tensor (tests/test_batch_size.py checks the
equality with dropout off). At B = 1 every number is the one of batch-1 training before batches existed.
Logged losses are global-batch means (mean over micro-steps, then ``accelerator.reduce`` over processes).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pop3d.config import RunConfig, config_to_dict
from pop3d.cuda_setup import TRAIN_KEYS, SpeedConfig, StepTimer, apply_speed_settings, move_batch
from pop3d.factory import build_student, grid_spec_of, save_student  # noqa: F401
from pop3d.schedule import build_optimizer, build_scheduler
from pop3d.train_batch import (  # noqa: F401 (the step's parts, importable from here too)
    TrainSampleExtras,
    compute_loss,
    feature_points,
    photometric_params,
    projection_counts,
    seed_sample_draws,
)
from shards.order import stable_seed

log = logging.getLogger("pop3d.train")

LOSS_NAMES = ("total", "lovasz", "ce", "feature")


class TrainSetupError(ValueError):
    """A run that cannot start as configured (data, output folder, checkpoint); the message says what to do."""


# ---- model pieces -----------------------------------------------------------------------------------------
def build_models(cfg: RunConfig, device: torch.device):
    """Student and teacher, each initialised from a seed derived from the config only (same on every rank)."""
    from pop3d.checkpoint import load_student_weights
    from pop3d.factory import build_run_teacher

    torch.manual_seed(stable_seed(cfg.train.seed, "student-init"))
    model = build_student(cfg)
    if cfg.train.init_weights:
        report = load_student_weights(model, cfg.train.init_weights, kind=cfg.train.init_kind)
        log.info("init weights %s: %s", cfg.train.init_weights, report)
    return model, build_run_teacher(cfg, device)


# ---- data ---------------------------------------------------------------------------------------------------
class TrainData:
    """The planned training stream of this rank (see shards/order.py)."""

    def __init__(self, cfg: RunConfig, rank: int, world: int, device: torch.device | str = "cpu") -> None:
        from shards.loader import list_shards
        from shards.order import PlannedSamples, check_slots, planned_loader, steps_per_epoch
        from shards.verify import shard_index

        d, tc = cfg.data, cfg.train
        self.urls, self.counts = list_shards(d.shards, d.train_split)
        if not self.counts:
            raise TrainSetupError(f"{d.shards}: no manifest.json with sample counts (scripts/build_shards.py "
                                  "writes it)")
        self.rank, self.world, self.accum, self.seed = rank, world, tc.grad_accum_steps, tc.seed
        self.batch_size = tc.batch_size
        self.slots = world * self.accum * self.batch_size  # samples per global step
        self.shuffle_block = d.shuffle_buffer
        try:
            check_slots(len(self.urls), self.slots, f"{d.shards} split {d.train_split!r}")
        except ValueError as exc:
            raise TrainSetupError(str(exc)) from exc
        self.n_samples = sum(self.counts.values())
        self.steps_per_epoch = steps_per_epoch([self.counts[u] for u in self.urls], self.slots)
        self.dataset = PlannedSamples(self.counts, grid_spec_of(cfg), with_eval_gt=False,
                                      index=shard_index(d.shards, d.train_split), batch_size=self.batch_size,
                                      per_sample=TrainSampleExtras(tc.seed, d.photometric_aug))
        speed = cfg.speed or SpeedConfig()
        self.device = torch.device(device)
        self.prefetch = speed.prefetch  # next batch to the GPU on a side stream (pop3d.cuda_setup)
        self.loader = planned_loader(self.dataset, d.num_workers,
                                     pin_memory=speed.pin_memory and self.device.type == "cuda")

    def epoch(self, epoch: int, start_step: int):
        """Yield (step_in_epoch, [micro-batches]) from ``start_step`` to the end of ``epoch``."""
        from shards.order import check_order, train_items

        self.dataset.set_items(train_items(self.urls, self.counts, seed=self.seed, epoch=epoch,
                                           start_step=start_step, rank=self.rank, world=self.world,
                                           accum=self.accum, shuffle_block=self.shuffle_block,
                                           batch_size=self.batch_size))
        from pop3d.cuda_setup import DevicePrefetcher

        it = DevicePrefetcher(self.loader, self.device, TRAIN_KEYS, enabled=self.prefetch)
        for p in range(start_step, self.steps_per_epoch):
            micro = []
            for a in range(self.accum):
                batch = next(it)
                check_order(batch["order"], (epoch, p, a))
                micro.append(batch)
            yield p, micro


# ---- one step -------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    losses: torch.Tensor
    """(4,) float64 on the device: this rank's mean of total, lovasz, ce, feature over its micro-steps."""
    grad_norm: torch.Tensor | float | None
    timings: dict[str, float] = field(default_factory=dict)
    timer: Any = None
    """pop3d.cuda_setup.StepTimer of the step (CUDA events), read only when the step is logged."""
    nonfinite: torch.Tensor | None = None
    """() bool on the device: a micro-step's loss was not finite (read on log and save steps only)."""


def train_step(model, teacher, micro_batches: list[dict[str, Any]], cfg: RunConfig, accelerator, optimizer,
               global_step: int) -> StepResult:
    """Forward/backward over this rank's micro-batches of one global step, then one clipped AdamW step."""
    tc = cfg.train
    sums = torch.zeros(len(LOSS_NAMES), dtype=torch.float64, device=accelerator.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    grad_norm = None
    timer = StepTimer(accelerator.device)  # no host sync here: read by step_record on log steps
    timer.start()
    for batch in micro_batches:
        # the photometric parameters came with the batch (TrainData's loader: TrainSampleExtras)
        grid_mask_generators = seed_sample_draws(tc.seed, batch["order"][0], batch["tokens"])
        batch = move_batch(batch, accelerator.device, TRAIN_KEYS)  # only what the step reads
        with accelerator.accumulate(model):
            terms, _ = compute_loss(model, teacher, batch, cfg, None, train=True, timer=timer,
                                    grid_mask_generators=grid_mask_generators)
            nonfinite |= ~torch.isfinite(terms.total.detach())
            accelerator.backward(terms.total)
            timer.mark("student_bwd")
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timer.mark("optimizer")
        sums += torch.stack([getattr(terms, k).detach() for k in LOSS_NAMES]).double()
    return StepResult(sums / len(micro_batches), grad_norm, {}, timer, nonfinite)


# ---- validation ------------------------------------------------------------------------------------------------
def validation_prompts(cfg: RunConfig):
    from pop3d.evaluate import load_text_prompts, random_text_prompts

    if cfg.eval.text_embeddings:
        return load_text_prompts(cfg.eval.text_embeddings)
    log.warning("validation with RANDOM text embeddings (eval.text_embeddings not set): the semantic mIoU is "
                "meaningless; the occupancy IoU is not")
    return random_text_prompts(cfg.model.feature_dim)


def validate(model, cfg: RunConfig, accelerator, prompts) -> dict[str, float]:
    """Zero-shot metrics on the val split, every rank its own shards, counts summed over processes."""
    from pop3d.evaluate import evaluate
    from shards.order import eval_loader

    loader = eval_loader(cfg.data.shards, cfg.data.val_split, grid_spec_of(cfg), rank=accelerator.process_index,
                         world=accelerator.num_processes, num_workers=cfg.data.num_workers,
                         max_samples=cfg.eval.max_samples)
    m = evaluate(accelerator.unwrap_model(model), loader, prompts, device=accelerator.device,
                 student_image_hw=cfg.data.student_image_hw, normalized_cosine=cfg.eval.normalized_cosine,
                 progress=False, accelerator=accelerator)
    sem, occ, pts = m.semantic.summary(), m.occupancy.summary(), m.points.summary()
    return {"val/miou": sem["miou_present"], "val/miou_official": sem["miou_official"],
            "val/occupancy_iou": 100.0 * float(m.occupancy.iou()[1]), "val/occupancy_miou": occ["miou_present"],
            "val/points_miou": pts["miou_present"], "val/samples": m.samples}


def validation_setup(cfg: RunConfig):
    """Check the val split now (not after the first epoch) and return the prompts validation scores with."""
    from shards.loader import list_shards

    try:
        if not list_shards(cfg.data.shards, cfg.data.val_split)[1]:
            raise ValueError("no manifest.json with sample counts")
    except ValueError as exc:
        raise TrainSetupError(f"validation (train.val_every_epochs={cfg.train.val_every_epochs}) needs the split "
                              f"{cfg.data.val_split!r} of {cfg.data.shards}: {exc}; set data.val_split or "
                              "train.val_every_epochs=0") from exc
    return validation_prompts(cfg)


def validate_and_log(model, cfg: RunConfig, accelerator, prompts, run_log, step: int, epoch: int,
                     best: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation at an epoch end: log the metrics, put the model back in train mode, return the new best."""
    metrics = validate(model, cfg, accelerator, prompts)
    model.train()
    run_log.write({"step": step, "epoch": epoch, **metrics})
    accelerator.print(f"validation after epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if best is None or metrics["val/miou"] > best["miou"]:  # NaN (no class present) never becomes the best
        best = {"step": step, "miou": metrics["val/miou"]}
    return best


# ---- logging ---------------------------------------------------------------------------------------------------
class RunLog:
    """log.jsonl (rank 0), the Python log and accelerate's trackers (TensorBoard)."""

    def __init__(self, out_dir: Path, accelerator) -> None:
        self.path, self.accelerator = out_dir / "log.jsonl", accelerator

    def write(self, record: dict[str, Any]) -> None:
        import json

        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")},
                             step=record["step"])


def step_record(result: StepResult, accelerator, optimizer, step: int, epoch: int, n_steps: int, seconds: float,
                samples_per_step: int) -> dict[str, Any]:
    """The global-batch record of a step (a collective: every rank calls it at the same steps)."""
    losses = accelerator.reduce(result.losses, reduction="mean").tolist()
    timings = result.timings
    if result.timer is not None:
        timings = {**result.timer.read(), "timer": result.timer.kind}
    grad_norm = None if result.grad_norm is None else float(result.grad_norm)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    step_ms = 1e3 * seconds / max(n_steps, 1)
    rec = {"step": step, "epoch": epoch, **dict(zip(LOSS_NAMES, losses)), "lr": optimizer.param_groups[0]["lr"],
           **{f"lr/{k}": v for k, v in lrs.items()}, "samples_per_s": samples_per_step * n_steps / seconds,
           "teacher_share": timings.get("teacher_ms", 0.0) / step_ms if step_ms > 0 else 0.0,
           "grad_norm": grad_norm, **timings}
    return rec


# ---- checkpoints -----------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, model, optimizer, scheduler, out_dir: Path, step: int, epoch: int,
                    best: dict[str, Any] | None, keep: int, slots: int) -> None:
    """Rank 0 writes the checkpoint folder, then deletes all but the newest ``keep`` and the best one."""
    from pop3d.run_state import checkpoint_dir, prune_checkpoints, save_run_state

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = getattr(accelerator, "scaler", None)
        save_run_state(checkpoint_dir(out_dir, step), model_state=accelerator.unwrap_model(model).state_dict(),
                       optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                       scaler_state=scaler.state_dict() if scaler is not None else None, step=step, epoch=epoch,
                       extra={"best": best, "slots": slots})
        prune_checkpoints(out_dir, keep, {best["step"]} if best else set())
    accelerator.wait_for_everyone()


def check_output_dir(out_dir: Path, resume: bool) -> None:
    """A fresh start must not mix with an earlier run's files (checkpoints, log, weights)."""
    from pop3d.run_state import existing_run

    found = existing_run(out_dir)
    if found and not resume:
        raise TrainSetupError(f"{out_dir} already holds a training run ({', '.join(found)}): pass --resume to "
                              "continue it, --overwrite to start again, or set another train.output_dir")


def restore(accelerator, model, optimizer, scheduler, out_dir: Path, log_path: Path, slots: int
            ) -> tuple[int, dict | None]:
    """Load the newest checkpoint (if any); cut log.jsonl back to its step. Returns (step, best)."""
    from pop3d.run_state import list_checkpoints, load_run_state, truncate_log

    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        accelerator.print(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}; starting fresh")
        if accelerator.is_main_process:  # a run killed before its first save: its log starts again too
            truncate_log(log_path, 0)
        return 0, None
    state = load_run_state(ckpts[-1], accelerator.unwrap_model(model), optimizer, scheduler,
                           getattr(accelerator, "scaler", None))
    if state.get("slots") not in (None, slots):
        raise TrainSetupError(f"{ckpts[-1]}: written with a global batch of {state['slots']} (processes x "
                              f"grad_accum_steps x batch_size), this run has {slots}: set train.grad_accum_steps "
                              "or train.batch_size so that they match")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dropped = truncate_log(log_path, state["step"])
        if dropped:
            log.info("log.jsonl: dropped %d record(s) after step %d", dropped, state["step"])
    accelerator.print(f"resumed from {ckpts[-1]} at step {state['step']}")
    return int(state["step"]), state.get("best")


# ---- the run ---------------------------------------------------------------------------------------------------
def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    tc = cfg.train
    # cpu=True on machines without CUDA: only then does accelerate join the gloo process group that
    # `accelerate launch --multi_gpu` / torchrun set up (without it every process trains alone, silently).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps, project_dir=tc.output_dir,
        log_with="tensorboard" if tc.tensorboard else None,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"the launcher started {launched} processes but accelerate joined "
                           f"{accelerator.num_processes}; on CPU-only machines launch with "
                           f"`accelerate launch --multi_gpu --num_processes N` or torchrun")
    return accelerator


@dataclass
class TrainRun:
    """What the epoch loop needs, built once by :func:`setup_run` (the same on every rank)."""

    cfg: RunConfig
    accelerator: Any
    out_dir: Path
    data: TrainData
    total_steps: int
    prompts: Any  # validation prompts, or None without validation
    model: Any  # prepared by accelerate
    teacher: Any
    optimizer: Any
    scheduler: Any
    run_log: RunLog
    slots: int  # samples per global step: processes x grad_accum_steps x batch_size


def prepare_output_dir(cfg: RunConfig, accelerator, resume: bool, overwrite: bool) -> Path:
    """Step 1: delete an earlier run's files if ``overwrite``, refuse a folder holding a run unless ``resume``,
    and write ``config.yaml`` (rank 0). Returns the output folder."""
    out_dir = Path(cfg.train.output_dir)
    if overwrite and accelerator.is_main_process:
        from pop3d.run_state import delete_run

        deleted = delete_run(out_dir)
        if deleted:
            accelerator.print(f"--overwrite: deleted {', '.join(deleted)} in {out_dir}")
    accelerator.wait_for_everyone()
    check_output_dir(out_dir, resume)
    accelerator.wait_for_everyone()  # every rank has checked before rank 0 writes config.yaml into the folder
    if accelerator.is_main_process:
        from p3d_common.atomic import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return out_dir


def setup_run(cfg: RunConfig, accelerator, out_dir: Path) -> TrainRun:
    """Step 2: the data plan and schedule (from the manifest: identical on every rank), the validation prompts,
    the models, the optimiser and the LR schedule."""
    tc = cfg.train
    data = TrainData(cfg, accelerator.process_index, accelerator.num_processes, accelerator.device)
    spe = data.steps_per_epoch
    total_steps = spe * tc.epochs if tc.max_steps is None else min(spe * tc.epochs, tc.max_steps)
    prompts = validation_setup(cfg) if tc.val_every_epochs else None
    model, teacher = build_models(cfg, accelerator.device)
    speed = getattr(cfg, "speed", None) or SpeedConfig()
    accelerator.print(f"speed settings: {apply_speed_settings(speed, accelerator.device, model)}")
    optimizer = build_optimizer(model, tc.lr, tc.backbone_lr_mult, tc.weight_decay)
    scheduler = build_scheduler(optimizer, spe * tc.epochs, tc.warmup_steps, tc.warmup_lr_init, tc.lr_min)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is ours: saved as JSON
    return TrainRun(cfg, accelerator, out_dir, data, total_steps, prompts, model, teacher, optimizer, scheduler,
                    RunLog(out_dir, accelerator), data.slots)


def run_epochs(run: TrainRun, step: int, best: dict[str, Any] | None) -> int:
    """Step 4: from ``step`` to ``run.total_steps``: train steps (log, save), and at each epoch end the
    validation and the epoch-end checkpoint. Returns the last step."""
    from tqdm.auto import tqdm

    tc, accelerator, model, spe = run.cfg.train, run.accelerator, run.model, run.data.steps_per_epoch
    world = accelerator.num_processes
    accelerator.print(
        f"training: {run.data.n_samples} samples, {world} process(es), {spe} steps/epoch, {run.total_steps} steps "
        f"(batch {tc.batch_size} x accum {tc.grad_accum_steps} x {world}), precision {tc.mixed_precision}")
    bar = tqdm(total=run.total_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
    model.train()
    t_last, steps_since = time.perf_counter(), 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # read on log/save steps only
    while step < run.total_steps:
        epoch = step // spe
        for _, micro in run.data.epoch(epoch, step % spe):
            result = train_step(model, run.teacher, micro, run.cfg, accelerator, run.optimizer, step)
            run.scheduler.step()
            step, steps_since = step + 1, steps_since + 1
            bar.update(1)
            nonfinite |= result.nonfinite
            epoch_end = step % spe == 0
            saving = step % tc.save_every == 0 or epoch_end or step == run.total_steps
            if (step % tc.log_every == 0 or saving) and bool(nonfinite):  # never log on or save past it
                raise FloatingPointError(f"non-finite loss at a step <= {step} (since the last check); "
                                         f"last sample {micro[-1]['tokens']}")
            if step % tc.log_every == 0 or step == run.total_steps:
                now = time.perf_counter()
                rec = step_record(result, accelerator, run.optimizer, step, epoch, steps_since, now - t_last,
                                  world * tc.grad_accum_steps * tc.batch_size)
                t_last, steps_since = now, 0
                run.run_log.write(rec)
                bar.set_postfix(loss=f"{rec['total']:.4f}", feat=f"{rec['feature']:.4f}")
            if epoch_end and tc.val_every_epochs and (step // spe) % tc.val_every_epochs == 0:
                best = validate_and_log(model, run.cfg, accelerator, run.prompts, run.run_log, step, epoch, best)
            if saving:
                save_checkpoint(accelerator, model, run.optimizer, run.scheduler, run.out_dir, step, epoch, best,
                                tc.keep_checkpoints, run.slots)
            if step >= run.total_steps:
                break
    bar.close()
    return step


def finish(run: TrainRun, step: int) -> Path:
    """Step 5: rank 0 writes the final student safetensors; the trackers close. Returns its path."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    final = run.out_dir / "student.safetensors"
    if accelerator.is_main_process:
        save_student(accelerator.unwrap_model(run.model), final, run.cfg, step)
        accelerator.print(f"saved student weights to {final}")
    accelerator.end_training()
    return final


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run training as configured; returns the path of the final student safetensors.

    ``resume``: continue from the newest complete checkpoint in ``train.output_dir``; ``overwrite``: delete
    the run files an earlier training wrote there first. Without either, a folder holding a run is refused."""
    if resume and overwrite:
        raise TrainSetupError("--resume and --overwrite exclude each other")
    accelerator = make_accelerator(cfg)
    out_dir = prepare_output_dir(cfg, accelerator, resume, overwrite)
    run = setup_run(cfg, accelerator, out_dir)
    # step 3: the checkpoint, if resuming
    step, best = (restore(accelerator, run.model, run.optimizer, run.scheduler, out_dir, run.run_log.path, run.slots)
                  if resume else (0, None))
    accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1}})
    step = run_epochs(run, step, best)
    return finish(run, step)
