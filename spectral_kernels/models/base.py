"""What every model adapter shares: preprocessing and the capture entry point.

An adapter subclasses ``CaptureModel`` and supplies ``sites(pixels)`` (its attention
layers as ``AttentionSite`` records) and ``run(pixels)`` (one forward pass). ``capture``
does the rest: convert and resize the images, normalise them, hook, run, and return
``LayerCapture`` records.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..images import as_image_batch
from .capture import LayerCapture
from .hooks import AttentionSite, record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def optional_import(module: str, purpose: str):
    """Import an optional library on first use, or raise ImportError saying what needs it and
    which pip package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose}: pip install {module} ({exc})") from exc


def as_pair(v) -> tuple[int, int]:
    """An int or a 2-sequence (a library's patch or image size) as an (h, w) pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _round_to_multiple(n: float, multiple: int) -> int:
    return max(multiple, int(round(n / multiple)) * multiple)


def target_size(height: int, width: int, size, multiple: int) -> tuple[int, int]:
    """Output (H, W): ``size`` None keeps the image size, an int sets the shorter side
    (aspect kept), an (H, W) pair is taken as is; each side is then rounded to a multiple
    of ``multiple`` (the patch size)."""
    if size is None:
        h, w = float(height), float(width)
    elif isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        ratio = size / min(height, width)
        h, w = height * ratio, width * ratio
    else:
        try:
            h, w = (float(s) for s in size)
        except (TypeError, ValueError):
            raise TypeError(f"size must be None, an int or an (H, W) pair, got {size!r}") from None
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
    return _round_to_multiple(h, multiple), _round_to_multiple(w, multiple)


class CaptureModel:
    """Base class of the adapters. Subclasses set ``name``, ``patch_size`` (images are
    resized to multiples of it), ``image_size`` (default ``size`` of ``preprocess``),
    ``mean``/``std`` and ``device``, and implement ``sites`` and ``run``."""

    name: str = "model"
    patch_size: int = 16
    image_size = None  # None | int (shorter side) | (H, W)
    fixed_size: tuple[int, int] | None = None  # set when the model accepts one input size only
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def sites(self, pixels: torch.Tensor) -> list[AttentionSite]:
        raise NotImplementedError

    def run(self, pixels: torch.Tensor, **kw) -> dict | None:
        """One forward pass; may return a dict added to every capture's ``meta``."""
        raise NotImplementedError

    def resize(self, images, size=None) -> torch.Tensor:
        """Images (any form ``as_image_batch`` accepts) → (B, 3, H, W) in [0, 1], H and W
        multiples of the patch size (all images resized to one size)."""
        batch = as_image_batch(images)
        if self.fixed_size is not None:
            size = self.fixed_size
        elif size is None:
            size = self.image_size
        out = []
        for image in batch:
            hw = target_size(image.shape[-2], image.shape[-1], size, self.patch_size)
            if tuple(image.shape[-2:]) != hw:
                image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False,
                                      antialias=True)[0].clamp_(0, 1)
            out.append(image)
        shapes = {tuple(t.shape[-2:]) for t in out}
        if len(shapes) > 1:
            raise ValueError(f"images resize to different sizes {sorted(shapes)}; pass size=(H, W) "
                             "to give them one size")
        return torch.stack(out)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def preprocess(self, images, size=None) -> torch.Tensor:
        """Resize to a multiple of the patch size and normalise → (B, 3, H, W) on ``device``."""
        pixels = self.resize(images, size)
        return self.normalize(pixels.to(self.device)).to(self.dtype)

    def capture(self, images, *, size=None, dtype: torch.dtype | None = torch.float32,
                **run_kw) -> list[LayerCapture]:
        """q, k, v of every attention layer for ``images`` ((B, 3, H, W) float tensor in
        [0, 1], PIL image, numpy array, path, or a list of these).

        ``size``: None (the model's default ``image_size``), an int (shorter side) or
        (H, W); sides are rounded to multiples of the patch size. ``dtype``: dtype of the
        captured tensors (None keeps the model's). Extra keywords go to ``run`` (e.g. the
        diffusion timestep).
        """
        pixels = self.preprocess(images, size)
        sites = self.sites(pixels)
        run_meta: dict = {}
        captures = record(sites, lambda: run_meta.update(self.run(pixels, **run_kw) or {}), dtype=dtype)
        for c in captures:
            c.meta.update(run_meta)
            c.meta.setdefault("model", self.name)
            c.meta.setdefault("image_size", tuple(pixels.shape[-2:]))
        return captures

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, patch_size={self.patch_size}, device={self.device})"
