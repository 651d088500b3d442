"""Independent float64 references used by the student tests (explicit loops, no grid_sample)."""
from __future__ import annotations

import math

import torch
from _paths import FIXTURES

from pop3d.model import StudentConfig

FIXTURE = str(FIXTURES / "student_tiny")


def bilinear_ref(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img (C, H, W); pixel coordinates (y, x) -> (C,). CUDA-kernel rules: 0 unless -1 < y < H and -1 < x < W,
    then each of the 4 corners contributes only when inside the image (zero padding per corner)."""
    c, h, w = img.shape
    out = img.new_zeros(c)
    if not (-1 < y < h and -1 < x < w):
        return out
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < h and 0 <= xx < w:
            out = out + wt * img[:, yy, xx]
    return out


def msda_reference(value, shapes, loc, attn) -> torch.Tensor:
    """value (Bv,S,M,D), loc (Bv,Q,M,L,P,2), attn (Bv,Q,M,L,P) -> (Bv,Q,M*D), float64 loops."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    bv, _, m, d = value.shape
    q, npt = loc.shape[1], loc.shape[4]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(bv, q, m, d, dtype=torch.float64)
    for b in range(bv):
        for lvl, (h, w) in enumerate(shapes):
            img_all = value[b, starts[lvl]:starts[lvl + 1]].reshape(h, w, m, d)
            for hd in range(m):
                img = img_all[:, :, hd].permute(2, 0, 1)
                for qi in range(q):
                    for p in range(npt):
                        x = float(loc[b, qi, hd, lvl, p, 0]) * w - 0.5
                        y = float(loc[b, qi, hd, lvl, p, 1]) * h - 0.5
                        out[b, qi, hd] += attn[b, qi, hd, lvl, p] * bilinear_ref(img, y, x)
    return out.reshape(bv, q, m * d)


def dcn_reference(x, weight, offset, mask, stride=1, padding=1, dilation=1) -> torch.Tensor:
    """Modulated deformable conv from 9 per-tap bilinear samples. x (1,C,H,W), weight (O,C,3,3),
    offset (1,18,Ho,Wo) as (dy, dx) per tap k = i*3 + j, mask (1,9,Ho,Wo) -> (1,O,Ho,Wo), float64."""
    x, weight, offset, mask = x.double(), weight.double(), offset.double(), mask.double()
    c = x.shape[1]
    o = weight.shape[0]
    ho, wo = offset.shape[-2:]
    out = torch.zeros(1, o, ho, wo, dtype=torch.float64)
    for oy in range(ho):
        for ox in range(wo):
            cols = []
            for i in range(3):
                for j in range(3):
                    k = i * 3 + j
                    py = oy * stride - padding + i * dilation + float(offset[0, 2 * k, oy, ox])
                    px = ox * stride - padding + j * dilation + float(offset[0, 2 * k + 1, oy, ox])
                    cols.append(bilinear_ref(x[0], py, px) * mask[0, k, oy, ox])
            col = torch.stack(cols, -1)  # (C, 9)
            out[0, :, oy, ox] = torch.einsum("ck,ock->o", col, weight.reshape(o, c, 9))
    return out


def micro_config(**kw) -> StudentConfig:
    """A config even smaller than the fixture, for fast behavioural tests."""
    base = {"tpv_h": 6, "tpv_w": 8, "tpv_z": 4, "dim": 16, "levels": 4, "num_points_in_pillar": (2, 4, 4),
            "num_points": (4, 8, 8), "base_channels": 4, "num_layers": 1, "feature_dim": 8, "hidden_dims_ft": 12,
            "depth": 50, "num_heads": 4}
    base.update(kw)
    return StudentConfig(**base)


def random_rig(b: int = 1, n: int = 6, h: int = 32, w: int = 64, seed: int = 0) -> torch.Tensor:
    """(B, N, 4, 4) lidar2img of N cameras looking outward around the ego, intrinsics for an (h, w) image."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(b):
        per = []
        for i in range(n):
            yaw = 2 * math.pi * i / n + 0.1 * float(torch.rand((), generator=g))
            # camera axes: z forward (yaw direction), x right, y down
            fwd = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
            right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
            down = torch.tensor([0.0, 0.0, -1.0])
            rot = torch.stack([right, down, fwd])  # lidar -> cam
            t = -rot @ torch.tensor([0.5, 0.0, 1.5])
            ext = torch.eye(4)
            ext[:3, :3], ext[:3, 3] = rot, t
            k = torch.eye(4)
            k[0, 0] = k[1, 1] = w / 2
            k[0, 2], k[1, 2] = w / 2, h / 2
            per.append(k @ ext)
        mats.append(torch.stack(per))
    return torch.stack(mats)


def ica_forward_loop(ica, query: torch.Tensor, value: torch.Tensor, reference_points_cams: list[torch.Tensor],
                     tpv_masks: list[torch.Tensor], spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """``TPVImageCrossAttention`` ``ica`` run as the original per-camera loop (B = 1 semantics: sample 0's mask
    for all samples), the oracle of its vectorised forward.

    query (B, sum(plane sizes), C), value (B*N, S, C), reference_points_cams [(B, N, nq, D, 2)] and tpv_masks
    [(B, N, nq, D)] per plane -> (B, sum(plane sizes), C)."""
    bs, _, c = query.shape
    n_cam = ica.num_cams
    planes = torch.split(query, ica.plane_sizes, dim=1)
    indexes, q_rb, ref_rb = [], [], []
    for p, ref, mask in zip(planes, reference_points_cams, tpv_masks):
        idx = [mask[0, i].sum(-1).nonzero().squeeze(-1) for i in range(n_cam)]
        max_len = max(len(x) for x in idx)
        qr = p.new_zeros(bs * n_cam, max_len, c)
        rr = ref.new_zeros(bs * n_cam, max_len, ref.shape[3], 2)
        for i in range(n_cam):
            for j in range(bs):
                qr[j * n_cam + i, :len(idx[i])] = p[j, idx[i]]
                rr[j * n_cam + i, :len(idx[i])] = ref[j, i, idx[i]]
        indexes.append(idx)
        q_rb.append(qr)
        ref_rb.append(rr)
    outs = ica.deformable_attention(q_rb, value, ref_rb, spatial_shapes)
    slots = []
    for p, idx, out, mask in zip(planes, indexes, outs, tpv_masks):
        slot = torch.zeros_like(p, dtype=out.dtype)
        for i in range(n_cam):
            for j in range(bs):
                slot[j, idx[i]] += out[j * n_cam + i, :len(idx[i])]
        count = (mask.sum(-1) > 0).sum(1).clamp(min=1)
        slots.append(slot / count[..., None])
    slots = ica.output_proj(torch.cat(slots, 1))
    return ica.dropout(slots) + query
