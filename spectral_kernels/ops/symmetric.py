"""The one-pass symmetric product ½(E + Eᵀ)·X, E_ij = exp(τ q_i·k_j − α_i − β_j).

With α = β = a (``offset``; a = ½·log d) it is the NCut operator D^-½ W D^-½; with α the
row log-sum-exp and β = 0 it is ½(P + Pᵀ)·X for softmax attention P, the gradient of the
random-walk quadratic forms zᵀPz. ½(E + Eᵀ) is symmetric for any α, β, so the gradient
with respect to x is the same product.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._common import (_check_backend, _layout, _out_shape, _reject_data_gradients, _shape_key,
                      _transposed_cotangent, call_op)
from ._layout import compute_dtype, same_tensor, symmetric_offsets_args

__all__ = ["affinity_symmetric_matmul"]


def _symmetric_impl(q: Tensor, k: Tensor, x: Tensor, scale: float, row_offset: Optional[Tensor],
                    col_offset: Optional[Tensor], head_weights: Optional[Tensor], backend: str) -> Tensor:
    g, h, n, _ = q.shape
    if n == 0 or x.shape[-1] == 0:
        return torch.zeros(_out_shape(q, x, head_weights), dtype=x.dtype, device=q.device)
    x4 = x.expand(g, h, *x.shape[2:])

    def run(module):
        return module.symmetric_matmul(q, k, x4, scale=scale, row_offset=row_offset, col_offset=col_offset,
                                       head_weights=head_weights)

    # Keyed apart: q is k (half the tiles) and α ≠ β (two passes on some backends) time differently.
    op = "symmetric" + ("_same_qk" if same_tensor(q, k) else "") + \
        ("" if same_tensor(row_offset, col_offset) else "_separate_offsets")
    return run(backends.resolve(backend, q.device, compute_dtype(q, k, x), _shape_key(op, q, k, x), run)).to(x.dtype)


_symmetric_op = torch.library.custom_op("spectral_kernels::affinity_symmetric_matmul", _symmetric_impl,
                                        mutates_args=())


@_symmetric_op.register_fake
def _(q, k, x, scale, row_offset, col_offset, head_weights, backend):
    return x.new_empty(_out_shape(q, x, head_weights))


def _symmetric_setup(ctx, inputs, output):
    q, k, x, scale, row_offset, col_offset, head_weights, backend = inputs
    ctx.save_for_backward(q, k, row_offset, col_offset, head_weights)
    ctx.scale, ctx.backend, ctx.x_heads, ctx.x_dtype = scale, backend, x.shape[1], x.dtype


def _symmetric_backward(ctx, grad_y):
    q, k, row_offset, col_offset, head_weights = ctx.saved_tensors
    cot, weights = _transposed_cotangent(grad_y, ctx.x_heads, head_weights, q.shape[1])
    dx = _symmetric_op(q, k, cot, ctx.scale, row_offset, col_offset, weights, ctx.backend)  # self-adjoint
    if weights is not None:
        dx = dx.unsqueeze(1)
    return None, None, dx.to(ctx.x_dtype), None, None, None, None, None


_symmetric_op.register_autograd(_symmetric_backward, setup_context=_symmetric_setup)


def affinity_symmetric_matmul(q: Tensor, k: Tensor, x: Tensor, *, scale: float | None = None,
                              offset: Tensor | None = None, row_offset: Tensor | None = None,
                              col_offset: Tensor | None = None, head_weights: Tensor | None = None,
                              backend: str = "auto") -> Tensor:
    """½(E + Eᵀ)·X with E_ij = exp(τ q_i·k_j − α_i − β_j), in one pass over the score tiles.

    ``offset`` = a sets α = β = a: with a_i = ½·log d_i (d the degrees of W = (A + Aᵀ)/2)
    this is the NCut operator D^-½ W D^-½ applied to X. ``row_offset`` / ``col_offset``
    (..., N) set α and β apart (either may be omitted: zero), e.g. α = the row LSE gives
    ½(P + Pᵀ)·X for P = softmax(τ q kᵀ). q and k must have the same number of tokens.
    Passing the same tensor as q and k with α = β (VV graphs) lets backends compute only
    half the tiles.
    """
    _check_backend(backend)
    alpha, beta = symmetric_offsets_args(offset, row_offset, col_offset)  # rejects offset with the others
    same_offsets = offset is not None
    lay = _layout(q, k, x, scale, alpha, None if same_offsets else beta, head_weights, square=True,
                  row_name="offset" if same_offsets else "row_offset")
    _reject_data_gradients(q=q, k=k, offset=offset, row_offset=row_offset, col_offset=col_offset,
                           head_weights=head_weights)
    k4 = lay.q if q is k else lay.k  # keep the shared-tensor identity visible to backends
    beta4 = lay.row_offset if same_offsets else lay.col_offset  # α = β: one tensor, seen as such
    y = call_op(_symmetric_op, _symmetric_impl, lay.q, k4, lay.x, lay.scale, lay.row_offset, beta4,
                lay.head_weights, backend, grad_inputs=(lay.x,))
    return y.reshape(*lay.out_batch, *y.shape[-2:])
