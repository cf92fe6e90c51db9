"""Captured layers stacked by resolution, so one primitive call serves all layers of a grid.

Stable Diffusion has 16 self-attention layers on 4 grids: grouping them makes a solver
step 4 launches (plus their backward) instead of 16. A group holds q, k as
(L, B, H, N, d) with the extra tokens already removed (``extra_tokens="drop"``) and the
per-token log-space vectors that depend only on q, k, computed once per set of captures:
the log-degree offsets for the symmetric variants, the row log-sum-exp for the random-walk
one (then each solver step costs one symmetric pass per group, values and gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_tensor
from .models.capture import LayerCapture
from .objective import symmetric_offsets
from .ops import affinity_logsumexp
from .pooling import GridPooling

__all__ = ["LayerGroup", "group_layers", "GRAPHS"]

GRAPHS = ("kq", "vv")


@dataclass
class LayerGroup:
    """Layers of one resolution: q, k (L, B, H, N, d), their names, scale and pooling.

    offsets: ``symmetric_offsets`` (L, B, H, N) (symmetric variants) or None.
    row_lse: row log-sum-exp of τ q kᵀ (L, B, H, N) (random-walk variant) or None.
    """
    names: list[str]
    q: Tensor
    k: Tensor
    scale: float
    pooling: GridPooling
    offsets: Tensor | None = field(default=None)
    row_lse: Tensor | None = field(default=None)

    @property
    def n_layers(self) -> int:
        return self.q.shape[0]

    @property
    def shares_qk(self) -> bool:
        return self.q is self.k


def _layer_graph(capture: LayerCapture, graph: str, temperature: float, extra_tokens: str):
    """(q, k, scale) of one layer's graph; VV uses q = k = normalised v and τ = 1/t."""
    e = capture.n_extra if extra_tokens == "drop" else 0
    if graph == "kq":
        return capture.q[:, :, e:], capture.k[:, :, e:], float(capture.scale)
    v = F.normalize(capture.v[:, :, e:], dim=-1)
    return v, v, 1.0 / temperature


def group_layers(captures, *, base_grid: tuple[int, int], graph: str = "kq", temperature: float = 0.1,
                 extra_tokens: str = "drop", with_offsets: bool = False, with_row_lse: bool = False,
                 qk_dtype: torch.dtype | None = None, backend: str = "auto") -> list[LayerGroup]:
    """Stack the captured layers of equal (grid, extra tokens, heads, width, scale) into groups.

    ``with_offsets`` computes each group's ``symmetric_offsets`` and ``with_row_lse`` its row
    log-sum-exp (one pass each, here instead of in every step). ``qk_dtype`` casts q and k
    once (e.g. bfloat16 for tensor-core score tiles on a GPU).
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    captures = list(captures)
    if not captures:
        raise ValueError("captures must hold at least one LayerCapture")
    batch = None
    buckets: dict[tuple, list] = {}
    for i, cap in enumerate(captures):
        if not isinstance(cap, LayerCapture):
            raise TypeError(f"captures[{i}] must be a LayerCapture, got {type(cap).__name__}")
        if batch is None:
            batch = cap.q.shape[0]
        elif cap.q.shape[0] != batch:
            raise ValueError(f"captures[{i}] ({cap.name!r}) has {cap.q.shape[0]} images, captures[0] has {batch}")
        q, k, scale = _layer_graph(cap, graph, temperature, extra_tokens)
        key = (tuple(cap.grid), cap.n_extra, tuple(q.shape), q.dtype, scale)
        buckets.setdefault(key, []).append((cap.name, q, k))

    groups = []
    for (grid, n_extra, _, _, scale), members in buckets.items():
        names = [m[0] for m in members]
        q = torch.stack([m[1] for m in members])
        shared = all(m[1] is m[2] for m in members)
        k = q if shared else torch.stack([m[2] for m in members])
        if qk_dtype is not None:
            q = q.to(qk_dtype)
            k = q if shared else k.to(qk_dtype)
        # Scanned here unconditionally (once per set of captures), also while the solver
        # switches off the primitive's per-call scans.
        for label, t in (("q", q), ("k", None if shared else k)):
            if t is not None:
                check_tensor(f"{label} of layers {names}", t, finite=False)
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{label} of layers {names} contains NaN or Inf values")
        pooling = GridPooling(tuple(base_grid), tuple(grid), n_extra, extra_tokens)
        offsets = symmetric_offsets(q, k, scale=scale, backend=backend) if with_offsets else None
        row_lse = affinity_logsumexp(q, k, scale=scale, backend=backend) if with_row_lse else None
        groups.append(LayerGroup(names, q, k, scale, pooling, offsets, row_lse))
    return groups
