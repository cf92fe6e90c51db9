"""The public primitive: validation → canonical layout → torch.library op → backend.

    affinity_matmul:            Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j) X_j   (or softmax rows)
    affinity_logsumexp:         r_i = log Σ_j exp(τ q_i·k_j − β_j)
    affinity_symmetric_matmul:  ½(E + Eᵀ) X,  E_ij = exp(τ q_i·k_j − a_i − a_j)

Each is registered as a ``torch.library`` custom op (so it works under ``torch.compile``)
whose autograd gives the gradient with respect to ``x`` through the transposed product.
``q``, ``k`` and the offsets are data: asking for their gradient is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validation import check_finite, check_same_device, check_tensor
from . import backends
from ._layout import compute_dtype

__all__ = ["affinity_matmul", "affinity_logsumexp", "affinity_symmetric_matmul", "affinity_matmul_pair"]

NORMALIZE_MODES = ("none", "row")


# --------------------------------------------------------------------------- validation
@dataclass
class _Layout:
    """Canonical 4-D views of the inputs and the shape to give the result back in."""
    q: Tensor
    k: Tensor
    x: Optional[Tensor]
    w: Optional[Tensor]
    row_offset: Optional[Tensor]
    col_offset: Optional[Tensor]
    head_weights: Optional[Tensor]
    scale: float
    out_batch: tuple
    lse_batch: tuple


def resolve_scale(scale, d):
    """τ: the given scale checked finite, or 1/sqrt(d) when None."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, Tensor):
        scale = float(scale)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _broadcast_batch(name, shape, batch):
    try:
        if torch.broadcast_shapes(shape, batch) != torch.Size(batch):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} has batch dimensions {tuple(shape)} that do not broadcast to "
                         f"q/k's batch dimensions {tuple(batch)}") from None


def _offset(name, t, batch, length, device, dtype):
    if t is None:
        return None
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (..., {length}), got a scalar")
    if t.shape[-1] != length:
        raise ValueError(f"{name} must have shape (..., {length}) matching the tokens, got {tuple(t.shape)}")
    _broadcast_batch(name, t.shape[:-1], batch)
    return t.to(dtype).expand(*batch, length)


def _canonical_rhs(name, x, batch, groups, heads, weighted):
    """(G, H or 1, rows, m) view of a right-hand side; a head dim of 1 means shared by the heads."""
    x_batch = tuple(x.shape[:-2])
    if weighted and len(x_batch) < len(batch):
        # X shared by the heads: its batch dims match q/k's without the head dim.
        _broadcast_batch(name, x_batch, batch[:-1])
        return x.expand(*batch[:-1], *x.shape[-2:]).reshape(groups, 1, *x.shape[-2:])
    _broadcast_batch(name, x_batch, batch)
    if len(x_batch) < len(batch) or x_batch[-1] == 1:
        # One X for every head: keep it un-expanded so the gradient sums over heads.
        xb = x.reshape(*x_batch[:-1], *x.shape[-2:]) if len(x_batch) == len(batch) else x
        return xb.expand(*batch[:-1], *x.shape[-2:]).reshape(groups, 1, *x.shape[-2:])
    return x.expand(*batch, *x.shape[-2:]).reshape(groups, heads, *x.shape[-2:])


def _layout(q, k, x, scale, row_offset=None, col_offset=None, head_weights=None, *, square=False, w=None):
    check_tensor("q", q, min_dim=2, finite=False)
    check_tensor("k", k, min_dim=2, finite=False)
    if x is not None:
        check_tensor("x", x, min_dim=2, finite=False)
    if w is not None:
        check_tensor("w", w, min_dim=2, finite=False)
    for name, t in (("row_offset", row_offset), ("col_offset", col_offset), ("head_weights", head_weights)):
        if t is not None:
            check_tensor(name, t, finite=False)
    device = check_same_device(q=q, k=k, x=x, w=w, row_offset=row_offset, col_offset=col_offset,
                               head_weights=head_weights)
    for name, t in (("q", q), ("k", k), ("x", x), ("w", w), ("row_offset", row_offset), ("col_offset", col_offset),
                    ("head_weights", head_weights)):
        if t is not None:
            check_finite(name, t)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    n, d = q.shape[-2:]
    m_tokens = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same feature dimension, got q (..., {n}, {d}) and "
                         f"k (..., {m_tokens}, {k.shape[-1]})")
    if d == 0:
        raise ValueError("q and k must have at least one feature (d ≥ 1)")
    if square and n != m_tokens:
        raise ValueError(f"the symmetric product needs q and k with the same number of tokens, got {n} and {m_tokens}")
    if x is not None and x.shape[-2] != m_tokens:
        raise ValueError(f"x must have one row per key token: x has {x.shape[-2]} rows, k has {m_tokens}")
    try:
        batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    except RuntimeError:
        raise ValueError(f"q and k batch dimensions do not broadcast: {tuple(q.shape[:-2])} vs {tuple(k.shape[:-2])}") from None
    scale = resolve_scale(scale, d)
    offset_dtype = compute_dtype(q, k, x, w)

    if head_weights is not None:
        if head_weights.dim() != 1:
            raise ValueError(f"head_weights must be 1-D (one weight per head), got shape {tuple(head_weights.shape)}")
        if not batch or head_weights.shape[0] != batch[-1]:
            raise ValueError(f"head_weights must have one weight per head (q/k dimension -3 = "
                             f"{batch[-1] if batch else 'absent'}), got shape {tuple(head_weights.shape)}")
        head_weights = head_weights.to(offset_dtype)
    if not batch:
        batch = (1,)
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        out_batch, lse_batch = (), ()
    else:
        out_batch = batch[:-1] if head_weights is not None else batch
        lse_batch = batch
    groups = math.prod(batch[:-1])
    heads = batch[-1]

    x4 = None if x is None else _canonical_rhs("x", x, batch, groups, heads, head_weights is not None)
    w4 = None
    if w is not None:
        if w.shape[-2] != n:
            raise ValueError(f"w must have one row per query token: w has {w.shape[-2]} rows, q has {n}")
        if x is not None and w.shape[-1] != x.shape[-1]:
            raise ValueError(f"w and x must have the same width, got {w.shape[-1]} and {x.shape[-1]}")
        w4 = _canonical_rhs("w", w, batch, groups, heads, False)

    def canon(t, length):
        return None if t is None else t.reshape(groups, heads, length)

    return _Layout(
        q=q.expand(*batch, n, d).reshape(groups, heads, n, d),
        k=k.expand(*batch, m_tokens, d).reshape(groups, heads, m_tokens, d),
        x=x4,
        w=w4,
        row_offset=canon(_offset("row_offset", row_offset, batch, n, device, offset_dtype), n),
        col_offset=canon(_offset("col_offset", col_offset, batch, m_tokens, device, offset_dtype), m_tokens),
        head_weights=head_weights,
        scale=scale,
        out_batch=out_batch,
        lse_batch=lse_batch,
    )


def _reject_data_gradients(**tensors):
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad, but gradients flow only to x; pass {name}.detach()")


def _check_normalize(normalize):
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


# --------------------------------------------------------------------------- custom ops
def _shape_key(q, k, x):
    return (q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], None if x is None else x.shape[-1], q.dtype)


def _out_shape(q, x, head_weights):
    g, h, n, _ = q.shape
    return (g, n, x.shape[-1]) if head_weights is not None else (g, h, n, x.shape[-1])


@torch.library.custom_op("spectral_kernels::affinity_matmul", mutates_args=())
def _matmul_op(q: Tensor, k: Tensor, x: Tensor, scale: float, row_offset: Optional[Tensor],
               col_offset: Optional[Tensor], normalize: str, head_weights: Optional[Tensor],
               backend: str) -> tuple[Tensor, Tensor]:
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k, x)
    if n == 0 or k.shape[2] == 0 or x.shape[-1] == 0:
        y = torch.zeros(_out_shape(q, x, head_weights), dtype=x.dtype, device=q.device)
        lse = torch.full((g, h, n), -math.inf, dtype=dtype, device=q.device)
        return y, (lse if normalize == "row" else lse.new_empty(0))
    module = backends.resolve(backend, q.device, dtype, _shape_key(q, k, x))
    y, lse = module.matmul(q, k, x.expand(g, h, *x.shape[2:]), scale=scale, row_offset=row_offset,
                           col_offset=col_offset, normalize=normalize, head_weights=head_weights)
    return y.to(x.dtype), (lse.to(dtype) if lse is not None else y.new_empty(0, dtype=dtype))


@_matmul_op.register_fake
def _(q, k, x, scale, row_offset, col_offset, normalize, head_weights, backend):
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k, x)
    y = x.new_empty(_out_shape(q, x, head_weights))
    lse = q.new_empty((g, h, n) if normalize == "row" else (0,), dtype=dtype)
    return y, lse


def _transposed_cotangent(grad, x_heads, head_weights, heads):
    """Cotangent and head weights so that one transposed product gives x's gradient.

    grad is (G, N, m) when heads were summed with weights, else (G, H, N, m). The result,
    fed to the transposed product, yields (G, M, m) when weights come back (X was shared
    by the heads, so its gradient sums over them) and (G, H, M, m) otherwise.
    """
    if head_weights is not None:
        grad = grad.unsqueeze(1)
        if x_heads == 1:
            return grad, head_weights
        return grad * head_weights.to(grad.dtype)[:, None, None], None
    if x_heads == 1 and heads > 1:
        return grad, torch.ones(heads, dtype=compute_dtype(grad), device=grad.device)
    return grad, None


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


@torch.library.custom_op("spectral_kernels::affinity_logsumexp", mutates_args=())
def _logsumexp_op(q: Tensor, k: Tensor, scale: float, col_offset: Optional[Tensor], backend: str) -> Tensor:
    g, h, n, _ = q.shape
    dtype = compute_dtype(q, k)
    if n == 0 or k.shape[2] == 0:
        return torch.full((g, h, n), -math.inf, dtype=dtype, device=q.device)
    module = backends.resolve(backend, q.device, dtype, _shape_key(q, k, None))
    return module.logsumexp(q, k, scale=scale, col_offset=col_offset).to(dtype)


@_logsumexp_op.register_fake
def _(q, k, scale, col_offset, backend):
    return q.new_empty(q.shape[:3], dtype=compute_dtype(q, k))


@torch.library.custom_op("spectral_kernels::affinity_symmetric_matmul", mutates_args=())
def _symmetric_op(q: Tensor, k: Tensor, x: Tensor, scale: float, offset: Optional[Tensor],
                  head_weights: Optional[Tensor], backend: str) -> Tensor:
    g, h, n, _ = q.shape
    if n == 0 or x.shape[-1] == 0:
        return torch.zeros(_out_shape(q, x, head_weights), dtype=x.dtype, device=q.device)
    module = backends.resolve(backend, q.device, compute_dtype(q, k, x), _shape_key(q, k, x))
    y = module.symmetric_matmul(q, k, x.expand(g, h, *x.shape[2:]), scale=scale, offset=offset,
                                head_weights=head_weights)
    return y.to(x.dtype)


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


def _pair_with_two_calls(module, q, k, x, w, scale, row_offset, col_offset):
    """(E·X, Eᵀ·W) from two offset-form products, for backends without a fused pair kernel."""
    y, _ = module.matmul(q, k, x, scale=scale, row_offset=row_offset, col_offset=col_offset,
                         normalize="none", head_weights=None)
    yt, _ = module.matmul(k, q, w, scale=scale, row_offset=col_offset, col_offset=row_offset,
                          normalize="none", head_weights=None)
    return y, yt


@torch.library.custom_op("spectral_kernels::affinity_matmul_pair", mutates_args=())
def _pair_op(q: Tensor, k: Tensor, x: Tensor, w: Tensor, scale: float, row_offset: Optional[Tensor],
             col_offset: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    g, h, n, _ = q.shape
    m_tokens = k.shape[2]
    if n == 0 or m_tokens == 0 or x.shape[-1] == 0:
        return (torch.zeros(g, h, n, x.shape[-1], dtype=x.dtype, device=q.device),
                torch.zeros(g, h, m_tokens, w.shape[-1], dtype=w.dtype, device=q.device))
    module = backends.resolve(backend, q.device, compute_dtype(q, k, x, w), _shape_key(q, k, x))
    x4, w4 = x.expand(g, h, *x.shape[2:]), w.expand(g, h, *w.shape[2:])
    fused = getattr(module, "matmul_pair", None)
    if fused is not None:
        y, yt = fused(q, k, x4, w4, scale=scale, row_offset=row_offset, col_offset=col_offset)
    else:
        y, yt = _pair_with_two_calls(module, q, k, x4, w4, scale, row_offset, col_offset)
    return y.to(x.dtype), yt.to(w.dtype)


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


# --------------------------------------------------------------------------- public API
def _check_backend(backend):
    if backend != "auto" and backend not in backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + backends.BACKEND_NAMES}, got {backend!r}")


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
    y, lse = _matmul_op(lay.q, lay.k, lay.x, lay.scale, lay.row_offset, lay.col_offset, normalize,
                        lay.head_weights, backend)
    y = y.reshape(*lay.out_batch, *y.shape[-2:])
    if return_lse:
        return y, lse.reshape(*lay.lse_batch, lse.shape[-1])
    return y


def affinity_logsumexp(q: Tensor, k: Tensor, *, scale: float | None = None,
                       col_offset: Tensor | None = None, backend: str = "auto") -> Tensor:
    """r_i = log Σ_j exp(τ q_i·k_j − β_j), shape (..., N). Swap q and k for column sums."""
    _check_backend(backend)
    lay = _layout(q, k, None, scale, None, col_offset)
    r = _logsumexp_op(lay.q, lay.k, lay.scale, lay.col_offset, backend)
    return r.reshape(*lay.lse_batch, r.shape[-1])


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
    y = _symmetric_op(lay.q, k4, lay.x, lay.scale, lay.row_offset, lay.head_weights, backend)
    return y.reshape(*lay.out_batch, *y.shape[-2:])


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
    y, yt = _pair_op(lay.q, lay.k, lay.x, lay.w, lay.scale, lay.row_offset, lay.col_offset, backend)
    return y.reshape(*lay.out_batch, *y.shape[-2:]), yt.reshape(*lay.out_batch, *yt.shape[-2:])
