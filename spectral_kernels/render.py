"""Pictures of eigenvectors and segmentations, as float (H, W, 3) arrays in [0, 1], and PNG files.

- ``eigenvector_rgb``: components 1..3 (component 0 is the trivial one) as R, G, B, each
  channel percentile-normalised, upsampled from the token grid to the image size.
- ``eigenvector_grid``: the leading eigenvectors side by side, each through a diverging
  blue–white–red map centred on zero.
- ``segmentation_overlay``: a label map in distinct colours blended over the image, with
  segment boundaries drawn.
- ``save_png``: write any of these (or a uint8 array) with Pillow.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _as_numpy(name: str, a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    return a


def _eigvec_grid(eigvecs) -> np.ndarray:
    e = _as_numpy("eigvecs", eigvecs).astype(np.float64)
    if e.ndim == 2:  # (h, w): a single component
        e = e[..., None]
    if e.ndim != 3:
        raise ValueError(f"eigvecs must be (h, w, K) on the token grid, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("eigvecs contains NaN or Inf values")
    return e


def _image_hwc(image) -> np.ndarray:
    a = _as_numpy("image", image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"float image values must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
    return a


def _resize(a: np.ndarray, size, mode: str) -> np.ndarray:
    """(h, w, C) → (H, W, C) by torch interpolation ('bilinear' or 'nearest')."""
    if size is None or tuple(size) == a.shape[:2]:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t.double() if mode == "bilinear" else t, size=tuple(int(s) for s in size), mode=mode, **kw)
    return out[0].numpy().transpose(1, 2, 0)


def percentile_normalize(a: np.ndarray, percentiles=(1.0, 99.0)) -> np.ndarray:
    """Per channel (last axis): map the [p_lo, p_hi] percentile range to [0, 1] and clip."""
    lo, hi = np.percentile(a.reshape(-1, a.shape[-1]), percentiles, axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return np.clip((a - lo) / span, 0.0, 1.0)


def eigenvector_rgb(eigvecs, *, size=None, components=(1, 2, 3), percentiles=(1.0, 99.0)) -> np.ndarray:
    """RGB picture of three eigenvector components: (h, w, K) → (H, W, 3) floats in [0, 1].

    ``size`` = (H, W) upsamples bilinearly (None keeps the token grid). A missing
    component (K ≤ 3) leaves its channel at 0. Each eigenvector's sign is arbitrary, so
    colours are comparable within one picture only.
    """
    e = _eigvec_grid(eigvecs)
    rgb = np.zeros(e.shape[:2] + (3,))
    for channel, comp in enumerate(components):
        if comp < 0:
            raise ValueError(f"components must be non-negative indices, got {components}")
        if comp < e.shape[-1]:
            rgb[..., channel] = e[..., comp]
    present = [c for c, comp in enumerate(components) if comp < e.shape[-1]]
    if present:
        rgb[..., present] = percentile_normalize(rgb[..., present], percentiles)
    return np.clip(_resize(rgb, size, "bilinear"), 0.0, 1.0)


def diverging_colormap(v: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] → blue (−1), white (0), red (+1); (...) → (..., 3)."""
    v = np.clip(v, -1.0, 1.0)[..., None]
    blue, white, red = np.array([0.23, 0.30, 0.75]), np.ones(3), np.array([0.71, 0.02, 0.15])
    return np.where(v < 0, white + (-v) * (blue - white), white + v * (red - white))


def eigenvector_grid(eigvecs, *, n: int = 8, cols: int = 4, tile_size=None, pad: int = 2,
                     start: int = 0, percentile: float = 99.0) -> np.ndarray:
    """Components start..start+n−1 as tiles (rows of ``cols``) → (H', W', 3) in [0, 1].

    Each tile is scaled by its own ``percentile`` of |value| and mapped blue–white–red;
    ``tile_size`` = (H, W) upsamples each tile; tiles are separated by ``pad`` white pixels.
    """
    e = _eigvec_grid(eigvecs)
    if n < 1 or cols < 1 or pad < 0:
        raise ValueError(f"n and cols must be positive and pad non-negative, got n={n}, cols={cols}, pad={pad}")
    comps = list(range(start, min(start + n, e.shape[-1])))
    if not comps:
        raise ValueError(f"no components in [{start}, {start + n}) for eigvecs with K = {e.shape[-1]}")
    tiles = []
    for c in comps:
        v = e[..., c]
        scale = np.percentile(np.abs(v), percentile)
        tile = diverging_colormap(v / scale if scale > 0 else v)
        tiles.append(np.clip(_resize(tile, tile_size, "bilinear"), 0.0, 1.0))
    th, tw = tiles[0].shape[:2]
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = np.ones((rows * th + (rows - 1) * pad, cols * tw + (cols - 1) * pad, 3))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * (th + pad): r * (th + pad) + th, c * (tw + pad): c * (tw + pad) + tw] = tile
    return canvas


def palette(n: int) -> np.ndarray:
    """n distinct colours (n, 3) in [0, 1] (golden-ratio hues, alternating brightness)."""
    import colorsys
    return np.array([colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.7)
                     for i in range(n)])


def segmentation_overlay(image, labels, *, alpha: float = 0.5, boundaries: bool = True) -> np.ndarray:
    """Label map (h, w) ints, upsampled (nearest) to the image, blended over it → (H, W, 3) in [0, 1]."""
    img = _image_hwc(image)
    lab = _as_numpy("labels", labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an (h, w) integer array, got shape {lab.shape}, dtype {lab.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    from .evaluation import upsample_labels
    lab = upsample_labels(lab, img.shape[:2])
    ids, index = np.unique(lab, return_inverse=True)
    colours = palette(len(ids))[index.reshape(lab.shape)]
    out = (1.0 - alpha) * img + alpha * colours
    if boundaries:
        edge = np.zeros(lab.shape, bool)
        edge[:-1] |= lab[:-1] != lab[1:]
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        out[edge] = 0.0
    return np.clip(out, 0.0, 1.0)


def save_png(path: str | os.PathLike, picture) -> Path:
    """Write (H, W, 3) / (H, W) floats in [0, 1] or uint8 as a PNG (parent folders created)."""
    from PIL import Image

    a = _as_numpy("picture", picture)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"picture must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("picture contains NaN or Inf values")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"float picture values must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = np.round(a * 255.0).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")
    return path
