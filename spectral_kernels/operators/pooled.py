"""Layers of different resolutions on one base grid: Gᵀ M G and Σ_l w_l G_lᵀ M_l G_l.

G = ``GridPooling`` maps base-grid rows to a layer's tokens (adaptive average pooling,
the official g_l); Gᵀ is its adjoint. Extra tokens (CLS, registers) are handled
explicitly: extra_tokens="drop" builds the layer's graph on its grid tokens only,
extra_tokens="mean" keeps them in the graph and ties each to the mean of the base grid.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..pooling import GridPooling
from .affinity import KQAffinity, VVAffinity, _head_weights
from .base import AffinityOperator, SumOperator

GRAPHS = ("kq", "vv")


class PooledOperator(AffinityOperator):
    """Gᵀ·op·G: an operator on a layer's tokens seen from the base grid (n_base × n_base)."""

    def __init__(self, op: AffinityOperator, pooling: GridPooling):
        if not isinstance(pooling, GridPooling):
            raise TypeError(f"pooling must be a GridPooling, got {type(pooling).__name__}")
        if op.shape[0] != pooling.n_tokens:
            raise ValueError(f"the operator acts on {op.shape[0]} tokens but the pooling produces "
                             f"{pooling.n_tokens} (grid {pooling.grid}, extra_tokens={pooling.extra_tokens!r})")
        self.op, self.pooling = op, pooling
        self.shape = (pooling.n_base, pooling.n_base)
        self.device, self.dtype, self.is_symmetric = op.device, op.dtype, op.is_symmetric

    def _matmul(self, x):
        return self.pooling.adjoint(self.op._matmul(self.pooling.pool(x)))

    def _adjoint_matmul(self, x):
        return self.pooling.adjoint(self.op._adjoint_matmul(self.pooling.pool(x)))


def _check_capture(capture, image):
    for name in ("q", "k", "v", "grid", "n_extra"):
        if not hasattr(capture, name):
            raise TypeError(f"captures must be LayerCapture-like (q, k, v, grid, n_extra, scale), "
                            f"got {type(capture).__name__} without {name!r}")
    batch = capture.q.shape[0]
    if not 0 <= image < batch:
        raise ValueError(f"image must index the capture's batch of {batch}, got {image}")


def _layer_tensors(capture, graph, image, extra_tokens):
    """(H, N, d) tensors of one image, with the extra tokens removed when they are dropped."""
    start = capture.n_extra if extra_tokens == "drop" else 0
    names = ("q", "k") if graph == "kq" else ("v",)
    return [getattr(capture, name)[image, :, start:] for name in names]


def _check_args(graph, base_grid, extra_tokens):
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if extra_tokens not in ("drop", "mean"):
        raise ValueError(f"extra_tokens must be 'drop' or 'mean', got {extra_tokens!r}")
    if base_grid is not None and (len(base_grid) != 2 or min(base_grid) <= 0):
        raise ValueError(f"base_grid must be a pair of positive ints, got {base_grid!r}")


def _pooled(op, capture, base_grid, extra_tokens):
    pooling = GridPooling(tuple(base_grid), tuple(capture.grid), capture.n_extra, extra_tokens)
    return op if pooling.is_identity else PooledOperator(op, pooling)


def layer_operator(capture, *, graph: str = "kq", normalize: str = "sym", base_grid=None,
                   extra_tokens: str = "drop", head_weights=None, temperature: float = 0.1,
                   image: int = 0, backend: str = "auto") -> AffinityOperator:
    """One captured layer's graph acting on base-grid X: G_lᵀ M_l G_l (just M_l on its own grid).

    Args:
        capture: a ``spectral_kernels.models.capture.LayerCapture`` (q, k, v (B, H, N, d)).
        graph: "kq" (attention, τ = capture.scale) or "vv" (value cosine, temperature).
        normalize: "sym", "row" or "none" (see ``KQAffinity``).
        base_grid: the grid X lives on; default the layer's own grid.
        extra_tokens: "drop" (graph on grid tokens only) or "mean" (extra tokens kept, each
            pooled from the mean of the base grid).
        image: which image of the capture's batch.
    """
    _check_args(graph, base_grid, extra_tokens)
    _check_capture(capture, image)
    tensors = _layer_tensors(capture, graph, image, extra_tokens)
    if graph == "kq":
        op = KQAffinity(*tensors, normalize=normalize, scale=capture.scale, head_weights=head_weights,
                        backend=backend)
    else:
        op = VVAffinity(*tensors, temperature=temperature, normalize=normalize, head_weights=head_weights,
                        backend=backend)
    return _pooled(op, capture, base_grid or capture.grid, extra_tokens)


def multilayer_operator(captures, *, graph: str = "kq", normalize: str = "sym", base_grid=None,
                        layer_weights=None, extra_tokens: str = "drop", head_weights=None,
                        temperature: float = 0.1, image: int = 0, backend: str = "auto") -> AffinityOperator:
    """Σ_l w_l·G_lᵀ M_l G_l over captured layers, on the finest grid unless base_grid is given.

    Layers that share a grid, token count and scale are fused into one operator whose
    heads are all their heads (weights w_l·w_h), so each resolution costs one primitive
    call per product. layer_weights (L,) default to 1/L (the mean over layers).
    """
    _check_args(graph, base_grid, extra_tokens)
    captures = list(captures)
    if not captures:
        raise ValueError("captures must contain at least one layer")
    for capture in captures:
        _check_capture(capture, image)
    n_layers = len(captures)
    if layer_weights is None:
        layer_weights = [1.0 / n_layers] * n_layers
    layer_weights = [float(w) for w in layer_weights]
    if len(layer_weights) != n_layers:
        raise ValueError(f"layer_weights must have one weight per layer ({n_layers}), got {len(layer_weights)}")
    if any(w < 0 for w in layer_weights) or not any(w > 0 for w in layer_weights):
        raise ValueError("layer_weights must be non-negative and not all zero")
    if base_grid is None:
        base_grid = max((tuple(c.grid) for c in captures), key=lambda g: g[0] * g[1])

    groups = defaultdict(list)
    for capture, weight in zip(captures, layer_weights):
        if weight == 0:
            continue
        tensors = _layer_tensors(capture, graph, image, extra_tokens)
        scale = capture.scale if graph == "kq" else None
        key = (tuple(capture.grid), capture.n_extra, tuple(tensors[0].shape[1:]), scale,
               tensors[0].dtype, tensors[0].device)
        groups[key].append((capture, weight, tensors))

    terms = []
    for layers in groups.values():
        # Each layer's head weights (normalised) times its layer weight, over all stacked heads.
        weights = [w * _head_weights(head_weights, t[0].shape[0], torch.float64, torch.device("cpu"))
                   for _, w, t in layers]
        group_weight = sum(w for _, w, _ in layers)
        stacked_weights = torch.cat(weights) / group_weight
        stacked = [torch.cat([t[i] for _, _, t in layers], dim=0) for i in range(len(layers[0][2]))]
        capture = layers[0][0]
        device = stacked[0].device
        if graph == "kq":
            op = KQAffinity(*stacked, normalize=normalize, scale=capture.scale,
                            head_weights=stacked_weights.to(device), backend=backend)
        else:
            op = VVAffinity(*stacked, temperature=temperature, normalize=normalize,
                            head_weights=stacked_weights.to(device), backend=backend)
        terms.append((group_weight, _pooled(op, capture, base_grid, extra_tokens)))
    if len(terms) == 1 and abs(terms[0][0] - 1.0) < 1e-12:
        return terms[0][1]
    return SumOperator(terms)
