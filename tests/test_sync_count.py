"""At most 4 host-device syncs per training step: a real step (live teacher, student forward, losses,
backward, clipping, AdamW) on CPU under the SyncCounter proxy (pop3d/sync_count.py); on CUDA the GPU suite
checks the same with torch.cuda.set_sync_debug_mode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks._synthetic_batch import make_batch
from pop3d.config import load_config
from pop3d.sync_count import SyncCounter

ROOT = Path(__file__).resolve().parents[1]
MAX_SYNCS_PER_STEP = 4


def _config(tmp_path):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "model.tpv_h=10", "model.tpv_w=10", "model.tpv_z=4", "model.dim=16", "model.num_heads=4",
        "model.base_channels=4", "model.stem_channels=8", "model.feature_dim=16", "model.hidden_dims_ft=16",
        "data.student_image_hw=[64, 96]", "teacher.resize_fit=[96, 64]",
        "teacher.random_arch={depth: 50, base_channels: 4, stem_channels: 8, aspp_channels: 16}",
        f"train.output_dir={tmp_path}"])


def _step(model, teacher, optimizer, accelerator, batch, cfg) -> torch.Tensor:
    """The body of the training loop (pop3d/training.py train_step) for one optimiser step."""
    from pop3d.training import compute_loss, seed_sample_draws

    grid_mask_generators = seed_sample_draws(cfg.train.seed, 0, batch["tokens"])
    with accelerator.accumulate(model):
        terms, _ = compute_loss(model, teacher, batch, cfg, None, train=True,
                                grid_mask_generators=grid_mask_generators)
        accelerator.backward(terms.total)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return terms.total.detach()


def _loader_batch(cfg, seeds):
    """A training batch as TrainData's loader delivers it: photometric parameters drawn per sample (host,
    pinned, then moved with the batch), ``n_proj`` on the host; B = len(seeds)."""
    from benchmarks._synthetic_batch import merge_batches
    from pop3d.factory import batch_to_device
    from pop3d.training import photometric_params

    parts = []
    for s in seeds:
        b = make_batch(cfg, seed=s)
        b["photometric"] = photometric_params(cfg.train.seed, 0, b["tokens"][0], 6)[None]
        parts.append(b)
    return batch_to_device(merge_batches(parts), torch.device("cpu"))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_training_step_forces_at_most_four_syncs(tmp_path, batch_size):
    from accelerate import Accelerator

    from pop3d.factory import build_student
    from pop3d.schedule import build_optimizer
    from teacher.live import build_teacher_from_config

    torch.manual_seed(0)
    cfg = _config(tmp_path)
    accelerator = Accelerator(cpu=True)
    model = build_student(cfg).train()
    teacher = build_teacher_from_config(cfg.teacher)
    optimizer = build_optimizer(model, 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = [_loader_batch(cfg, range(10 * s, 10 * s + batch_size)) for s in range(3)]
    assert batches[0]["proj_cam"].numel() > 50  # the cameras see the points: the feature loss is live
    assert batches[0]["images"].shape[0] == batch_size
    _step(model, teacher, optimizer, accelerator, batches[0], cfg)  # warm-up: one-time caches
    for batch, photometric in ((batches[1], False), (batches[2], True)):
        cfg.data.photometric_aug = photometric
        steps = [st["step"] for st in optimizer.optimizer.state.values() if "step" in st]
        with SyncCounter(host_tensors=steps) as sc:  # AdamW's step counters live on the CPU
            loss = _step(model, teacher, optimizer, accelerator, batch, cfg)
        assert torch.isfinite(loss)
        sites = sc.by_site()
        assert sc.total <= MAX_SYNCS_PER_STEP, f"{sc.total} sync-forcing calls per step: {sites}"
        # the photometric parameters come with the batch: applying them reads nothing on the host
        assert not any("pop3d/preprocess.py" in s for s in sites), sites


def test_counter_sees_the_sync_forcing_calls():
    """The proxy counts what it claims to (and nothing for host-only tensors)."""
    x = torch.nn.Parameter(torch.randn(6)).detach()   # created before the mode: a device tensor
    with SyncCounter() as sc:
        bool(x.sum() > 0)
        int(x.argmax())
        x[0].item()
        x[x > 0]
        torch.unique(x)
        x.nonzero()
        y = x.clone()
        y[x > 0] = 0
        torch.tensor([1.0, 2.0], device=x.device)
        x.new_tensor([1.0])
        x[[0, 2]]
        torch.rand(3).to(x.device)
    assert sc.total == 11, sc.by_site()
    with SyncCounter() as host:
        g = torch.Generator().manual_seed(0)
        int(torch.randint(2, 5, (), generator=g))
        (torch.rand(4, generator=g) < 0.5).tolist()
        torch.arange(3).sum().item()
        x * 2 + x.sum()
    assert host.total == 0, host.by_site()
