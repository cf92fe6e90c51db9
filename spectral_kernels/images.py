"""Image loading: files, PIL images, numpy arrays, tensors → float tensors in [0, 1].

``load_image(path)`` reads one file as (3, H, W); ``as_image_batch`` accepts any of the
supported forms (or a list of them) and returns a list of (3, H, W) tensors (images of a
batch may differ in size until a model resizes them). ``bundled_images()`` names the
scikit-image photographs used as the built-in examples; ``bundled_image(name)`` loads one.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

# scikit-image photographs (natural scenes with objects); name -> skimage.data function
# (all ship inside the scikit-image wheel: no download)
_BUNDLED = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "retina",
            "hubble_deep_field", "colorwheel")
_PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")


def bundled_images(*, photographs_only: bool = False) -> list[str]:
    """Names of the scikit-image example images usable as ``bundled_image(name)``.

    ``photographs_only`` keeps the natural photographs (astronaut, coffee, chelsea, rocket).
    """
    return list(_PHOTOGRAPHS if photographs_only else _BUNDLED)


def bundled_image(name: str) -> torch.Tensor:
    """One scikit-image example image as a (3, H, W) float tensor in [0, 1]."""
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled image {name!r}; known: {', '.join(_BUNDLED)}")
    import skimage.data
    return array_to_tensor(getattr(skimage.data, name)(), what=f"bundled image {name!r}")


def array_to_tensor(array, *, what: str = "image") -> torch.Tensor:
    """(H, W), (H, W, 1|3|4) uint8/uint16/float array → (3, H, W) float32 in [0, 1]."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.shape[-1] == 4:
        a = a[..., :3]  # drop alpha
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    elif a.dtype.kind == "f":
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{what} contains NaN or Inf values")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"float {what} must lie in [0, 1], got range [{a.min():.3g}, {a.max():.3g}]")
    else:
        raise TypeError(f"{what} has unsupported dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1] (RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ValueError(f"image file not found: {str(p)!r}")
    if not p.is_file():
        raise ValueError(f"image path is not a file: {str(p)!r}")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            return array_to_tensor(np.asarray(im), what=f"image {str(p)!r}")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {str(p)!r}: {exc}") from exc


def _one(image, index: int) -> list[torch.Tensor]:
    if isinstance(image, (str, os.PathLike)):
        return [load_image(image)]
    if isinstance(image, torch.Tensor):
        t = image
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"images[{index}]: a tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"images[{index}]: tensor images must be float in [0, 1], got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"images[{index}] contains NaN or Inf values")
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError(f"images[{index}]: tensor values must lie in [0, 1], got range "
                             f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
        return list(t.float().unbind(0))
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            return [array_to_tensor(np.asarray(image.convert("RGB")), what=f"images[{index}]")]
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            return [array_to_tensor(a, what=f"images[{index}]") for a in image]
        return [array_to_tensor(image, what=f"images[{index}]")]
    raise TypeError(f"images[{index}] has unsupported type {type(image).__name__}; expected a path, "
                    "PIL image, numpy array or torch tensor")


def as_image_batch(images) -> list[torch.Tensor]:
    """Any supported image form, or a list/tuple of them → list of (3, H, W) float tensors in [0, 1]."""
    items = images if isinstance(images, (list, tuple)) else [images]
    if not len(items):
        raise ValueError("images is empty")
    out = []
    for i, item in enumerate(items):
        out.extend(_one(item, i))
    if not out:
        raise ValueError("images is empty")
    return out
