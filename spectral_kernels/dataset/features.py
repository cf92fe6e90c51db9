"""Feature extraction for a dataset: captures in batches, reduced, cached on disk.

Only what the dataset graphs need is kept: the selected layers' grid tokens (extra CLS /
register tokens dropped), q and k for KQ graphs or v for VV graphs, as float16 on the CPU
(≈ 2·H·N·d bytes per layer and image). Each image's features are one file in the cache
folder, named by a hash of the image key and the extraction settings, so an interrupted or
resumed run never recomputes an image it already extracted, and changed settings never
reuse stale files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..checkpoint import save_atomic
from ..models.capture import LayerCapture
from .sources import ImageItem, center_crop_square, read_items, warn_unreadable

__all__ = ["LayerFeatures", "FeatureSet", "extract_features", "select_layers"]

CACHE_DTYPE = torch.float16


@dataclass
class LayerFeatures:
    """One layer over the whole dataset: a (and b for KQ) of shape (n_images, H, h·w, d)."""
    name: str
    grid: tuple[int, int]
    scale: float
    a: torch.Tensor
    b: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.a.shape[1]


@dataclass
class FeatureSet:
    """Cached features of the readable images, in dataset order, and the skipped ones."""
    items: list[ImageItem]
    layers: list[LayerFeatures]
    skipped: list[tuple[ImageItem, str]]

    @property
    def n_images(self) -> int:
        return len(self.items)

    @property
    def base_grid(self) -> tuple[int, int]:
        return max((lf.grid for lf in self.layers), key=lambda g: g[0] * g[1])


def select_layers(captures: list[LayerCapture], layers) -> list[LayerCapture]:
    """Captures named (or indexed) by ``layers``; None keeps all. Unknown names raise ValueError."""
    if layers is None:
        return list(captures)
    names = [c.name for c in captures]
    out = []
    for want in layers:
        if isinstance(want, int) and not isinstance(want, bool):
            if not -len(captures) <= want < len(captures):
                raise ValueError(f"layers: index {want} out of range for {len(captures)} captured layers")
            out.append(captures[want])
        elif want in names:
            out.append(captures[names.index(want)])
        else:
            raise ValueError(f"layers: unknown layer {want!r}; the model captures {names}")
    if not out:
        raise ValueError("layers selects no layer")
    return out


def _reduce(capture: LayerCapture, graph: str, heads=None) -> dict:
    """The per-image record of one layer: grid tokens of q, k (KQ) or v (VV) of the selected heads."""
    e = capture.n_extra
    pick = slice(None) if heads is None else _head_index(heads, capture)
    if graph == "kq":
        a, b = capture.q[:, pick, e:], capture.k[:, pick, e:]
    else:
        a, b = F.normalize(capture.v[:, pick, e:].float(), dim=-1), None  # unit vectors survive fp16 well
    return {"grid": tuple(capture.grid), "scale": float(capture.scale), "a": a, "b": b}


def _head_index(heads, capture: LayerCapture) -> list[int]:
    n = capture.q.shape[1]
    heads = list(heads)
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not -n <= h < n]
    if bad or not heads:
        raise ValueError(f"heads: {bad or heads} do not select heads of layer {capture.name!r}, which has {n}")
    return heads


def _cache_file(folder: str, item: ImageItem, settings: dict) -> str:
    digest = hashlib.sha1(json.dumps([item.key, settings], sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(folder, f"{digest}.pt")


def extract_features(items: list[ImageItem], load_model: Callable, *, cache_dir: str, graph: str, layers=None,
                     heads=None, image_size: int | None = None, batch_size: int = 8, settings: dict | None = None,
                     progress: bool = True) -> FeatureSet:
    """Capture (or read back from ``cache_dir``) the features of every readable image.

    ``load_model()`` returns the capture model; it is called only if some image is not cached
    yet. Images are centre-cropped to a square and captured at ``image_size`` × ``image_size``
    pixels (None: 32 tokens per side, i.e. 32 × the model's ``patch_size``, the official
    table size; the model's own default size if it has no ``patch_size``) in batches of
    ``batch_size``. ``layers`` (names or indices) and ``heads`` (indices, the same for every
    layer) select what is kept; None keeps all. Unreadable images are skipped with one warning; if none is readable,
    ValueError.
    """
    from tqdm.auto import tqdm

    os.makedirs(cache_dir, exist_ok=True)
    settings = dict(settings or {}, graph=graph, layers=None if layers is None else list(layers),
                    heads=None if heads is None else list(heads), image_size=image_size)
    files = {item.key: _cache_file(cache_dir, item, settings) for item in items}
    todo = [item for item in items if not os.path.exists(files[item.key])]
    skipped: list[tuple[ImageItem, str]] = []
    model = load_model() if todo else None
    size = None
    if todo:
        side = image_size if image_size is not None else \
            (32 * int(model.patch_size) if getattr(model, "patch_size", None) else None)
        size = None if side is None else (side, side)
    bar = tqdm(total=len(todo), desc="extracting features", disable=not progress or not todo, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        good, bad = read_items(todo[start:start + batch_size])
        skipped.extend(bad)
        if good:
            pixels = [center_crop_square(image) for _, image in good]
            with torch.no_grad():
                captures = select_layers(model.capture(pixels, size=size), layers)
            reduced = [(c.name, _reduce(c, graph, heads)) for c in captures]
            for i, (item, _) in enumerate(good):
                record = {name: {"grid": r["grid"], "scale": r["scale"],
                                 "a": r["a"][i].to("cpu", CACHE_DTYPE).clone(),
                                 "b": None if r["b"] is None else r["b"][i].to("cpu", CACHE_DTYPE).clone()}
                          for name, r in reduced}
                save_atomic(record, files[item.key])
        bar.update(len(good) + len(bad))
    bar.close()
    warn_unreadable(skipped)
    bad_keys = {item.key for item, _ in skipped}
    readable = [item for item in items if item.key not in bad_keys]
    if not readable:
        raise ValueError(f"the dataset is empty: none of its {len(items)} image(s) could be read")
    return FeatureSet(readable, _stack([files[item.key] for item in readable]), skipped)


def _stack(paths: list[str]) -> list[LayerFeatures]:
    """Per-image cache files → per-layer (n_images, H, N, d) tensors (float16, CPU)."""
    first = torch.load(paths[0], weights_only=False)
    out = []
    for name, rec in first.items():
        a = torch.empty((len(paths), *rec["a"].shape), dtype=CACHE_DTYPE)
        b = None if rec["b"] is None else torch.empty_like(a)
        out.append(LayerFeatures(name, tuple(rec["grid"]), rec["scale"], a, b))
    for i, path in enumerate(paths):
        record = first if i == 0 else torch.load(path, weights_only=False)
        if list(record) != [lf.name for lf in out]:
            raise ValueError(f"cached features {path} hold layers {list(record)}, expected "
                             f"{[lf.name for lf in out]}: the model's layers differ between images")
        for lf in out:
            rec = record[lf.name]
            if tuple(rec["a"].shape) != tuple(lf.a.shape[1:]):
                raise ValueError(f"image {i}: layer {lf.name!r} has features of shape {tuple(rec['a'].shape)}, "
                                 f"image 0 has {tuple(lf.a.shape[1:])}; images must share one token grid")
            lf.a[i] = rec["a"]
            if lf.b is not None:
                lf.b[i] = rec["b"]
    return out
