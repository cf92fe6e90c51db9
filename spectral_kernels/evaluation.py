"""Evaluation of eigenvectors: k-means segmentation, Hungarian-matched mIoU, positional R².

All functions take numpy arrays or torch tensors and compute in float64 numpy; none
builds an N×N array (the silhouette is accumulated over row blocks).

- ``kmeans``: Lloyd's algorithm with k-means++ seeding, seeded, best of ``n_init``.
- ``silhouette_score`` / ``choose_k``: pick K by the mean silhouette.
- ``kmeans_segmentation``: eigenvectors on a token grid → a label map (K given or chosen).
- ``miou``: mean IoU after matching predicted segments to ground-truth classes with the
  Hungarian algorithm (``scipy.optimize.linear_sum_assignment``).
- ``positional_r2``: how well a linear map of the eigenvectors predicts each token's
  (x, y) position — the measurable form of the "where" claim.
- ``color_segmentation``: the raw-colour baseline, k-means on pixel colours pooled to
  the token grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_array(name: str, a, *, ndim=None) -> np.ndarray:
    try:
        import torch
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().double().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if ndim is not None and a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a


def _features(name: str, x) -> np.ndarray:
    x = _as_array(name, x, ndim=2).astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if len(x) == 0:
        raise ValueError(f"{name} has no rows")
    return x


def _sq_distances(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    d = x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator, x_sq: np.ndarray) -> np.ndarray:
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(len(x))]
    closest = _sq_distances(x, centers[:1], x_sq)[:, 0]
    for j in range(1, k):
        total = closest.sum()
        # all points coincide with chosen centres: any point will do
        idx = rng.choice(len(x), p=closest / total) if total > 0 else rng.integers(len(x))
        centers[j] = x[idx]
        closest = np.minimum(closest, _sq_distances(x, centers[j:j + 1], x_sq)[:, 0])
    return centers


@dataclass
class KMeansResult:
    labels: np.ndarray    # (N,) int64 in [0, k)
    centers: np.ndarray   # (k, D)
    inertia: float        # Σ squared distance to the assigned centre


def kmeans(x, k: int, *, n_init: int = 4, max_iter: int = 100, tol: float = 1e-8, seed: int = 0) -> KMeansResult:
    """k-means of the rows of x (N, D): k-means++ seeding, Lloyd iterations, best of n_init runs.

    Deterministic for a given ``seed``. Empty clusters are re-seeded with the point
    farthest from its centre.
    """
    x = _features("x", x)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > len(x):
        raise ValueError(f"k = {k} exceeds the number of points ({len(x)})")
    if n_init < 1:
        raise ValueError(f"n_init must be positive, got {n_init}")
    rng = np.random.default_rng(seed)
    x_sq = (x * x).sum(1)
    best = None
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, rng, x_sq)
        for _ in range(max_iter):
            d = _sq_distances(x, centers, x_sq)
            labels = d.argmin(1)
            # per-cluster sums by bincount: much faster than np.add.at for large N
            new = np.stack([np.bincount(labels, weights=x[:, j], minlength=k) for j in range(x.shape[1])], 1)
            counts = np.bincount(labels, minlength=k)
            for j in np.flatnonzero(counts == 0):
                far = d[np.arange(len(x)), labels].argmax()
                new[j], counts[j] = x[far], 1
                labels[far] = j
            new /= counts[:, None]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= tol * max(1.0, float((centers ** 2).sum())):
                break
        d = _sq_distances(x, centers, x_sq)
        labels = d.argmin(1)
        inertia = float(d[np.arange(len(x)), labels].sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels.astype(np.int64), centers, inertia)
    return best


def silhouette_score(x, labels, *, block: int = 1024, max_samples: int | None = 4096, seed: int = 0) -> float:
    """Mean silhouette (Euclidean) of a clustering; rows are processed in blocks (O(block·N)
    memory). With more than ``max_samples`` points a seeded random subset is scored."""
    x = _features("x", x)
    labels = _as_array("labels", labels, ndim=1).astype(np.int64)
    if len(labels) != len(x):
        raise ValueError(f"labels has {len(labels)} entries but x has {len(x)} rows")
    if max_samples is not None and len(x) > max_samples:
        keep = np.random.default_rng(seed).choice(len(x), max_samples, replace=False)
        x, labels = x[keep], labels[keep]
    uniq, labels = np.unique(labels, return_inverse=True)
    k = len(uniq)
    if k < 2 or k >= len(x):
        raise ValueError(f"the silhouette needs 2 <= clusters < points, got {k} clusters for {len(x)} points")
    onehot = np.zeros((len(x), k))
    onehot[np.arange(len(x)), labels] = 1.0
    counts = onehot.sum(0)
    x_sq = (x * x).sum(1)
    scores = np.empty(len(x))
    for start in range(0, len(x), block):
        sl = slice(start, start + block)
        dist = np.sqrt(_sq_distances(x[sl], x, x_sq[sl]))
        own = labels[sl]
        rows = np.arange(len(own))
        dist[rows, start + rows] = 0.0  # exact self-distance (the expansion leaves ~sqrt(eps))
        sums = dist @ onehot  # (b, k): total distance to each cluster
        own_count = counts[own]
        a = np.where(own_count > 1, sums[rows, own] / np.maximum(own_count - 1, 1), 0.0)
        means = sums / counts[None, :]
        means[rows, own] = np.inf
        b = means.min(1)
        denom = np.maximum(a, b)
        s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
        scores[sl] = np.where(own_count > 1, s, 0.0)  # singletons score 0 by convention
    return float(scores.mean())


def choose_k(x, k_range=range(2, 11), *, seed: int = 0, n_init: int = 4) -> tuple[int, KMeansResult, dict]:
    """K with the highest mean silhouette over ``k_range`` → (k, its k-means result, {k: score})."""
    x = _features("x", x)
    ks = [int(k) for k in k_range if 2 <= int(k) < len(x)]
    if not ks:
        raise ValueError(f"k_range {list(k_range)} has no K with 2 <= K < {len(x)} points")
    scores, results = {}, {}
    for k in ks:
        results[k] = kmeans(x, k, seed=seed, n_init=n_init)
        if len(np.unique(results[k].labels)) < 2:
            scores[k] = -1.0
            continue
        scores[k] = silhouette_score(x, results[k].labels, seed=seed)
    best = max(ks, key=lambda k: (scores[k], -k))
    return best, results[best], scores


def _grid_features(name: str, eigvecs, grid) -> tuple[np.ndarray, tuple[int, int]]:
    e = _as_array(name, eigvecs, ndim=(2, 3)).astype(np.float64)
    if e.ndim == 3:
        grid = e.shape[:2] if grid is None else tuple(grid)
        if tuple(grid) != e.shape[:2]:
            raise ValueError(f"grid {grid} does not match {name} of shape {e.shape}")
        e = e.reshape(-1, e.shape[-1])
    elif grid is None:
        raise ValueError(f"{name} of shape {e.shape} is (N, K): give its grid=(h, w)")
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != len(e):
        raise ValueError(f"{name} has {len(e)} rows but grid {grid} holds {grid[0] * grid[1]}")
    return _features(name, e), grid


def kmeans_segmentation(eigvecs, k: int | None = None, *, grid=None, k_range=range(2, 11),
                        row_normalize: bool = False, seed: int = 0) -> np.ndarray:
    """Cluster tokens by their eigenvector rows → an (h, w) int label map.

    eigvecs: (h, w, K), or (N, K) with ``grid=(h, w)``; pass the components to use (e.g.
    drop the trivial component 0 first). ``k`` None chooses K by silhouette over
    ``k_range``. ``row_normalize`` scales rows to unit length first (Ng–Jordan–Weiss).
    """
    e, grid = _grid_features("eigvecs", eigvecs, grid)
    if row_normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    if k is None:
        _, result, _ = choose_k(e, k_range, seed=seed)
    else:
        result = kmeans(e, k, seed=seed)
    return result.labels.reshape(grid)


def upsample_labels(labels, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w) label map to ``size`` = (H, W) (pixel centres)."""
    labels = _as_array("labels", labels, ndim=2)
    h, w = labels.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


@dataclass
class MatchedIoU:
    miou: float                  # mean IoU over the ground-truth classes present
    iou: dict                    # ground-truth class -> IoU of its matched segment (0 if unmatched)
    assignment: dict             # predicted segment -> ground-truth class


def miou(pred, target, *, ignore_index: int | None = 255) -> MatchedIoU:
    """Hungarian-matched mean IoU between a predicted segmentation and a label map.

    Segments and classes are matched one-to-one maximising the total IoU; a class left
    without a segment scores 0. ``pred`` of a smaller (h, w) is upsampled (nearest) to
    the target's size. Pixels equal to ``ignore_index`` in the target are ignored.
    """
    from scipy.optimize import linear_sum_assignment

    target = _as_array("target", target, ndim=2).astype(np.int64)
    pred = _as_array("pred", pred, ndim=2).astype(np.int64)
    if pred.shape != target.shape:
        pred = upsample_labels(pred, target.shape)
    valid = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    if not valid.any():
        raise ValueError("target has no labelled pixels")
    p_ids, p = np.unique(pred[valid], return_inverse=True)
    t_ids, t = np.unique(target[valid], return_inverse=True)
    inter = np.zeros((len(p_ids), len(t_ids)))
    np.add.at(inter, (p, t), 1.0)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = inter / union
    rows, cols = linear_sum_assignment(iou, maximize=True)
    per_class = {int(c): 0.0 for c in t_ids}
    assignment = {}
    for r, c in zip(rows, cols):
        per_class[int(t_ids[c])] = float(iou[r, c])
        assignment[int(p_ids[r])] = int(t_ids[c])
    return MatchedIoU(float(np.mean(list(per_class.values()))), per_class, assignment)


def positional_r2(eigvecs, *, grid=None) -> dict:
    """R² of a least-squares linear fit (with intercept) from eigenvector rows to token position.

    eigvecs (h, w, K) or (N, K) with ``grid``. Returns {"x": R²_x, "y": R²_y, "mean": …};
    positions are token-centre coordinates. A grid with a single row (column) has no y (x)
    variance: that coordinate is left out of the mean.
    """
    e, (h, w) = _grid_features("eigvecs", eigvecs, grid)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    design = np.concatenate([e, np.ones((len(e), 1))], axis=1)
    out = {}
    for axis, coord in (("x", xs.ravel()), ("y", ys.ravel())):
        centred = coord - coord.mean()
        total = float(centred @ centred)
        if total == 0:
            continue
        coef, *_ = np.linalg.lstsq(design, coord, rcond=None)
        resid = coord - design @ coef
        out[axis] = 1.0 - float(resid @ resid) / total
    if not out:
        raise ValueError("a 1×1 grid has no positional variance")
    out["mean"] = float(np.mean(list(out.values())))
    return out


def pool_to_grid(image, grid: tuple[int, int]) -> np.ndarray:
    """Image (3, H, W) or (H, W, 3) → per-token mean colour (h, w, 3) (adaptive average pooling)."""
    import torch
    import torch.nn.functional as F

    a = _as_array("image", image, ndim=3)
    if a.shape[0] != 3 and a.shape[-1] == 3:
        a = a.transpose(2, 0, 1)
    if a.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None]
    pooled = F.adaptive_avg_pool2d(t, tuple(int(g) for g in grid))[0]
    return pooled.permute(1, 2, 0).numpy()


def color_segmentation(image, grid: tuple[int, int], k: int | None = None, *, k_range=range(2, 11),
                       seed: int = 0) -> np.ndarray:
    """Raw-colour baseline: k-means on the image's mean colour per token → (h, w) labels."""
    colours = pool_to_grid(image, grid)
    return kmeans_segmentation(colours, k, k_range=k_range, seed=seed)
