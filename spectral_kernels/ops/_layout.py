"""The canonical 4-D layout every backend receives, and the two reshapes it needs.

After validation (``spectral_kernels.ops._common``) each backend function gets

    q (G, H, N, d), k (G, H, M, d)      G = flattened leading dims, H = heads
    x (G, H, M, m)                      may be a stride-0 view over H (X shared by heads)
    row_offset (G, H, N) | None, col_offset (G, H, M) | None   (compute dtype)
    head_weights (H,) | None            None: output (G, H, N, m);
                                        given: Σ_h w_h·Y_h, output (G, N, m)

and returns results in float32 (float64 when any input is float64).
"""
from __future__ import annotations

import torch


def flat(t):
    """(G, H, ...) → (G·H, ...); copies only when the view cannot be merged (stride-0 X)."""
    return None if t is None else t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unflat(t, groups):
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def reduce_heads(y, head_weights):
    """(G, H, N, m) → Σ_h w_h·y[:, h] when weights are given."""
    if head_weights is None:
        return y
    return torch.einsum("h,ghnm->gnm", head_weights.to(y.dtype), y)


def compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def symmetric_offsets_args(offset=None, row_offset=None, col_offset=None):
    """(α, β) of the symmetric product ½(E + Eᵀ)·X, E_ij = exp(S_ij − α_i − β_j).

    ``offset`` = a is the NCut form α = β = a (returned as the same object twice, so that
    backends can see it); ``row_offset`` / ``col_offset`` set them separately.
    """
    if offset is not None:
        if row_offset is not None or col_offset is not None:
            raise ValueError("pass either offset (α = β) or row_offset/col_offset, not both")
        return offset, offset
    return row_offset, col_offset


def same_tensor(a, b):
    """Both None, or one tensor seen twice (same storage, shape, strides and dtype)."""
    if a is None or b is None:
        return a is None and b is None
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)
