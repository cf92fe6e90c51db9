"""The one capture mechanism: forward hooks on the q, k, v projections of attention layers.

An adapter describes each attention layer as an ``AttentionSite`` — which modules produce
q, k and v (three Linears, or one fused qkv Linear), how many heads, how many extra
(CLS/register) tokens lead the sequence, and how to find the token grid. ``record`` hooks
those modules, runs the model once, always removes the hooks, and returns one
``LayerCapture`` per site with q, k, v as (B, H, N, d).

Sites also name the attention module and its output projection; the tests use them to
check that softmax(τ q kᵀ) v, merged and projected, equals what the layer itself computed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .capture import LayerCapture

GridFn = Callable[[int], tuple[int, int]]  # number of grid tokens -> (h, w)


@dataclass
class AttentionSite:
    """Where one attention layer's q, k, v come from.

    ``projections`` maps "q", "k", "v" to the Linear producing each (B, N, H·d), or "qkv"
    to one fused Linear producing (B, N, 3·H·d) in q, k, v order (timm). ``grid`` maps the
    number of grid tokens to (h, w). ``module`` is the attention module (its output is the
    projected attention result, or a tuple whose first item is) and ``out_proj`` the output
    projection applied to merged heads (B, N, H·d).
    """
    name: str
    projections: dict[str, nn.Module]
    num_heads: int
    grid: GridFn
    n_extra: int = 0
    scale: float | None = None
    module: nn.Module | None = None
    out_proj: Callable[[torch.Tensor], torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        keys = set(self.projections)
        if keys not in ({"q", "k", "v"}, {"qkv"}):
            raise ValueError(f"site {self.name!r}: projections must be q, k, v or qkv, got {sorted(keys)}")


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    b, n, c = t.shape
    if c % num_heads:
        raise ValueError(f"projection width {c} is not divisible by {num_heads} heads")
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _site_qkv(site: AttentionSite, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # contiguous copies: consumers get plain (B, H, N, d) tensors, and a fused qkv buffer is not kept alive
    if "qkv" in outputs:
        fused = outputs["qkv"]
        return tuple(split_heads(t, site.num_heads).contiguous() for t in fused.chunk(3, dim=-1))
    return tuple(split_heads(outputs[key], site.num_heads).contiguous() for key in ("q", "k", "v"))


@contextmanager
def hooked(sites: list[AttentionSite], *, dtype: torch.dtype | None = None, detach: bool = True):
    """Within the block, projections' outputs are recorded; yields a function → captures.

    A site whose modules ran several times in one forward keeps the last call. Hooks are
    removed on exit even if the forward raised.
    """
    recorded: list[dict[str, torch.Tensor]] = [dict() for _ in sites]
    handles = []

    def make_hook(store: dict, key: str):
        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            t = t.detach() if detach else t
            store[key] = t.to(dtype) if dtype is not None else t
        return hook

    try:
        for site, store in zip(sites, recorded):
            for key, module in site.projections.items():
                handles.append(module.register_forward_hook(make_hook(store, key)))

        def collect() -> list[LayerCapture]:
            captures = []
            for site, store in zip(sites, recorded):
                if set(store) != set(site.projections):
                    raise RuntimeError(f"attention layer {site.name!r} did not run during the forward pass")
                q, k, v = _site_qkv(site, store)
                if q.dim() != 4:
                    raise ValueError(f"layer {site.name!r}: projections must be (B, N, C) token sequences, "
                                     f"got q of shape {tuple(q.shape)}")
                grid = tuple(int(g) for g in site.grid(q.shape[2] - site.n_extra))
                captures.append(LayerCapture(site.name, q, k, v, grid, site.n_extra, site.scale,
                                             dict(site.meta)))
            return captures

        yield collect
    finally:
        for h in handles:
            h.remove()


def record(sites: list[AttentionSite], run: Callable[[], object], **kw) -> list[LayerCapture]:
    """Run ``run()`` with the sites hooked and return their captures (in site order)."""
    with hooked(sites, **kw) as collect:
        with torch.no_grad():
            run()
        return collect()


def fixed_grid(grid: tuple[int, int]) -> GridFn:
    """Grid function for a ViT: every layer sees the same patch grid."""
    def fn(n: int) -> tuple[int, int]:
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} grid tokens do not fill the patch grid {grid}")
        return grid
    return fn


def downsampled_grid(base: tuple[int, int]) -> GridFn:
    """Grid function for a U-Net: the base grid halved (rounding up) until it holds n tokens."""
    def fn(n: int) -> tuple[int, int]:
        h, w = base
        while h * w > n:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != n:
            raise ValueError(f"{n} tokens are not a power-of-two downsampling of the latent grid {base}")
        return h, w
    return fn
