"""What every op of the primitive shares: input validation, the canonical 4-D layout, and
the small helpers of their torch.library registrations.

``_layout`` turns user tensors (any batch dims, shared X, offsets) into the canonical layout
of ``_layout.py`` that every backend receives, raising ValueError/TypeError that name the
argument. It never copies q/k and keeps a head-shared X un-expanded, so gradients of a
shared X sum over heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from .._validation import check_finite, check_same_device, check_tensor
from . import backends
from ._layout import compute_dtype

NORMALIZE_MODES = ("none", "row")


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


def broadcast_shapes(*shapes) -> tuple:
    """torch.broadcast_shapes without its first-call import of torch._refs (~0.3 s); raises
    RuntimeError when the shapes do not broadcast."""
    if torch.compiler.is_compiling():
        return tuple(torch.broadcast_shapes(*shapes))  # traceable; the loop below is not
    rank = 0
    for shape in shapes:
        rank = max(rank, len(shape))
    out = [1] * rank
    for shape in shapes:
        for i, size in enumerate(shape, start=rank - len(shape)):
            if size != 1 and out[i] not in (1, size):
                raise RuntimeError(f"shapes {shapes} do not broadcast")
            if size != 1:
                out[i] = size
    return tuple(out)


def call_op(op, impl, *args, grad_inputs=()):
    """Run a custom op, or its plain implementation where torch needs nothing more.

    The op (dispatcher, autograd, fake-tensor kernel) is needed under torch.compile, for
    autograd through ``grad_inputs``, and for tensor subclasses, meta tensors, functorch
    transforms or dispatch modes. Elsewhere the implementation is called directly: the
    dispatch costs tens of µs a call, and the first custom-op call in a process imports
    torch._dynamo (~1 s) — a visible share of a one-image CLI run.
    """
    if (torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs))):
        return op(*args)
    for a in args:
        if isinstance(a, Tensor) and (type(a) is not Tensor or a.is_meta
                                      or torch._C._functorch.is_functorch_wrapped_tensor(a)):
            return op(*args)
    return impl(*args)


def _broadcast_batch(name, shape, batch):
    try:
        if broadcast_shapes(shape, batch) != tuple(batch):
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


def _layout(q, k, x, scale, row_offset=None, col_offset=None, head_weights=None, *, square=False, w=None,
            row_name="row_offset"):
    check_tensor("q", q, min_dim=2, finite=False)
    check_tensor("k", k, min_dim=2, finite=False)
    if x is not None:
        check_tensor("x", x, min_dim=2, finite=False)
    if w is not None:
        check_tensor("w", w, min_dim=2, finite=False)
    for name, t in ((row_name, row_offset), ("col_offset", col_offset), ("head_weights", head_weights)):
        if t is not None:
            check_tensor(name, t, finite=False)
    device = check_same_device(q=q, k=k, x=x, w=w, **{row_name: row_offset}, col_offset=col_offset,
                               head_weights=head_weights)
    for name, t in (("q", q), ("k", k), ("x", x), ("w", w), (row_name, row_offset), ("col_offset", col_offset),
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
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2])
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
        row_offset=canon(_offset(row_name, row_offset, batch, n, device, offset_dtype), n),
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



def _check_backend(backend):
    if backend != "auto" and backend not in backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + backends.BACKEND_NAMES}, got {backend!r}")


def _shape_key(op: str, q, k, x):
    """What ``backend="auto"`` caches its choice by: the op being dispatched and its shape."""
    return (op, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], None if x is None else x.shape[-1],
            q.dtype)


def _out_shape(q, x, head_weights):
    g, h, n, _ = q.shape
    return (g, n, x.shape[-1]) if head_weights is not None else (g, h, n, x.shape[-1])


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
