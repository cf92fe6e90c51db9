"""The primitive's row products: affinity_matmul (offset form or softmax rows) and
affinity_logsumexp, each a torch.library custom op over the backends.

    affinity_matmul:     Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j) X_j   (or softmax rows)
    affinity_logsumexp:  r_i = log Σ_j exp(τ q_i·k_j − β_j)

The autograd of affinity_matmul gives the gradient with respect to ``x`` through the
transposed product; ``q``, ``k`` and the offsets are data: asking for their gradient is an
error. The symmetric product lives in ``symmetric.py`` and the pair product in ``pair.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._common import (_check_backend, _check_normalize, _layout, _out_shape, _reject_data_gradients,
                      _shape_key, _transposed_cotangent, call_op)
from ._layout import compute_dtype

__all__ = ["affinity_matmul", "affinity_logsumexp"]


# --------------------------------------------------------------------------- custom ops
def _matmul_impl(q: Tensor, k: Tensor, x: Tensor, scale: float, row_offset: Optional[Tensor],
               col_offset: Optional[Tensor], normalize: str, head_weights: Optional[Tensor],
               backend: str) -> tuple[Tensor, Tensor]:
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k, x)
    if n == 0 or k.shape[2] == 0 or x.shape[-1] == 0:
        y = torch.zeros(_out_shape(q, x, head_weights), dtype=x.dtype, device=q.device)
        lse = torch.full((g, h, n), -math.inf, dtype=dtype, device=q.device)
        return y, (lse if normalize == "row" else lse.new_empty(0))
    x4 = x.expand(g, h, *x.shape[2:])

    def run(module):
        return module.matmul(q, k, x4, scale=scale, row_offset=row_offset, col_offset=col_offset,
                             normalize=normalize, head_weights=head_weights)

    y, lse = run(backends.resolve(backend, q.device, dtype, _shape_key(f"matmul_{normalize}", q, k, x), run))
    return y.to(x.dtype), (lse.to(dtype) if lse is not None else y.new_empty(0, dtype=dtype))


_matmul_op = torch.library.custom_op("spectral_kernels::affinity_matmul", _matmul_impl, mutates_args=())


@_matmul_op.register_fake
def _(q, k, x, scale, row_offset, col_offset, normalize, head_weights, backend):
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k, x)
    y = x.new_empty(_out_shape(q, x, head_weights))
    lse = q.new_empty((g, h, n) if normalize == "row" else (0,), dtype=dtype)
    return y, lse


def _matmul_setup(ctx, inputs, output):
    q, k, x, scale, row_offset, col_offset, normalize, head_weights, backend = inputs
    ctx.save_for_backward(q, k, row_offset, col_offset, head_weights, output[1] if normalize == "row" else None)
    ctx.scale, ctx.normalize, ctx.backend, ctx.x_heads, ctx.x_dtype = scale, normalize, backend, x.shape[1], x.dtype


def _matmul_backward(ctx, grad_y, grad_lse):
    q, k, row_offset, col_offset, head_weights, lse = ctx.saved_tensors
    cot, weights = _transposed_cotangent(grad_y, ctx.x_heads, head_weights, q.shape[1])
    # Eᵀ_ji = exp(S_ij − α_i − β_j): swap q/k and the offsets; a softmax adds its LSE to α.
    alpha = row_offset
    if ctx.normalize == "row":
        alpha = lse if alpha is None else alpha + lse
    dx, _ = _matmul_op(k, q, cot, ctx.scale, col_offset, alpha, "none", weights, ctx.backend)
    if weights is not None:
        dx = dx.unsqueeze(1)
    return None, None, dx.to(ctx.x_dtype), None, None, None, None, None, None


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


def _logsumexp_impl(q: Tensor, k: Tensor, scale: float, col_offset: Optional[Tensor], backend: str) -> Tensor:
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k)
    if n == 0 or k.shape[2] == 0:
        return torch.full((g, h, n), -math.inf, dtype=dtype, device=q.device)

    def run(module):
        return module.logsumexp(q, k, scale=scale, col_offset=col_offset)

    return run(backends.resolve(backend, q.device, dtype, _shape_key("logsumexp", q, k, None), run)).to(dtype)


_logsumexp_op = torch.library.custom_op("spectral_kernels::affinity_logsumexp", _logsumexp_impl, mutates_args=())


@_logsumexp_op.register_fake
def _(q, k, scale, col_offset, backend):
    return q.new_empty(q.shape[:3], dtype=compute_dtype(q, k))


def _rows_cols_impl(q: Tensor, k: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    g, h, n, _ = q.shape
    m_tokens = k.shape[2]
    dtype = compute_dtype(q, k)
    if n == 0 or m_tokens == 0:
        return (torch.full((g, h, n), -math.inf, dtype=dtype, device=q.device),
                torch.full((g, h, m_tokens), -math.inf, dtype=dtype, device=q.device))

    def run(module):
        one_pass = getattr(module, "logsumexp_rows_and_cols", None)
        if one_pass is not None:
            return one_pass(q, k, scale=scale)
        # backends without it: the column LSE is the row LSE with q and k swapped
        return module.logsumexp(q, k, scale=scale), module.logsumexp(k, q, scale=scale)

    r, c = run(backends.resolve(backend, q.device, dtype, _shape_key("logsumexp_rows_and_cols", q, k, None), run))
    return r.to(dtype), c.to(dtype)


_rows_cols_op = torch.library.custom_op("spectral_kernels::affinity_logsumexp_rows_cols", _rows_cols_impl,
                                        mutates_args=())


@_rows_cols_op.register_fake
def _(q, k, scale, backend):
    dtype = compute_dtype(q, k)
    return q.new_empty(q.shape[:3], dtype=dtype), k.new_empty(k.shape[:3], dtype=dtype)


# --------------------------------------------------------------------------- public API
def affinity_matmul(q: Tensor, k: Tensor, x: Tensor, *, scale: float | None = None,
                    row_offset: Tensor | None = None, col_offset: Tensor | None = None,
                    normalize: str = "none", head_weights: Tensor | None = None,
                    return_lse: bool = False, backend: str = "auto"):
    """Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j) X_j without forming the N×M matrix.

    Args:
        q: (..., N, d) query features; k: (..., M, d) key features (same dtype).
        x: (..., M, m) right-hand side. Its batch dims broadcast against q/k's; with
            ``head_weights`` it may omit the head dim (one X shared by all heads).
        scale: τ, default 1/sqrt(d).
        row_offset: α, (..., N); col_offset: β, (..., M). Both broadcast over batch dims.
        normalize: "none" for the offset form, "row" for softmax rows: Y = softmax(S − β)·X
            (times e^{−α} when a row offset is given), computed in one online pass.
        head_weights: (H,) weights of the head dim (q/k dim −3); the result is Σ_h w_h·Y_h
            with shape (..., N, m) where ... excludes the head dim.
        return_lse: with normalize="row", also return the row log-sum-exp r (..., N).
        backend: "auto", "dense", "torch", "triton" or "cuda".

    Returns Y in x's dtype (accumulated in fp32 or fp64), and the LSE when asked.
    """
    _check_normalize(normalize)
    _check_backend(backend)
    if return_lse and normalize != "row":
        raise ValueError('return_lse=True needs normalize="row"')
    lay = _layout(q, k, x, scale, row_offset, col_offset, head_weights)
    _reject_data_gradients(q=q, k=k, row_offset=row_offset, col_offset=col_offset, head_weights=head_weights)
    y, lse = call_op(_matmul_op, _matmul_impl, lay.q, lay.k, lay.x, lay.scale, lay.row_offset, lay.col_offset,
                     normalize, lay.head_weights, backend, grad_inputs=(lay.x,))
    y = y.reshape(*lay.out_batch, *y.shape[-2:])
    if return_lse:
        return y, lse.reshape(*lay.lse_batch, lse.shape[-1])
    return y


def affinity_logsumexp(q: Tensor, k: Tensor, *, scale: float | None = None,
                       col_offset: Tensor | None = None, return_col_lse: bool = False,
                       backend: str = "auto"):
    """r_i = log Σ_j exp(τ q_i·k_j − β_j), shape (..., N). Swap q and k for column sums.

    With ``return_col_lse`` (and no col_offset) also c_j = log Σ_i exp(τ q_i·k_j), shape
    (..., M), from the same pass where the backend can (torch; others run two passes):
    returns (r, c).
    """
    _check_backend(backend)
    if return_col_lse and col_offset is not None:
        raise ValueError("return_col_lse=True needs col_offset=None (the column sums of exp(S − β) "
                         "are not what a column LSE means)")
    lay = _layout(q, k, None, scale, None, col_offset)
    if return_col_lse:
        r, c = call_op(_rows_cols_op, _rows_cols_impl, lay.q, lay.k, lay.scale, backend)
        return r.reshape(*lay.lse_batch, r.shape[-1]), c.reshape(*lay.lse_batch, c.shape[-1])
    r = call_op(_logsumexp_op, _logsumexp_impl, lay.q, lay.k, lay.scale, lay.col_offset, backend)
    return r.reshape(*lay.lse_batch, r.shape[-1])
