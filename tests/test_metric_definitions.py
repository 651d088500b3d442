"""The three metric definitions that must equal the original POP-3D evaluation's, each against an independent
reference written here (numpy / float64, scikit-learn):

- the free/occupied GT of ``vox_agn_all`` (semantic-ignore voxels count as occupied, also where unobserved);
- cosine zero-shot assignment normalises BOTH the features and the text embeddings;
- the AP of a retrieval sample with no relevant point is 0.0 (scikit-learn) and counts in the split mean.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pop3d.evaluate import TextPrompts, evaluate, occupancy_gt
from pop3d.metrics import average_precision, zero_shot_classes
from pop3d.model.tpvformer import StudentOutput
from pop3d.retrieval import SampleResult, sample_aps, summarize

# ---------------------------------------------------------------------------------------------------------
# (a) occupancy GT of vox_agn_all
# ---------------------------------------------------------------------------------------------------------


def original_occupancy_gt(eval_gt: np.ndarray, voxel_label: np.ndarray) -> np.ndarray:
    """The original eval's steps on a copy of the ray-cast GT, in its order (numpy)."""
    occ = eval_gt.astype(np.int64).copy()
    occ[eval_gt != 255] = 1          # observed voxels: occupied ...
    occ[voxel_label == 0] = 1        # ... and the semantic-ignore voxels, observed or not ...
    occ[eval_gt == 17] = 0           # ... except observed free ones
    return occ


def iou_np(pred: np.ndarray, gt: np.ndarray, classes, ignore: int) -> np.ndarray:
    keep = gt != ignore
    p, g = pred[keep], gt[keep]
    out = []
    for c in classes:
        inter = np.sum((p == c) & (g == c), dtype=np.float64)
        union = np.sum((p == c) | (g == c), dtype=np.float64)
        out.append(inter / union if np.any(g == c) else np.nan)
    return np.array(out)


def test_occupancy_gt_follows_the_original_rule_on_every_label_combination():
    eval_vals = np.array([1, 5, 16, 17, 255], dtype=np.uint8)
    vox_vals = np.array([0, 1, 9, 16, 17], dtype=np.uint8)
    e, v = (a.ravel() for a in np.meshgrid(eval_vals, vox_vals, indexing="ij"))
    got = occupancy_gt(torch.from_numpy(e).long(), torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, original_occupancy_gt(e, v))
    # the case the old rule got wrong: unobserved by the ray cast, semantic label 'ignore' -> occupied
    assert got[(e == 255) & (v == 0)].tolist() == [1]
    assert got[(e == 17) & (v == 0)].tolist() == [0]
    rng = np.random.default_rng(0)
    e = rng.choice(eval_vals, size=(6, 5, 4))
    v = rng.choice(vox_vals, size=(6, 5, 4))
    got = occupancy_gt(torch.from_numpy(e).long(), torch.from_numpy(v)).numpy()
    np.testing.assert_array_equal(got, original_occupancy_gt(e, v))


class _FixedOutputs(torch.nn.Module):
    """Stands in for the student: seeded random logits and features of the right shapes."""

    def __init__(self, grid_size, dim: int):
        super().__init__()
        self.grid_size, self.dim = tuple(grid_size), dim
        self.calls: list[StudentOutput] = []

    def forward(self, imgs, lidar2img, img_shape, points=None, features=None, voxel_features=True):
        g = torch.Generator().manual_seed(len(self.calls))
        x, y, z = self.grid_size
        out = StudentOutput(
            logits_vox=torch.randn(1, 2, x, y, z, generator=g),
            logits_vox_fts=torch.randn(1, self.dim, x, y, z, generator=g),
            logits_pts_fts=torch.randn(1, features.shape[1], self.dim, generator=g))
        self.calls.append(out)
        return out


def test_evaluate_scores_occupancy_against_the_original_gt(shard_root):
    from shards.geometry import GridSpec
    from shards.loader import make_loader

    grid = GridSpec(pc_min=(-51.2, -51.2, -5.0), pc_max=(51.2, 51.2, 3.0), size=(25, 25, 4))
    dim = 6
    g = torch.Generator().manual_seed(7)
    prompts = TextPrompts(torch.randn(16, dim, generator=g), torch.arange(1, 17), 0)
    model = _FixedOutputs(grid.size, dim)
    m = evaluate(model, make_loader(shard_root, "val", num_workers=0, grid=grid, eval_gt=True), prompts,
                 device=torch.device("cpu"), student_image_hw=(32, 64), max_samples=2, progress=False)
    batches = list(make_loader(shard_root, "val", num_workers=0, grid=grid, eval_gt=True))[:2]
    preds, gts = [], []
    affected = 0
    for out, batch in zip(model.calls, batches):
        e = batch["eval_gt"][0].numpy()
        v = batch["voxel_label"][0].numpy()
        preds.append((out.logits_vox[0].numpy().argmax(0) == 1).astype(np.int64))
        gts.append(original_occupancy_gt(e, v))
        affected += int(np.sum((e == 255) & (v == 0)))
    ref = iou_np(np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in gts]), [0, 1], 255)
    np.testing.assert_allclose(m.occupancy.iou().numpy(), ref, rtol=0, atol=1e-12)
    assert affected > 0  # the synthetic val samples hold voxels where the two rules differ


# ---------------------------------------------------------------------------------------------------------
# (b) cosine zero-shot assignment
# ---------------------------------------------------------------------------------------------------------


def test_cosine_assignment_normalises_features_and_text():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(400, 16))
    text = rng.normal(size=(9, 16)) * rng.uniform(0.2, 5.0, size=(9, 1))   # rows far from unit norm
    prompt_class = np.array([1, 1, 3, 3, 3, 7, 10, 16, 16])
    fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    tn = text / np.linalg.norm(text, axis=1, keepdims=True)
    ref = prompt_class[np.argmax(fn @ tn.T, axis=1)]
    got = zero_shot_classes(torch.from_numpy(feats).float(), torch.from_numpy(text).float(),
                            torch.from_numpy(prompt_class), normalized_cosine=True).numpy()
    np.testing.assert_array_equal(got, ref)
    features_only = prompt_class[np.argmax(fn @ text.T, axis=1)]
    assert np.mean(features_only != ref) > 0.1          # the old rule would have been caught
    # the default stays the raw dot product with the text as stored (the original's default)
    raw = zero_shot_classes(torch.from_numpy(feats).float(), torch.from_numpy(text).float(),
                            torch.from_numpy(prompt_class)).numpy()
    np.testing.assert_array_equal(raw, prompt_class[np.argmax(feats @ text.T, axis=1)])


# ---------------------------------------------------------------------------------------------------------
# (c) retrieval AP without a relevant point
# ---------------------------------------------------------------------------------------------------------


def _sklearn_ap(rel: np.ndarray, scores: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "No positive class found in y_true": it returns 0.0
        return float(average_precision_score(rel, scores))


def test_ap_without_relevant_point_is_zero_and_counts_in_the_mean():
    g = torch.Generator().manual_seed(5)
    results, ref_all, ref_vis = [], [], []
    for i in range(6):
        n = 200
        scores = torch.randn(n, generator=g)
        rel = torch.rand(n, generator=g) < 0.1
        if i in (1, 4):
            rel[:] = False                                   # no relevant point at all
        proj = torch.randint(0, n, (150,), generator=g)
        if i == 2:
            rel[:] = False
            rel[[j for j in range(n) if j not in set(proj.tolist())][:3]] = True   # relevant, never visible
        ap_all, ap_vis, _ = sample_aps(scores, rel, proj)
        ref_all.append(_sklearn_ap(rel.numpy(), scores.numpy()))
        ref_vis.append(_sklearn_ap(rel[proj].numpy(), scores[proj].numpy()))
        assert ap_all == pytest.approx(ref_all[-1], abs=1e-12) and ap_vis == pytest.approx(ref_vis[-1], abs=1e-12)
        results.append(SampleResult("val", f"t{i}", "q", ap_all, ap_vis, None, n, int(rel.sum()), 150, 0))
    assert ref_all[1] == ref_all[4] == 0.0 and ref_vis[2] == 0.0
    (s,) = summarize(results, ["val"])
    assert s.samples == 6
    assert s.pop3d_map == pytest.approx(100 * np.mean(ref_all), abs=1e-9)
    assert s.pop3d_map_visible == pytest.approx(100 * np.mean(ref_vis), abs=1e-9)
    assert s.undefined["mAP"] == 0 and s.undefined["mAP visible"] == 0
    assert average_precision(torch.rand(5), torch.zeros(5, dtype=torch.bool)) == 0.0
