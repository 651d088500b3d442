"""The training recipe and its bookkeeping, against numbers written out here (pipeline.md §3), not our helpers:
data order under N processes and after a resume, tar-level skipping, run-state files, retention, log
truncation, config range checks, and the training loop itself (LR per group, clipping, train mode)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pop3d.config import ConfigError, TrainConfig, load_config
from shards.order import eval_items, stable_seed, steps_per_epoch, train_items

ROOT = Path(__file__).resolve().parents[1]


# ---- data order ------------------------------------------------------------------------------------------------
def _fake_shards(sizes):
    urls = [f"/s/train-{i:06d}.tar" for i in range(len(sizes))]
    return urls, dict(zip(urls, sizes))


def _global_batches(urls, counts, world, accum, epoch, start=0, block=0):
    """{step: sorted (shard, index) of the whole global batch} from every rank's items."""
    out: dict[int, list] = {}
    for r in range(world):
        for url, idx, (e, p, a) in train_items(urls, counts, seed=7, epoch=epoch, start_step=start, rank=r,
                                               world=world, accum=accum, shuffle_block=block):
            assert e == epoch
            out.setdefault(p, []).append((url, idx))
    return {p: sorted(v) for p, v in out.items()}


@pytest.mark.parametrize("sizes", [[4] * 8, [5, 5, 5, 3, 5, 5, 2, 5, 5]])
@pytest.mark.parametrize("block", [0, 3])
def test_same_global_batches_on_1_2_4_processes(sizes, block):
    urls, counts = _fake_shards(sizes)
    for epoch in (0, 3):
        ref = _global_batches(urls, counts, 1, 4, epoch, block=block)
        assert _global_batches(urls, counts, 2, 2, epoch, block=block) == ref
        assert _global_batches(urls, counts, 4, 1, epoch, block=block) == ref
        used = Counter(x for batch in ref.values() for x in batch)
        assert max(used.values()) == 1  # no sample twice in an epoch
        assert all(len(b) == 4 for b in ref.values())
    assert _global_batches(urls, counts, 4, 1, 0) != _global_batches(urls, counts, 4, 1, 1)  # reshuffled


def test_steps_per_epoch_under_n_processes():
    # 4 shards of 4: 16 samples -> 16 / (world * accum) steps
    assert [steps_per_epoch([4] * 4, s) for s in (1, 2, 4)] == [16, 8, 4]
    # the paper: 28,130 train samples in shards of 64 (439 full + one of 34) on 8 GPUs: every slot holds at
    # least 54 full shards + the short one -> 3,490 steps (the original's DistributedSampler: 3,516)
    sizes = [64] * 439 + [34]
    assert sum(sizes) == 28130
    assert steps_per_epoch(sizes, 8) == 54 * 64 + 34
    urls, counts = _fake_shards(sizes)
    for r in (0, 7):
        items = train_items(urls, counts, seed=0, epoch=2, start_step=0, rank=r, world=8, accum=1)
        assert len(items) == 54 * 64 + 34


@pytest.mark.parametrize("block", [0, 4])
def test_resumed_order_is_the_tail_of_the_full_order(block):
    urls, counts = _fake_shards([3, 4, 5, 4, 3])
    for world, accum in ((1, 1), (1, 2), (2, 1)):
        for rank in range(world):
            full = train_items(urls, counts, seed=1, epoch=1, start_step=0, rank=rank, world=world, accum=accum,
                               shuffle_block=block)
            for k in (1, 3, 5):
                tail = train_items(urls, counts, seed=1, epoch=1, start_step=k, rank=rank, world=world,
                                   accum=accum, shuffle_block=block)
                assert tail == full[k * accum:]


def test_block_shuffle_mixes_across_shards_within_blocks():
    from shards.order import block_permutation

    perm = block_permutation(10, 4, seed=0, epoch=0, slot=0)
    assert sorted(perm) == list(range(10))
    assert [sorted(perm[i:i + 4]) for i in (0, 4, 8)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert perm != list(range(10)) and perm != block_permutation(10, 4, seed=0, epoch=1, slot=0)
    urls, counts = _fake_shards([2] * 6)  # one slot: 12 positions over 6 shards, blocks of 6 span 3 shards
    items = train_items(urls, counts, seed=0, epoch=0, start_step=0, rank=0, world=1, accum=1, shuffle_block=6)
    first_block = [u for u, _, _ in items[:6]]
    assert len(set(first_block)) == 3 and first_block != sorted(first_block, key=first_block.index)


def test_eval_items_split_shards_and_respect_max_samples():
    urls, counts = _fake_shards([2, 3, 2])
    one = eval_items(urls, counts, rank=0, world=1, max_samples=5)
    two = [x for r in (0, 1) for x in eval_items(urls, counts, rank=r, world=2, max_samples=5)]
    assert sorted(x[2] for x in two) == [x[2] for x in one] == [(i,) for i in range(5)]
    assert {x[0] for x in eval_items(urls, counts, rank=1, world=2)} == {urls[1]}  # rank 1: shard 1 only


def test_stable_seed_is_fixed_and_distinct():
    import hashlib

    want = int.from_bytes(hashlib.blake2b(b"0/1/tok/model", digest_size=8).digest(), "little") >> 1
    assert stable_seed(0, 1, "tok", "model") == want
    assert len({stable_seed(0, e, t) for e in range(3) for t in "abc"}) == 9


def test_resume_skips_at_the_tar_level_without_decoding(shard_root, monkeypatch):
    from shards import loader
    from shards.geometry import GridSpec
    from shards.order import PlannedSamples, planned_loader

    urls, counts = loader.list_shards(shard_root, "train")
    decoded = []
    real = loader.process_sample
    monkeypatch.setattr(loader, "process_sample", lambda f, *a, **k: decoded.append(f["__key__"]) or real(f, *a, **k))
    ds = PlannedSamples(counts, GridSpec(size=(10, 10, 4)), with_eval_gt=False)
    full = train_items(urls, counts, seed=0, epoch=0, start_step=0, rank=0, world=1, accum=1)
    ds.set_items(train_items(urls, counts, seed=0, epoch=0, start_step=3, rank=0, world=1, accum=1))
    batches = list(planned_loader(ds, num_workers=0))
    assert [b["order"] for b in batches] == [(0, 3, 0)]
    assert decoded == batches[0]["tokens"]  # only the sample that is used was decoded
    # and it is the sample the uninterrupted order has at step 3
    ds.set_items(full)
    assert [b["tokens"][0] for b in planned_loader(ds, num_workers=0)][3] == batches[0]["tokens"][0]


def test_too_few_shards_for_the_slots_is_refused(shard_root, tmp_path):
    from pop3d.training import TrainData

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}", "train.grad_accum_steps=4"])
    with pytest.raises(ValueError, match="2 training shard\\(s\\) for 4 slots"):
        TrainData(cfg, 0, 1)
    assert TrainData(load_config(ROOT / "configs" / "tiny.yaml", [f"data.shards={shard_root}"]), 1, 2
                     ).steps_per_epoch == 2


# ---- run state ---------------------------------------------------------------------------------------------------
def test_optimizer_and_scheduler_round_trip_bit_exactly(tmp_path):
    from pop3d.run_state import load_run_state, save_run_state
    from pop3d.schedule import build_optimizer, build_scheduler

    def setup():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"img_backbone": torch.nn.Linear(4, 3), "head": torch.nn.Linear(3, 2)})
        opt = build_optimizer(m, 1e-2)
        return m, opt, build_scheduler(opt, 20, 3, 1e-4, 1e-6)

    def step(m, opt, sched, seed):
        g = torch.Generator().manual_seed(seed)
        loss = m["head"](m["img_backbone"](torch.randn(5, 4, generator=g))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    a = setup()
    for s in range(4):
        step(*a, s)
    save_run_state(tmp_path / "step_0000004", model_state=a[0].state_dict(), optimizer_state=a[1].state_dict(),
                   scheduler_state=a[2].state_dict(), scaler_state=None, step=4, epoch=0)
    b = setup()
    state = load_run_state(tmp_path / "step_0000004", *b)
    assert state["step"] == 4
    for s in range(4, 7):
        step(*a, s)
        step(*b, s)
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))
    assert [g["lr"] for g in a[1].param_groups] == [g["lr"] for g in b[1].param_groups]


def test_prune_keeps_last_k_plus_best_and_leaves_foreign_folders(tmp_path):
    from pop3d.run_state import checkpoint_dir, list_checkpoints, prune_checkpoints, save_run_state

    for s in (2, 4, 6, 8, 10):
        save_run_state(checkpoint_dir(tmp_path, s), model_state={"w": torch.zeros(1)},
                       optimizer_state={"state": {}, "param_groups": []}, scheduler_state={}, scaler_state=None,
                       step=s, epoch=0)
    foreign = tmp_path / "checkpoints" / "step_0000001"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text("{}")  # not ours: no format tag
    prune_checkpoints(tmp_path, 2, {4})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000008", "step_0000010"]
    assert foreign.is_dir()


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    from pop3d.run_state import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6, "tot')
    assert truncate_log(log, 3) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.feature_loss_weight=-5", "train.feature_loss_weight"), ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"), ("train.lr=nan", "train.lr"), ("train.grad_max_norm=-1", "train.grad_max_norm"),
    ("train.grad_max_norm=0", "train.grad_max_norm"), ("train.lr_min=5", "train.lr_min"),
    ("train.warmup_steps=-3", "train.warmup_steps"), ("train.seed=-1", "train.seed"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.backbone_lr_mult=.nan", "train.backbone_lr_mult"),
    ("train.warmup_lr_init=0", "train.warmup_lr_init"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.val_every_epochs=-1", "train.val_every_epochs"), ("train.max_steps=0", "train.max_steps"),
    ("train.epochs=0", "train.epochs"), ("data.num_workers=-1", "data.num_workers"),
    ("data.student_image_hw=[0, 10]", "data.student_image_hw"), ("eval.max_samples=0", "eval.max_samples"),
    ("data.shuffle_buffer=-2", "data.shuffle_buffer"),
])
def test_config_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"tiny.yaml: {key.replace('.', '[.]')}: "):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_config_accepts_yaml_exponent_without_dot():
    assert load_config(ROOT / "configs" / "tiny.yaml", ["train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.parametrize("override", ["train.lr=nan", "train.batch_size=0"])
def test_cli_bad_value_is_one_line_exit_2(override):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--set", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert override.split("=")[0] in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_text_class_id_outside_lidarseg_ids_is_refused():
    from pop3d.evaluate import prompts_from_raw

    with pytest.raises(ValueError, match=r"class id\(s\) \[-1\]"):
        prompts_from_raw(torch.randn(2, 4), torch.tensor([3, -1]))


# ---- the recipe, in the real loop --------------------------------------------------------------------------------
def test_paper_recipe_defaults():
    tc = TrainConfig()
    assert (tc.lr, tc.backbone_lr_mult, tc.weight_decay, tc.grad_max_norm) == (1e-4, 0.1, 0.01, 35.0)
    assert (tc.warmup_steps, tc.warmup_lr_init, tc.lr_min, tc.feature_loss_weight) == (500, 1e-5, 1e-6, 1.0)
    assert (tc.epochs, tc.batch_size, tc.mixed_precision) == (12, 1, "no")


def test_training_loop_recipe(shard_root, tmp_path, monkeypatch):
    """LR of each group at every step (timm cosine with warm-up, backbone at 0.1x, written out here), AdamW
    wd 0.01 betas (0.9, 0.999), clipping to 35 under large gradients, model and dropout in train mode."""
    from pop3d import training

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.shards={shard_root}", f"train.output_dir={tmp_path}", "data.num_workers=0", "train.max_steps=3",
        "train.warmup_steps=2", "train.val_every_epochs=0", "train.tensorboard=false",
        "train.feature_loss_weight=1e5"])
    seen = []
    real_step = training.train_step

    def spy(model, teacher, micro, cfg_, accelerator, optimizer, global_step):
        inner = accelerator.unwrap_model(model)
        names = {id(p): n for n, p in inner.named_parameters()}
        dropouts = [m for m in inner.modules() if isinstance(m, torch.nn.Dropout)]
        rec = {"train": model.training and inner.grid_mask.training and all(m.training for m in dropouts),
               "n_dropout": len(dropouts), "p": min(m.p for m in dropouts)}

        def hook(opt, args, kwargs):
            norms = [p.grad.double().norm() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            rec["clipped_norm"] = float(torch.stack(norms).norm())
            rec["groups"] = [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"], g["betas"],
                              g["eps"]) for g in opt.param_groups]
            rec["type"] = type(opt).__name__

        handle = optimizer.optimizer.register_step_pre_hook(hook)
        result = real_step(model, teacher, micro, cfg_, accelerator, optimizer, global_step)
        handle.remove()
        rec["grad_norm"] = result.grad_norm
        seen.append(rec)
        return result

    monkeypatch.setattr(training, "train_step", spy)
    training.train(cfg)
    total = 4 * cfg.train.epochs  # 4 training samples, one process: the schedule spans all epochs

    def lr(t, base):  # timm CosineLRScheduler, t_in_epochs=False, warmup inside t_initial (pipeline.md §3.4)
        if t < 2:
            return 1e-5 + t * (base - 1e-5) / 2
        return 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * t / total))

    assert len(seen) == 3
    for k, rec in enumerate(seen, start=1):
        assert rec["train"] and rec["n_dropout"] > 0 and rec["p"] == pytest.approx(0.1)
        assert rec["type"] == "AdamW"
        assert rec["grad_norm"] > 35 and rec["clipped_norm"] == pytest.approx(35.0, rel=1e-4)
        for names, got_lr, wd, betas, eps in rec["groups"]:
            backbone = {n.startswith("img_backbone.") for n in names}
            assert len(backbone) == 1  # a group is all-backbone or backbone-free
            base = 2e-3 * (0.1 if backbone.pop() else 1.0)
            assert got_lr == pytest.approx(lr(k - 1, base), rel=1e-12), (k, names and min(names))
            assert (wd, tuple(betas), eps) == (0.01, (0.9, 0.999), 1e-8)


def test_fresh_start_over_an_existing_run_is_refused(tmp_path):
    from pop3d.run_state import checkpoint_dir, save_run_state

    save_run_state(checkpoint_dir(tmp_path, 5), model_state={"w": torch.zeros(1)},
                   optimizer_state={"state": {}, "param_groups": []}, scheduler_state={}, scaler_state=None,
                   step=5, epoch=0)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--set", f"train.output_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr and "Traceback" not in proc.stderr
    assert checkpoint_dir(tmp_path, 5).is_dir()
