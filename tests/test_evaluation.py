"""Evaluation helpers on synthetic cases whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_kernels.evaluation import (choose_k, color_segmentation, kmeans, kmeans_segmentation, miou,
                                         pool_to_grid, positional_r2, silhouette_score, upsample_labels)


def _seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=rng))


def _blobs(rng, k=3, per=40, dim=4, spread=0.05):
    g = np.random.default_rng(_seed(rng))
    centres = g.normal(size=(k, dim)) * 3
    truth = np.repeat(np.arange(k), per)
    x = centres[truth] + spread * g.normal(size=(k * per, dim))
    perm = g.permutation(len(x))
    return x[perm], truth[perm]


def _same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_blobs(rng):
    x, truth = _blobs(rng)
    res = kmeans(x, 3, seed=_seed(rng))
    assert _same_partition(res.labels, truth)
    assert res.centers.shape == (3, 4) and res.labels.dtype == np.int64
    # inertia is the sum of squared distances to the assigned centres
    assert res.inertia == pytest.approx(float(((x - res.centers[res.labels]) ** 2).sum()))
    # seeded: identical results; torch input accepted
    again = kmeans(torch.from_numpy(x), 3, seed=7)
    assert np.array_equal(kmeans(x, 3, seed=7).labels, again.labels)


def test_kmeans_edge_cases(rng):
    x = np.zeros((5, 2))
    res = kmeans(x, 2, seed=0)  # identical points: no NaN, every label valid
    assert np.isfinite(res.centers).all() and set(res.labels) <= {0, 1}
    assert kmeans(np.arange(4.0)[:, None], 4, seed=0).inertia == pytest.approx(0.0)
    with pytest.raises(ValueError, match="k"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="exceeds"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.array([[np.nan, 0.0], [1.0, 1.0]]), 1)
    with pytest.raises(TypeError, match="x"):
        kmeans([[0.0]], 1)


def test_silhouette_matches_direct_formula(rng):
    g = np.random.default_rng(_seed(rng))
    x = g.normal(size=(37, 3))
    labels = g.integers(0, 4, size=37)
    labels[:4] = np.arange(4)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))  # dense reference (test only)
    s = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            s.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == c].mean() for c in set(labels.tolist()) if c != labels[i])
        s.append((b - a) / max(a, b))
    assert silhouette_score(x, labels, block=5) == pytest.approx(np.mean(s), abs=1e-10)
    with pytest.raises(ValueError, match="clusters"):
        silhouette_score(x, np.zeros(37, int))


def test_choose_k_finds_blob_count(rng):
    for k_true in (2, 4):
        x, truth = _blobs(rng, k=k_true, per=25)
        k, res, scores = choose_k(x, range(2, 7), seed=_seed(rng))
        assert k == k_true and _same_partition(res.labels, truth)
        assert set(scores) == set(range(2, 7))


def test_kmeans_segmentation_of_grid_halves(rng):
    g = np.random.default_rng(_seed(rng))
    h, w = 6, 8
    e = np.zeros((h, w, 3))
    e[:, : w // 2, 1] = 1.0
    e[:, w // 2:, 1] = -1.0
    e += 0.01 * g.normal(size=e.shape)
    labels = kmeans_segmentation(e, 2, seed=1)
    assert labels.shape == (h, w)
    truth = np.zeros((h, w), int)
    truth[:, w // 2:] = 1
    assert miou(labels, truth).miou == pytest.approx(1.0)
    auto = kmeans_segmentation(e.reshape(-1, 3), None, grid=(h, w), k_range=range(2, 5))
    assert miou(auto, truth).miou == pytest.approx(1.0)
    with pytest.raises(ValueError, match="grid"):
        kmeans_segmentation(e.reshape(-1, 3), 2)
    with pytest.raises(ValueError, match="grid"):
        kmeans_segmentation(e.reshape(-1, 3), 2, grid=(5, 5))


def test_miou_hungarian_matching():
    target = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 2, 255]])
    # a perfect segmentation with permuted ids scores 1
    pred = np.array([[5, 5, 3, 3], [5, 5, 3, 3], [9, 9, 9, 9]])
    r = miou(pred, target)
    assert r.miou == pytest.approx(1.0) and r.assignment == {5: 0, 3: 1, 9: 2}
    # two classes merged into one segment: class 0 IoU 4/6 or class 1 IoU 4/6 (one wins), the
    # other gets no segment (0); class 2 perfect
    merged = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2]])
    r = miou(merged, target)
    assert sorted(r.iou.values()) == pytest.approx([0.0, 4 / 8, 1.0])
    assert r.miou == pytest.approx((0 + 0.5 + 1) / 3)
    # a coarse prediction is upsampled to the target size
    coarse = np.array([[0, 1], [2, 2]])
    big = upsample_labels(coarse, (4, 6))
    assert big.shape == (4, 6) and (big[:2, :3] == 0).all() and (big[2:] == 2).all()
    assert miou(coarse, big, ignore_index=None).miou == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labelled"):
        miou(pred, np.full((3, 4), 255))


def test_positional_r2_known_cases(rng):
    h, w = 7, 9
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # eigenvectors that are affine in position: perfect decodability
    e = np.stack([2 * xs + 1, -ys + 3, np.ones((h, w))], -1).astype(float)
    r = positional_r2(e)
    assert r["x"] == pytest.approx(1.0) and r["y"] == pytest.approx(1.0) and r["mean"] == pytest.approx(1.0)
    # x only: R²_y = 0
    r = positional_r2(np.stack([xs], -1).astype(float))
    assert r["x"] == pytest.approx(1.0) and r["y"] == pytest.approx(0.0, abs=1e-12)
    # random features: expected R² ≈ K / (N − 1), far below 1
    g = np.random.default_rng(_seed(rng))
    r = positional_r2(g.normal(size=(h * w, 3)), grid=(h, w))
    assert r["mean"] < 0.35
    # positional "where" vs content-only "what" features on the same grid
    what = np.stack([(xs + ys) % 2, (xs * 3 + ys) % 2], -1).astype(float)
    assert positional_r2(what)["mean"] < positional_r2(np.stack([np.cos(np.pi * xs / w), np.cos(np.pi * ys / h)],
                                                                 -1))["mean"]
    with pytest.raises(ValueError, match="grid"):
        positional_r2(np.ones((5, 2)))


def test_color_baseline_segments_colour_regions(rng):
    g = np.random.default_rng(_seed(rng))
    img = np.zeros((3, 28, 42))
    img[0, :, :21] = 0.9   # red left half
    img[2, :, 21:] = 0.8   # blue right half
    img += 0.02 * g.random(img.shape)
    assert pool_to_grid(img, (2, 3)).shape == (2, 3, 3)
    labels = color_segmentation(img, (4, 6), k=2)
    truth = np.zeros((4, 6), int)
    truth[:, 3:] = 1
    assert miou(labels, truth).miou == pytest.approx(1.0)
    # (H, W, 3) input and K by silhouette
    labels = color_segmentation(torch.from_numpy(img.transpose(1, 2, 0).copy()), (4, 6))
    assert miou(labels, truth).miou == pytest.approx(1.0)
