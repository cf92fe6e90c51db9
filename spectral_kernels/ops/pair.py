"""The pair product (E·X, Eᵀ·W), E_ij = exp(τ q_i·k_j − α_i − β_j), from one pass: both
directions of one score matrix, e.g. a quadratic form zᵀPz and its gradient (P + Pᵀ)z.
Backends without a fused pair kernel run two offset-form products."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import check_tensor
from . import backends
from ._common import _check_backend, _layout, _reject_data_gradients, _shape_key, call_op
from ._layout import compute_dtype

__all__ = ["affinity_matmul_pair"]


def _pair_with_two_calls(module, q, k, x, w, scale, row_offset, col_offset):
    """(E·X, Eᵀ·W) from two offset-form products, for backends without a fused pair kernel."""
    y, _ = module.matmul(q, k, x, scale=scale, row_offset=row_offset, col_offset=col_offset,
                         normalize="none", head_weights=None)
    yt, _ = module.matmul(k, q, w, scale=scale, row_offset=col_offset, col_offset=row_offset,
                          normalize="none", head_weights=None)
    return y, yt


def _pair_impl(q: Tensor, k: Tensor, x: Tensor, w: Tensor, scale: float, row_offset: Optional[Tensor],
             col_offset: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    g, h, n, _ = q.shape
    m_tokens = k.shape[2]
    if n == 0 or m_tokens == 0 or x.shape[-1] == 0:
        return (torch.zeros(g, h, n, x.shape[-1], dtype=x.dtype, device=q.device),
                torch.zeros(g, h, m_tokens, w.shape[-1], dtype=w.dtype, device=q.device))
    x4, w4 = x.expand(g, h, *x.shape[2:]), w.expand(g, h, *w.shape[2:])

    def run(module):
        fused = getattr(module, "matmul_pair", None)
        if fused is not None:
            return fused(q, k, x4, w4, scale=scale, row_offset=row_offset, col_offset=col_offset)
        return _pair_with_two_calls(module, q, k, x4, w4, scale, row_offset, col_offset)

    y, yt = run(backends.resolve(backend, q.device, compute_dtype(q, k, x, w), _shape_key("pair", q, k, x), run))
    return y.to(x.dtype), yt.to(w.dtype)


_pair_op = torch.library.custom_op("spectral_kernels::affinity_matmul_pair", _pair_impl, mutates_args=())


@_pair_op.register_fake
def _(q, k, x, w, scale, row_offset, col_offset, backend):
    g, h, n, _ = q.shape
    return x.new_empty(g, h, n, x.shape[-1]), w.new_empty(g, h, k.shape[2], w.shape[-1])


def _pair_setup(ctx, inputs, output):
    q, k, x, w, scale, row_offset, col_offset, backend = inputs
    ctx.save_for_backward(q, k, row_offset, col_offset)
    ctx.scale, ctx.backend = scale, backend
    ctx.x_heads, ctx.w_heads, ctx.x_dtype, ctx.w_dtype = x.shape[1], w.shape[1], x.dtype, w.dtype


def _pair_backward(ctx, grad_y, grad_yt):
    q, k, row_offset, col_offset = ctx.saved_tensors
    # d⟨G, E·X⟩/dX = Eᵀ·G and d⟨Gᵗ, Eᵀ·W⟩/dW = E·Gᵗ: the same pair with the cotangents swapped.
    dw, dx = _pair_op(q, k, grad_yt.contiguous(), grad_y.contiguous(), ctx.scale, row_offset, col_offset,
                      ctx.backend)
    if ctx.x_heads == 1:
        dx = dx.sum(1, keepdim=True)  # X was shared by the heads
    if ctx.w_heads == 1:
        dw = dw.sum(1, keepdim=True)
    return None, None, dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None, None, None


_pair_op.register_autograd(_pair_backward, setup_context=_pair_setup)


def affinity_matmul_pair(q: Tensor, k: Tensor, x: Tensor, w: Tensor, *, scale: float | None = None,
                         row_offset: Tensor | None = None, col_offset: Tensor | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(E·X, Eᵀ·W) with E_ij = exp(τ q_i·k_j − α_i − β_j), both from one pass over the tiles.

    x: (..., M, m) (one row per key), w: (..., N, m) (one row per query); both broadcast over
    q/k's batch dims. For a quadratic form zᵀ P z with P = D_r⁻¹A (α = row LSE) the pair
    (P z, Pᵀ z) gives the value and its gradient (P + Pᵀ) z without a second pass. Backends
    without a fused pair kernel run two offset-form products. Returns tensors of shape
    (..., N, m) and (..., M, m).
    """
    _check_backend(backend)
    check_tensor("w", w, min_dim=2, finite=False)
    lay = _layout(q, k, x, scale, row_offset, col_offset, w=w)
    _reject_data_gradients(q=q, k=k, row_offset=row_offset, col_offset=col_offset)
    y, yt = call_op(_pair_op, _pair_impl, lay.q, lay.k, lay.x, lay.w, lay.scale, lay.row_offset, lay.col_offset,
                    backend, grad_inputs=(lay.x, lay.w))
    return y.reshape(*lay.out_batch, *y.shape[-2:]), yt.reshape(*lay.out_batch, *yt.shape[-2:])
