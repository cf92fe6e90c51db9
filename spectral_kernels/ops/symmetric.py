"""The one-pass symmetric product ½(E + Eᵀ)·X, E_ij = exp(τ q_i·k_j − a_i − a_j): the
building block of the NCut operator D^-½ W D^-½ (a = ½·log d). Self-adjoint, so its
gradient with respect to x is the same product."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._common import (_check_backend, _layout, _out_shape, _reject_data_gradients, _shape_key,
                      _transposed_cotangent, call_op)
from ._layout import compute_dtype

__all__ = ["affinity_symmetric_matmul"]


def _symmetric_impl(q: Tensor, k: Tensor, x: Tensor, scale: float, offset: Optional[Tensor],
                  head_weights: Optional[Tensor], backend: str) -> Tensor:
    g, h, n, _ = q.shape
    if n == 0 or x.shape[-1] == 0:
        return torch.zeros(_out_shape(q, x, head_weights), dtype=x.dtype, device=q.device)
    module = backends.resolve(backend, q.device, compute_dtype(q, k, x), _shape_key(q, k, x))
    y = module.symmetric_matmul(q, k, x.expand(g, h, *x.shape[2:]), scale=scale, offset=offset,
                                head_weights=head_weights)
    return y.to(x.dtype)


_symmetric_op = torch.library.custom_op("spectral_kernels::affinity_symmetric_matmul", _symmetric_impl,
                                        mutates_args=())


@_symmetric_op.register_fake
def _(q, k, x, scale, offset, head_weights, backend):
    return x.new_empty(_out_shape(q, x, head_weights))


def _symmetric_setup(ctx, inputs, output):
    q, k, x, scale, offset, head_weights, backend = inputs
    ctx.save_for_backward(q, k, offset, head_weights)
    ctx.scale, ctx.backend, ctx.x_heads, ctx.x_dtype = scale, backend, x.shape[1], x.dtype


def _symmetric_backward(ctx, grad_y):
    q, k, offset, head_weights = ctx.saved_tensors
    cot, weights = _transposed_cotangent(grad_y, ctx.x_heads, head_weights, q.shape[1])
    dx = _symmetric_op(q, k, cot, ctx.scale, offset, weights, ctx.backend)  # self-adjoint
    if weights is not None:
        dx = dx.unsqueeze(1)
    return None, None, dx.to(ctx.x_dtype), None, None, None, None


_symmetric_op.register_autograd(_symmetric_backward, setup_context=_symmetric_setup)


def affinity_symmetric_matmul(q: Tensor, k: Tensor, x: Tensor, *, scale: float | None = None,
                              offset: Tensor | None = None, head_weights: Tensor | None = None,
                              backend: str = "auto") -> Tensor:
    """½(E + Eᵀ)·X with E_ij = exp(τ q_i·k_j − a_i − a_j), in one pass over the score tiles.

    With a_i = ½·log d_i (d the degrees of W = (A + Aᵀ)/2) this is the NCut operator
    D^-½ W D^-½ applied to X. q and k must have the same number of tokens. Passing the
    same tensor as q and k (VV graphs) lets backends compute only half the tiles.
    """
    _check_backend(backend)
    lay = _layout(q, k, x, scale, offset, None, head_weights, square=True)
    _reject_data_gradients(q=q, k=k, offset=offset, head_weights=head_weights)
    k4 = lay.q if q is k else lay.k  # keep the shared-tensor identity visible to backends
    y = call_op(_symmetric_op, _symmetric_impl, lay.q, k4, lay.x, lay.scale, lay.row_offset, lay.head_weights,
                backend, grad_inputs=(lay.x,))
    return y.reshape(*lay.out_batch, *y.shape[-2:])
