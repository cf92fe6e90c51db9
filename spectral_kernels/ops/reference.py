"""Dense reference backend: materialises the N×M affinity, float64-capable.

For tests and small problems only. Every other backend is checked against these
functions, so they are written as directly from DESIGN.md §2 as possible.

All functions take the canonical 4-D layout of ``spectral_kernels.ops._layout``.
"""
from __future__ import annotations

import torch

from ._layout import compute_dtype as _compute_dtype, reduce_heads, symmetric_offsets_args

__all__ = ["matmul", "logsumexp", "symmetric_matmul", "matmul_pair"]


def _scores(q, k, scale, dtype):
    return scale * torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))


def matmul(q, k, x, *, scale, row_offset=None, col_offset=None, normalize="none",
           head_weights=None, dtype=None):
    """Y = exp(S - α_i - β_j) X (or softmax(S - β) X); returns (Y, row LSE or None)."""
    dtype = dtype or _compute_dtype(q, k, x)
    s = _scores(q, k, scale, dtype)
    if col_offset is not None:
        s = s - col_offset.to(dtype)[..., None, :]
    lse = None
    if normalize == "row":
        lse = torch.logsumexp(s, dim=-1)
        s = s - lse[..., None]
    if row_offset is not None:
        s = s - row_offset.to(dtype)[..., None]
    y = torch.matmul(torch.exp(s), x.to(dtype))
    return reduce_heads(y, head_weights), (None if lse is None else lse)


def logsumexp(q, k, *, scale, col_offset=None, dtype=None):
    """r_i = log Σ_j exp(S_ij - β_j)."""
    dtype = dtype or _compute_dtype(q, k)
    s = _scores(q, k, scale, dtype)
    if col_offset is not None:
        s = s - col_offset.to(dtype)[..., None, :]
    return torch.logsumexp(s, dim=-1)


def symmetric_matmul(q, k, x, *, scale, offset=None, row_offset=None, col_offset=None, head_weights=None,
                     dtype=None):
    """½(E + Eᵀ) X with E_ij = exp(S_ij - α_i - β_j); ``offset`` = a means α = β = a."""
    dtype = dtype or _compute_dtype(q, k, x)
    alpha, beta = symmetric_offsets_args(offset, row_offset, col_offset)
    s = _scores(q, k, scale, dtype)
    if alpha is not None:
        s = s - alpha.to(dtype)[..., :, None]
    if beta is not None:
        s = s - beta.to(dtype)[..., None, :]
    e = torch.exp(s)
    y = 0.5 * torch.matmul(e + e.transpose(-1, -2), x.to(dtype))
    return reduce_heads(y, head_weights)


def matmul_pair(q, k, x, w, *, scale, row_offset=None, col_offset=None, dtype=None):
    """(E·X, Eᵀ·W) with E_ij = exp(S_ij − α_i − β_j): both directions of one score matrix."""
    dtype = dtype or _compute_dtype(q, k, x, w)
    s = _scores(q, k, scale, dtype)
    if col_offset is not None:
        s = s - col_offset.to(dtype)[..., None, :]
    if row_offset is not None:
        s = s - row_offset.to(dtype)[..., None]
    e = torch.exp(s)
    return torch.matmul(e, x.to(dtype)), torch.matmul(e.transpose(-1, -2), w.to(dtype))
