"""Where a dataset's images come from: a folder (sorted) or a list of paths / tensors.

Every image becomes an ``ImageItem`` with a stable key (used to match cached features on
resume) and an output name (the ``<name>.npz`` it is saved as). Files are opened only when
features are extracted; ``read_items`` then skips the unreadable ones and reports them in
ONE warning, so a bad file never costs the work already done on the others.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..images import as_image_batch, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

__all__ = ["ImageItem", "IMAGE_EXTENSIONS", "collect_images", "read_items", "warn_unreadable", "center_crop_square"]


@dataclass(frozen=True)
class ImageItem:
    """One dataset image: ``key`` identifies its content/source, ``name`` its output file stem."""
    key: str
    name: str
    load: Callable[[], torch.Tensor]


def _tensor_key(t: torch.Tensor) -> str:
    data = t.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha1(data.numpy().tobytes()).hexdigest()[:16]
    return f"tensor:{tuple(data.shape)}:{digest}"


def _path_key(p: Path) -> str:
    st = p.stat()
    return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _unique_names(stems: list[str], suffixes: list[str]) -> list[str]:
    """Output stems; a stem shared by several inputs (a.png, a.jpg) gets its extension appended."""
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names, seen = [], set()
    for s, suf in zip(stems, suffixes):
        name = s if counts[s] == 1 else f"{s}_{suf.lstrip('.')}" if suf else s
        base, i = name, 1
        while name in seen:  # still clashing (same stem and extension in two folders)
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        names.append(name)
    return names


def collect_images(images) -> list[ImageItem]:
    """A folder path, or a list/tuple of paths, tensors ((3, H, W) or (B, 3, H, W)), arrays, PIL images.

    A folder contributes its files with a common image extension (case-insensitive, not
    recursive), sorted by name. Raises ValueError for an empty dataset or a missing folder.
    """
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        folder = Path(images)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"the dataset is empty: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in folder {str(folder)!r}")
        entries = files
    elif isinstance(images, (str, os.PathLike)):
        if not Path(images).exists():
            raise ValueError(f"images: {str(images)!r} is neither a folder nor an existing file")
        entries = [Path(images)]
    elif isinstance(images, (list, tuple)):
        entries = list(images)
        if not entries:
            raise ValueError("the dataset is empty: images is an empty list")
    elif isinstance(images, torch.Tensor):
        entries = [images]
    else:
        raise TypeError(f"images must be a folder, a path, a tensor or a list of these, got {type(images).__name__}")

    items: list[tuple[str, str, str, Callable]] = []   # (key, stem, suffix, loader)
    for i, entry in enumerate(entries):
        if isinstance(entry, (str, os.PathLike)):
            p = Path(entry)
            key = _path_key(p) if p.exists() else f"file:{p}"
            items.append((key, p.stem, p.suffix, lambda p=p: load_image(p)))
        else:
            tensors = as_image_batch([entry])  # validates arrays, tensors and PIL images now
            for j, t in enumerate(tensors):  # a 4-D tensor or array holds several images
                name = f"image_{i:05d}" if len(tensors) == 1 else f"image_{i:05d}_{j:03d}"
                items.append((_tensor_key(t), name, "", lambda t=t: t))
    names = _unique_names([s for _, s, _, _ in items], [x for _, _, x, _ in items])
    return [ImageItem(key, name, load) for (key, _, _, load), name in zip(items, names)]


def read_items(items: list[ImageItem]) -> tuple[list[tuple[ImageItem, torch.Tensor]], list[tuple[ImageItem, str]]]:
    """Load every item; returns (readable (item, image) pairs, unreadable (item, reason) pairs)."""
    good, bad = [], []
    for item in items:
        try:
            good.append((item, item.load()))
        except (ValueError, TypeError, OSError) as exc:
            bad.append((item, str(exc)))
    return good, bad


def warn_unreadable(bad: list[tuple[ImageItem, str]]) -> None:
    """One warning listing every skipped image and why."""
    if bad:
        listing = "; ".join(f"{item.name} ({reason})" for item, reason in bad)
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {listing}", RuntimeWarning, stacklevel=3)


def center_crop_square(image: torch.Tensor) -> torch.Tensor:
    """The largest centred square of a (3, H, W) image (the official dataset transform crops too)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top:top + side, left:left + side]
