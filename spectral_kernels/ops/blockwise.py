"""Blockwise torch backend: the primitive over row × column tiles of S = τ·Q·Kᵀ.

Runs on any device torch supports (the default on CPU). Peak extra memory is one
score tile per batch entry (``B·tile_rows·tile_cols``) plus the N×m accumulators;
no N×M array is ever formed.

Takes the canonical 4-D layout of ``spectral_kernels.ops._layout`` and works on the
flattened (B = G·H, ...) batch internally.
"""
from __future__ import annotations

import math

import torch

from ._layout import compute_dtype as _compute_dtype, flat, reduce_heads, same_tensor, symmetric_offsets_args, unflat

__all__ = ["matmul", "logsumexp", "logsumexp_rows_and_cols", "symmetric_matmul", "matmul_pair", "tile_sizes"]

# Elements of one score tile across the whole batch. 2**22 fp32 = 16 MiB: big enough that
# the per-tile Python overhead is negligible next to the matmul, small enough to stay in
# the last-level cache on a server CPU and irrelevant on a GPU.
TILE_ELEMENTS = 1 << 22


def tile_sizes(batch: int, n: int, m: int, tile_elements: int | None = None) -> tuple[int, int]:
    """Row and column tile sizes whose score tile holds ≤ ``tile_elements`` entries."""
    tile_elements = tile_elements or TILE_ELEMENTS  # read at call time so it can be tuned
    per_batch = max(tile_elements // max(batch, 1), 64 * 64)
    cols = min(max(m, 1), max(per_batch // 256, 64))
    rows = min(max(n, 1), max(per_batch // cols, 1))
    return rows, cols


class _ScoreTiles:
    """The score tiles S_ij − α_i − β_j of one call, each one GEMM into one reused buffer.

    Offsets are folded into the GEMM operands, [τq_i, −α_i, 1]·[k_j, 1, −β_j] = τ q_i·k_j −
    α_i − β_j: one matmul per tile instead of a matmul and one or two more passes over it
    (the inner dimension grows by at most 2, which costs nothing measurable).
    Every tile is written into the same buffer with ``out=``: a fresh tile-sized tensor per
    tile costs page faults on CPU (large blocks go back to the OS) that take as long as the
    tile's matmul. Edge tiles use a contiguous prefix of the buffer.
    """

    def __init__(self, q, k, scale, rows, cols, row_offset=None, col_offset=None):
        lhs, rhs = [q * scale], [k]
        if row_offset is not None:
            lhs.append(-row_offset[..., None])
            rhs.append(torch.ones_like(k[..., :1]))
        if col_offset is not None:
            lhs.append(torch.ones_like(q[..., :1]))
            rhs.append(-col_offset[..., None])
        self.lhs = torch.cat(lhs, -1) if len(lhs) > 1 else lhs[0]
        self.rhs = torch.cat(rhs, -1) if len(rhs) > 1 else rhs[0]
        self.batch = q.shape[0]
        self._buffer = _Buffer(self.batch, rows, cols, q.dtype, q.device)

    def __call__(self, i0, i1, j0, j1):
        s = self._buffer.view(self.batch, i1 - i0, j1 - j0)
        return torch.bmm(self.lhs[:, i0:i1], self.rhs[:, j0:j1].transpose(1, 2), out=s)


class _Buffer:
    """A reusable flat buffer handing out dense (B, r, c) views of its prefix."""

    def __init__(self, batch, rows, cols, dtype, device):
        self._flat = torch.empty(batch * rows * cols, dtype=dtype, device=device)

    def view(self, batch, rows, cols):
        return self._flat[: batch * rows * cols].view(batch, rows, cols)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def matmul(q, k, x, *, scale, row_offset=None, col_offset=None, normalize="none",
           head_weights=None, tile_elements=None):
    """Y_i = Σ_j exp(S_ij − α_i − β_j) X_j, or the softmax form; returns (Y, LSE or None)."""
    groups = q.shape[0]
    dtype = _compute_dtype(q, k, x)
    q, k, x = flat(q).to(dtype), flat(k).to(dtype), flat(x).to(dtype)
    row_offset, col_offset = _cast(flat(row_offset), dtype), _cast(flat(col_offset), dtype)
    batch, n, _ = q.shape
    m_cols, width = k.shape[1], x.shape[2]
    y = torch.zeros(batch, n, width, dtype=dtype, device=q.device)
    lse = torch.full((batch, n), -math.inf, dtype=dtype, device=q.device) if normalize == "row" else None
    rows, cols = tile_sizes(batch, n, m_cols, tile_elements)
    # Row offsets of the softmax form are applied to Y at the end, not to the scores.
    tiles = _ScoreTiles(q, k, scale, rows, cols, None if normalize == "row" else row_offset, col_offset)
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        if normalize == "row":
            y[:, i0:i1], lse[:, i0:i1] = _online_softmax_rows(tiles, i0, i1, m_cols, x, cols)
        else:
            # A contiguous accumulator: baddbmm_ into a strided slice of y is several times
            # slower on CPU (it falls back to one gemm per batch entry).
            acc = torch.zeros(batch, i1 - i0, width, dtype=dtype, device=q.device)
            for j0 in range(0, m_cols, cols):
                j1 = min(j0 + cols, m_cols)
                acc.baddbmm_(tiles(i0, i1, j0, j1).exp_(), x[:, j0:j1])
            y[:, i0:i1] = acc
    if normalize == "row" and row_offset is not None:
        y.mul_(torch.exp(-row_offset)[:, :, None])
    return reduce_heads(unflat(y, groups), head_weights), (None if lse is None else unflat(lse, groups))


def _online_softmax_rows(tiles, i0, i1, m_cols, x, cols):
    """One row tile of softmax(S − β)·X in a single pass over column tiles (online max)."""
    batch, rows = x.shape[0], i1 - i0
    dtype, device = x.dtype, x.device
    running_max = torch.full((batch, rows, 1), -math.inf, dtype=dtype, device=device)
    running_sum = torch.zeros(batch, rows, 1, dtype=dtype, device=device)
    acc = torch.zeros(batch, rows, x.shape[2], dtype=dtype, device=device)
    for j0 in range(0, m_cols, cols):
        j1 = min(j0 + cols, m_cols)
        s = tiles(i0, i1, j0, j1)
        new_max = torch.maximum(running_max, s.amax(-1, keepdim=True))
        # exp(-inf - -inf) is nan: rows that have seen nothing yet keep a zero correction.
        correction = torch.exp(running_max - new_max).nan_to_num_(0.0)
        p = s.sub_(new_max).exp_()
        running_sum.mul_(correction).add_(p.sum(-1, keepdim=True))
        acc.mul_(correction).baddbmm_(p, x[:, j0:j1])
        running_max = new_max
    lse = (running_max + running_sum.log()).squeeze(-1)
    return acc.div_(running_sum.clamp_min(torch.finfo(dtype).tiny)), lse


def _tile_logsumexp(s):
    """log Σ_j exp(s_ij) over a tile's rows, in place (s is overwritten)."""
    row_max = s.amax(-1, keepdim=True)
    return (row_max + s.sub_(row_max).exp_().sum(-1, keepdim=True).log_()).squeeze(-1)


def logsumexp(q, k, *, scale, col_offset=None, tile_elements=None):
    """r_i = log Σ_j exp(S_ij − β_j), accumulated tile by tile."""
    if col_offset is None and same_tensor(q, k):
        return _symmetric_logsumexp(q, scale, tile_elements)
    groups = q.shape[0]
    dtype = _compute_dtype(q, k)
    q, k, col_offset = flat(q).to(dtype), flat(k).to(dtype), _cast(flat(col_offset), dtype)
    batch, n, _ = q.shape
    m_cols = k.shape[1]
    out = torch.full((batch, n), -math.inf, dtype=dtype, device=q.device)
    rows, cols = tile_sizes(batch, n, m_cols, tile_elements)
    tiles = _ScoreTiles(q, k, scale, rows, cols, col_offset=col_offset)
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        for j0 in range(0, m_cols, cols):
            j1 = min(j0 + cols, m_cols)
            out[:, i0:i1] = torch.logaddexp(out[:, i0:i1], _tile_logsumexp(tiles(i0, i1, j0, j1)))
    return unflat(out, groups)


def _square_tile(batch, n, tile_elements):
    """Edge of the square tiles of the one-pass symmetric products."""
    tile_elements = tile_elements or TILE_ELEMENTS
    tile = max(1, int(math.isqrt(max(tile_elements // max(batch, 1), 1))))
    return min(max(tile, 64), max(n, 1))


def _tile_row_and_col_lse(tiles, i0, i1, j0, j1, cols=True):
    """Row LSE of one score tile and (with ``cols``) its column LSE, from one exp per element.

    Column sums reuse p = exp(s − m_r) reweighted by exp(m_r − M) ≤ 1 (M the tile's max); a
    column whose reweighted sum comes near the bottom of the normal range (scores spread by
    more than ~70 within the tile) is recomputed exactly from the scores, so any feature
    scale stays correct.
    """
    s = tiles(i0, i1, j0, j1)
    row_max = s.amax(-1)                                       # (B, bi)
    p = s.sub_(row_max[..., None]).exp_()
    row_lse = row_max + p.sum(-1).log()
    if not cols:
        return row_lse, None
    tile_max = row_max.amax(-1, keepdim=True)                  # (B, 1)
    weights = (row_max - tile_max).exp_()                      # ≤ 1
    col_sum = torch.bmm(weights.unsqueeze(1), p).squeeze(1)    # (B, bj)
    col_lse = col_sum.log().add_(tile_max)
    # Below 2^24·tiny the sum may be made of denormal (imprecise) or flushed terms: recompute.
    lost = col_sum < torch.finfo(col_sum.dtype).tiny * 2.0 ** 24
    if bool(lost.any()):
        # Rare (scores spread > ~87 in one tile): recompute this tile's scores exactly.
        exact = torch.logsumexp(torch.bmm(tiles.lhs[:, i0:i1], tiles.rhs[:, j0:j1].transpose(1, 2)), dim=1)
        col_lse = torch.where(lost, exact, col_lse)
    return row_lse, col_lse


def _symmetric_logsumexp(q, scale, tile_elements):
    """Row LSE of a symmetric S = τ·q qᵀ from the tiles on and above the diagonal only.

    Each off-diagonal tile serves its rows and (as the transposed tile) its columns: one
    score matmul and one exp per element instead of two.
    """
    groups = q.shape[0]
    dtype = _compute_dtype(q)
    q = flat(q).to(dtype)
    batch, n, _ = q.shape
    out = torch.full((batch, n), -math.inf, dtype=dtype, device=q.device)
    edge = _square_tile(batch, n, tile_elements)
    tiles = _ScoreTiles(q, q, scale, edge, edge)
    for i0 in range(0, n, edge):
        i1 = min(i0 + edge, n)
        for j0 in range(i0, n, edge):
            j1 = min(j0 + edge, n)
            # the diagonal tile's columns are its own rows
            row_lse, col_lse = _tile_row_and_col_lse(tiles, i0, i1, j0, j1, cols=j0 != i0)
            out[:, i0:i1] = torch.logaddexp(out[:, i0:i1], row_lse)
            if col_lse is not None:
                out[:, j0:j1] = torch.logaddexp(out[:, j0:j1], col_lse)
    return unflat(out, groups)


def logsumexp_rows_and_cols(q, k, *, scale, tile_elements=None):
    """(r, c): r_i = log Σ_j exp(S_ij), c_j = log Σ_i exp(S_ij), from one pass over the tiles
    (two row-LSE passes otherwise, one with q and k swapped)."""
    if same_tensor(q, k):
        r = _symmetric_logsumexp(q, scale, tile_elements)
        return r, r
    groups = q.shape[0]
    dtype = _compute_dtype(q, k)
    q, k = flat(q).to(dtype), flat(k).to(dtype)
    batch, n, _ = q.shape
    m_cols = k.shape[1]
    rows_out = torch.full((batch, n), -math.inf, dtype=dtype, device=q.device)
    cols_out = torch.full((batch, m_cols), -math.inf, dtype=dtype, device=q.device)
    rows, cols = tile_sizes(batch, n, m_cols, tile_elements)
    tiles = _ScoreTiles(q, k, scale, rows, cols)
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        for j0 in range(0, m_cols, cols):
            j1 = min(j0 + cols, m_cols)
            row_lse, col_lse = _tile_row_and_col_lse(tiles, i0, i1, j0, j1)
            rows_out[:, i0:i1] = torch.logaddexp(rows_out[:, i0:i1], row_lse)
            cols_out[:, j0:j1] = torch.logaddexp(cols_out[:, j0:j1], col_lse)
    return unflat(rows_out, groups), unflat(cols_out, groups)


def symmetric_matmul(q, k, x, *, scale, offset=None, row_offset=None, col_offset=None, head_weights=None,
                     tile_elements=None):
    """½(E + Eᵀ)·X, E_ij = exp(S_ij − α_i − β_j), in one pass over the S tiles.

    ``offset`` = a is the NCut form α = β = a; ``row_offset`` / ``col_offset`` set α, β
    apart (½(E + Eᵀ) is symmetric either way). Each tile feeds both the row accumulator
    (E·X) and the column accumulator (Eᵀ·X). When q and k are the same tensor and α = β
    (VV graphs) E is symmetric, so only the tiles on or above the diagonal are computed
    and each off-diagonal tile is used twice.
    """
    groups = q.shape[0]
    dtype = _compute_dtype(q, k, x)
    alpha, beta = symmetric_offsets_args(offset, row_offset, col_offset)
    symmetric_scores = same_tensor(q, k) and same_tensor(alpha, beta)
    q, k, x = flat(q).to(dtype), flat(k).to(dtype), flat(x).to(dtype)
    alpha = _cast(flat(alpha), dtype)
    beta = alpha if symmetric_scores else _cast(flat(beta), dtype)
    batch, n, _ = q.shape
    width = x.shape[2]
    y = torch.empty(batch, n, width, dtype=dtype, device=q.device)
    # Column contributions Eᵀ·X accumulate transposed, (B, m, N): xᵢᵀ·p is a plain bmm,
    # while pᵀ·xᵢ (a transposed tile operand) runs about twice slower on CPU.
    y_cols = torch.zeros(batch, width, n, dtype=dtype, device=q.device)
    edge = _square_tile(batch, n, tile_elements)
    tiles = _ScoreTiles(q, k, scale, edge, edge, alpha, beta)
    col_part = _Buffer(batch, width, edge, dtype, q.device)
    for i0 in range(0, n, edge):
        i1 = min(i0 + edge, n)
        acc = torch.zeros(batch, i1 - i0, width, dtype=dtype, device=q.device)
        x_rows_t = x[:, i0:i1].transpose(1, 2)
        for j0 in range(i0 if symmetric_scores else 0, n, edge):
            j1 = min(j0 + edge, n)
            p = tiles(i0, i1, j0, j1).exp_()
            acc.baddbmm_(p, x[:, j0:j1])
            if symmetric_scores and j0 == i0:
                continue  # diagonal tile of a symmetric S: Eᵀ·X equals E·X here
            part = col_part.view(batch, width, j1 - j0)
            y_cols[:, :, j0:j1] += torch.bmm(x_rows_t, p, out=part)
        y[:, i0:i1] = acc
    y += y_cols.transpose(1, 2)
    if not symmetric_scores:
        y.mul_(0.5)
    return reduce_heads(unflat(y, groups), head_weights)


def matmul_pair(q, k, x, w, *, scale, row_offset=None, col_offset=None, tile_elements=None):
    """(E·X, Eᵀ·W), E_ij = exp(S_ij − α_i − β_j), in one pass over the score tiles.

    Each tile's exponentials feed the row accumulator (E·X) and the column accumulator
    (Eᵀ·W): the two directions of a quadratic form zᵀEz and its gradient cost one pass.
    """
    groups = q.shape[0]
    dtype = _compute_dtype(q, k, x, w)
    q, k, x, w = flat(q).to(dtype), flat(k).to(dtype), flat(x).to(dtype), flat(w).to(dtype)
    row_offset, col_offset = _cast(flat(row_offset), dtype), _cast(flat(col_offset), dtype)
    batch, n, _ = q.shape
    m_cols, w_width = k.shape[1], w.shape[2]
    y = torch.empty(batch, n, x.shape[2], dtype=dtype, device=q.device)
    yt_t = torch.zeros(batch, w_width, m_cols, dtype=dtype, device=q.device)  # (Eᵀ·W)ᵀ, see symmetric_matmul
    rows, cols = tile_sizes(batch, n, m_cols, tile_elements)
    tiles = _ScoreTiles(q, k, scale, rows, cols, row_offset, col_offset)
    col_part = _Buffer(batch, w_width, cols, dtype, q.device)
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        acc = torch.zeros(batch, i1 - i0, x.shape[2], dtype=dtype, device=q.device)
        w_rows_t = w[:, i0:i1].transpose(1, 2)
        for j0 in range(0, m_cols, cols):
            j1 = min(j0 + cols, m_cols)
            p = tiles(i0, i1, j0, j1).exp_()
            acc.baddbmm_(p, x[:, j0:j1])
            yt_t[:, :, j0:j1] += torch.bmm(w_rows_t, p, out=col_part.view(batch, w_width, j1 - j0))
        y[:, i0:i1] = acc
    return unflat(y, groups), unflat(yt_t.transpose(1, 2).contiguous(), groups)
