"""What the solver optimises: modules that output logits (B, K, h0, w0) on the base grid.

The solver turns logits into features X with a softmax over the K channels (the official
constraint: rows ≥ 0, sum 1) or uses them as they are (``softmax=False``, the unconstrained
variant whose optimum is an exact eigen-subspace).

* ``PixelLogits``: one free logit per pixel and channel (B images at once).
* ``ConvNet``: the official small network (its ``ToyCNN``): a learned input map of
  ``hidden`` channels, two 3×3 conv + batch-norm + ReLU blocks and a 3×3 conv to K channels.
  Its spatial smoothness prior is what the paper uses for single images.
* ``LogitTable``: per-image logit tables for datasets (the official ``SegNet`` lookup table,
  initialised with a standard normal); ``forward(image_index)`` picks the batch's rows.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PixelLogits", "ConvNet", "LogitTable", "PARAMETERIZATIONS", "make_parameterization"]


class PixelLogits(nn.Module):
    """Free logits (batch, K, h, w), initialised N(0, init_std²)."""

    def __init__(self, n_eig: int, grid: tuple[int, int], *, batch: int = 1, init_std: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.logits = nn.Parameter(init_std * torch.randn(batch, n_eig, *grid, generator=generator))

    def forward(self, image_index=None) -> torch.Tensor:
        return self.logits if image_index is None else self.logits[image_index]

    @torch.no_grad()
    def set_logits(self, logits: torch.Tensor) -> None:
        self.logits.copy_(logits.reshape(self.logits.shape))


class ConvNet(nn.Module):
    """The official small conv net: learned input map → (conv-BN-ReLU)×2 → conv to K."""

    def __init__(self, n_eig: int, grid: tuple[int, int], *, hidden: int = 128,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.input_map = nn.Parameter(torch.randn(1, hidden, *grid, generator=generator))
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, n_eig, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.norm2 = nn.BatchNorm2d(hidden)
        if generator is not None:  # seeded, reproducible initialisation independent of global RNG
            for conv in (self.conv1, self.conv2, self.head):
                bound = (conv.in_channels * 9) ** -0.5
                with torch.no_grad():
                    conv.weight.uniform_(-bound, bound, generator=generator)
                    conv.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, image_index=None) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(self.input_map)))
        h = torch.relu(self.norm2(self.conv2(h)))
        return self.head(h)


class LogitTable(nn.Module):
    """Per-image logit tables (n_images, K, h, w); ``forward(image_index)`` → (B, K, h, w)."""

    def __init__(self, n_eig: int, grid: tuple[int, int], *, n_images: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        if n_images < 1:
            raise ValueError(f"n_images must be positive, got {n_images}")
        self.table = nn.Parameter(torch.randn(n_images, n_eig, *grid, generator=generator))

    def forward(self, image_index=None) -> torch.Tensor:
        if image_index is None:
            return self.table
        index = torch.as_tensor(image_index, dtype=torch.long, device=self.table.device).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.table.shape[0]):
            raise ValueError(f"image_index must lie in [0, {self.table.shape[0]}), got {index.tolist()}")
        return self.table[index]


PARAMETERIZATIONS = ("pixel", "conv", "table")


def make_parameterization(name: str, n_eig: int, grid: tuple[int, int], *, batch: int = 1,
                          n_images: int | None = None, hidden: int = 128,
                          generator: torch.Generator | None = None) -> nn.Module:
    """Build the module named ``name`` (one of ``PARAMETERIZATIONS``)."""
    if name == "pixel":
        return PixelLogits(n_eig, grid, batch=batch, generator=generator)
    if name == "conv":
        if batch != 1:
            raise ValueError(f'parameterization "conv" fits one image; got a batch of {batch} (use "table")')
        return ConvNet(n_eig, grid, hidden=hidden, generator=generator)
    if name == "table":
        if n_images is None:
            raise ValueError('parameterization "table" needs n_images')
        return LogitTable(n_eig, grid, n_images=n_images, generator=generator)
    raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {name!r}")
