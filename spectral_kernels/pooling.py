"""Pooling between token grids: the official g_l (adaptive average pooling) and its adjoint.

Layers of one model see the image at different resolutions (Stable Diffusion: 64², 32²,
16², 8²) and may carry extra tokens (CLS, registers) before the grid tokens. Every layer's
operator acts on one X defined on the finest ("base") grid; ``GridPooling`` maps
base-grid rows to the layer's tokens (``pool``) and back (``adjoint``), exactly as
``torch.nn.functional.adaptive_avg_pool2d`` would, without forming a pooling matrix
larger than (h × h0) + (w × w0).

Extra tokens are handled explicitly by ``extra_tokens``:
    "drop": the operator is restricted to grid tokens (the caller removes the extra rows
            of q/k/v; ``pool`` returns grid rows only);
    "mean": each extra token receives the mean of all base-grid rows (a global token).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

EXTRA_TOKEN_MODES = ("drop", "mean")


def adaptive_pool_matrix(out_size: int, in_size: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """(out, in) matrix of adaptive average pooling along one axis (PyTorch's bin rule)."""
    if out_size <= 0 or in_size <= 0:
        raise ValueError(f"grid sizes must be positive, got out={out_size}, in={in_size}")
    i = torch.arange(out_size)
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    cols = torch.arange(in_size)
    mask = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
    mat = mask.to(torch.float64) / (end - start).to(torch.float64)[:, None]
    return mat.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=128)
def _cached_pool_matrix(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built once per (sizes, dtype, device): rebuilding costs a host-to-device copy per call on a GPU.
    return adaptive_pool_matrix(out_size, in_size, dtype=dtype, device=device)


@dataclass(frozen=True)
class GridPooling:
    """Linear map from base-grid rows (h0·w0, K) to a layer's tokens (n_extra + h·w, K)."""
    base_grid: tuple[int, int]
    grid: tuple[int, int]
    n_extra: int = 0
    extra_tokens: str = "drop"

    def __post_init__(self):
        for name, g in (("base_grid", self.base_grid), ("grid", self.grid)):
            if len(g) != 2 or min(g) <= 0:
                raise ValueError(f"{name} must be a pair of positive ints, got {g}")
        if self.n_extra < 0:
            raise ValueError(f"n_extra must be non-negative, got {self.n_extra}")
        if self.extra_tokens not in EXTRA_TOKEN_MODES:
            raise ValueError(f"extra_tokens must be one of {EXTRA_TOKEN_MODES}, got {self.extra_tokens!r}")

    @property
    def n_base(self) -> int:
        return self.base_grid[0] * self.base_grid[1]

    @property
    def n_tokens(self) -> int:
        """Rows of the layer's operator: grid tokens, plus extra tokens unless dropped."""
        extra = self.n_extra if self.extra_tokens == "mean" else 0
        return extra + self.grid[0] * self.grid[1]

    @property
    def is_identity(self) -> bool:
        return self.grid == self.base_grid and self.n_tokens == self.n_base

    def _mats(self, x):
        return (_cached_pool_matrix(self.grid[0], self.base_grid[0], x.dtype, x.device),
                _cached_pool_matrix(self.grid[1], self.base_grid[1], x.dtype, x.device))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., h0·w0, K) → (..., n_tokens, K)."""
        if x.shape[-2] != self.n_base:
            raise ValueError(f"x must have {self.n_base} rows (base grid {self.base_grid}), got {x.shape[-2]}")
        if self.is_identity:
            return x
        ph, pw = self._mats(x)
        grid = x.reshape(*x.shape[:-2], *self.base_grid, x.shape[-1])
        pooled = torch.einsum("ah,bw,...hwk->...abk", ph, pw, grid).reshape(*x.shape[:-2], -1, x.shape[-1])
        if self.extra_tokens == "mean" and self.n_extra:
            mean = x.mean(-2, keepdim=True).expand(*x.shape[:-2], self.n_extra, x.shape[-1])
            pooled = torch.cat([mean, pooled], dim=-2)
        return pooled

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(..., n_tokens, K) → (..., h0·w0, K): the transpose of ``pool``."""
        if y.shape[-2] != self.n_tokens:
            raise ValueError(f"y must have {self.n_tokens} rows, got {y.shape[-2]}")
        if self.is_identity:
            return y
        extra = self.n_extra if self.extra_tokens == "mean" else 0
        ph, pw = self._mats(y)
        grid = y[..., extra:, :].reshape(*y.shape[:-2], *self.grid, y.shape[-1])
        out = torch.einsum("ah,bw,...abk->...hwk", ph, pw, grid).reshape(*y.shape[:-2], self.n_base, y.shape[-1])
        if extra:
            out = out + y[..., :extra, :].sum(-2, keepdim=True) / self.n_base
        return out
