"""pop3d.cuda_setup on CPU: channels_last student = same outputs, the prefetcher moves only the step's
tensors, the host step timer, the speed section of the config."""
from __future__ import annotations

from pathlib import Path

import torch

from pop3d.config import load_config
from pop3d.cuda_setup import (
    TRAIN_KEYS,
    DevicePrefetcher,
    SpeedConfig,
    StepTimer,
    apply_speed_settings,
    move_batch,
    prepare_student,
)
from tests._student_refs import micro_config, random_rig

ROOT = Path(__file__).resolve().parents[1]


def test_channels_last_student_gives_the_same_outputs():
    from pop3d.model.tpvformer import TPVFormer

    torch.manual_seed(0)
    ref = TPVFormer(micro_config(grid_mask=False)).eval()
    fast = TPVFormer(micro_config(grid_mask=False)).eval()
    fast.load_state_dict(ref.state_dict())
    info = prepare_student(fast, SpeedConfig(channels_last=True, compile_backbone=False))
    assert info == {"channels_last": True}
    assert fast.img_backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    imgs = torch.randn(1, 6, 3, 64, 96)
    l2i = random_rig(1, 6, 64, 96)
    feats = torch.rand(1, 20, 3) * torch.tensor([8.0, 6.0, 4.0])
    with torch.no_grad():
        a = ref(imgs, l2i, points=None, features=feats)
        b = fast(imgs, l2i, points=None, features=feats)
    for k, v in a.as_dict().items():
        if v is not None:
            torch.testing.assert_close(b.as_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_speed_settings_are_cpu_noops():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    assert apply_speed_settings(SpeedConfig(), torch.device("cpu")) == {"device": "cpu"}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_prefetcher_moves_only_the_step_tensors():
    batch = {"images": torch.zeros(1, 6, 3, 4, 4, dtype=torch.uint8), "grid_ind": [torch.zeros(3, 3)],
             "points": [torch.zeros(3, 4)], "eval_gt": torch.zeros(2, 2), "tokens": ["a"], "img_hw": (4, 4)}
    moved = move_batch(batch, torch.device("meta"), TRAIN_KEYS)
    assert moved["images"].device.type == "meta" and moved["grid_ind"][0].device.type == "meta"
    assert moved["points"][0].device.type == "cpu" and moved["eval_gt"].device.type == "cpu"
    assert moved["tokens"] == ["a"] and moved["img_hw"] == (4, 4)
    got = list(DevicePrefetcher(iter([batch, batch]), torch.device("cpu")))
    assert len(got) == 2 and got[0]["images"] is batch["images"]


def test_host_step_timer():
    t = StepTimer("cpu")
    t.start()
    sum(range(10000))
    t.mark("teacher")
    t.mark("student_fwd")
    got = t.read()
    assert t.kind == "host" and set(got) == {"teacher_ms", "student_fwd_ms"} and got["teacher_ms"] >= 0


def test_speed_section_in_the_paper_config():
    cfg = load_config(ROOT / "configs" / "pop3d_12ep.yaml", ["teacher.weights=null"])
    assert isinstance(cfg.speed, SpeedConfig) and cfg.speed.compile_backbone and cfg.speed.tf32
    assert cfg.teacher.compile is True
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.speed == SpeedConfig()
