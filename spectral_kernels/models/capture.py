"""What a captured attention layer is: per-head q, k, v on a token grid.

Every model adapter (ONNX DINOv2, timm, transformers, diffusers) produces a list of
``LayerCapture``; operators, objective and solver consume it. Keeping this record in the
bottom layer lets the solver take captures without importing any model library.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCapture:
    """One attention layer's inputs to softmax(τ q kᵀ) v, split by head.

    q, k, v: (B, H, N, d) with N = n_extra + grid[0]·grid[1]; the n_extra tokens (CLS,
    registers) come first. ``scale`` is the τ the layer itself uses (1/sqrt(d) for ViTs).
    """
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int]
    n_extra: int = 0
    scale: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for arg in ("q", "k", "v"):
            t = getattr(self, arg)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"LayerCapture.{arg} must be a (B, H, N, d) tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        n = self.n_extra + self.grid[0] * self.grid[1]
        if self.q.shape[2] != n or self.k.shape[2] != n or self.v.shape[2] != n:
            raise ValueError(f"layer {self.name!r}: q/k/v have {self.q.shape[2]} tokens but grid {self.grid} "
                             f"plus {self.n_extra} extra tokens makes {n}")
        if self.scale is None:
            self.scale = self.q.shape[-1] ** -0.5

    @property
    def n_tokens(self) -> int:
        return self.q.shape[2]

    def grid_only(self) -> "LayerCapture":
        """The same layer with the extra (CLS/register) tokens removed."""
        if not self.n_extra:
            return self
        e = self.n_extra
        return LayerCapture(self.name, self.q[:, :, e:], self.k[:, :, e:], self.v[:, :, e:], self.grid, 0,
                            self.scale, dict(self.meta))
