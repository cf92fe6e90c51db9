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
