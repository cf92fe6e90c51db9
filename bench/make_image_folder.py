"""Write a folder of N distinct real images for dataset runs, without a download.

Each file is a random crop (40–100 % of the side), flip and small colour jitter of one of
scikit-image's bundled images, resized to --size pixels and saved as JPEG (quality 95;
``--format png`` for lossless files, 40× slower to write: 1 000 PNGs take over a minute on
one core); seeded, so the same arguments give the same folder.

    python bench/make_image_folder.py /tmp/images --count 1000 --size 448
    spectral-kernels dataset /tmp/images --device cuda --steps 200 --batch-images 40
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spectral_kernels.images import bundled_image, bundled_images


def variant(photo: torch.Tensor, size: int, gen: torch.Generator) -> np.ndarray:
    """One random crop/flip/jitter of a (3, H, W) float photo in [0, 1], as (size, size, 3) uint8."""
    _, h, w = photo.shape
    side = int(min(h, w) * (0.4 + 0.6 * float(torch.rand((), generator=gen))))
    top = int(torch.randint(0, h - side + 1, (), generator=gen))
    left = int(torch.randint(0, w - side + 1, (), generator=gen))
    crop = photo[:, top:top + side, left:left + side]
    if bool(torch.rand((), generator=gen) < 0.5):
        crop = crop.flip(-1)
    gain = 0.85 + 0.3 * torch.rand(3, 1, 1, generator=gen)
    crop = (crop * gain).clamp(0, 1)
    resized = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (resized.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--size", type=int, default=448, help="pixels per side (448 = 32 × 32 DINOv2 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 14:
        p.error("--count must be ≥ 1 and --size ≥ 14")
    os.makedirs(args.folder, exist_ok=True)
    photos = [bundled_image(name) for name in bundled_images()]
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.count):
        photo = photos[i % len(photos)]
        path = os.path.join(args.folder, f"image_{i:05d}.{args.format}")
        Image.fromarray(variant(photo, args.size, gen)).save(path, **({"quality": 95} if args.format == "jpg" else {}))
    print(f"{args.count} images of {args.size}×{args.size} from {len(photos)} bundled images → {args.folder}")


if __name__ == "__main__":
    main()
