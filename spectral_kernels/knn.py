"""Blockwise kNN graphs over token features (the official dataset-mode graph, without N×N).

The official code (``model_seg.build_knn_graph`` in xiao7199/layer_distributed_spectral_clustering)
builds, per head, the graph

    C_ij = cos(q_i, k_j)                       (rows L2-normalised, then Q·Kᵀ)
    per row i: the n_intra largest C_ij with image(j) == image(i), j ≠ i, and
               the n_inter largest C_ij with image(j) != image(i)
    entries ≤ 0.1 dropped (after the top-k, which selects the same set as before it)
    W = ½(W + Wᵀ),  A = D⁻¹W  (random walk, D = row sums of W)

by materialising an N×N boolean intra-image mask and 1024-row chunks of C. Here the same graph
is built with row blocks × column tiles and a streaming top-k: each tile's best candidates
are merged into a running (rows, k) list, so memory is O(N·k + block²).

Tokens are first grouped by image (a stable sort of ``image_ids``), so a row block's
same-image columns form one contiguous "zone"; tiles outside the zone hold only other-image
columns and need no masking at all. Ties are broken deterministically: among equal
similarities the lower (original) column index wins.

Deviations from the official code, all deliberate:
- image ids are arbitrary integers per token (official: equal-sized images, contiguous);
- rows of D⁻¹W for isolated tokens (no edge above the threshold) are zero (official: inf·0 = NaN),
  and D⁻¹ is exact (official adds 1e-6 after the reciprocal, ``1/d + 1e-6``);
- too-large n_intra / n_inter raise ValueError (official clamps to N and then picks masked
  zeros, which the threshold drops).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._validation import check_positive, check_same_device, check_tensor

NORMALIZATIONS = ("row", "sym", "none")
BACKENDS = ("auto", "torch")

# (rows, columns) of one similarity tile. Wide tiles make each topk call long (its per-call and
# merge overheads vanish) and few rows keep the tile at 64 MiB; measured on the 2-core CPU,
# N = 20 000, d = 64, 50 + 50: time goes to matmul and topk (≈ 65 %) and the final sort.
# On a GPU larger tiles amortise the kernel launches.
DEFAULT_BLOCK_CPU = (512, 32768)
DEFAULT_BLOCK_CUDA = (8192, 32768)


@torch.no_grad()
def knn_graph(q, k, *, n_intra, n_inter, image_ids, threshold=0.1, exclude_self=True,
              normalize="row", block_size=None, backend="auto"):
    """Sparse kNN affinity graph with intra- and inter-image neighbours (official dataset mode).

    Args:
        q, k: (N, d) token features; similarity is the cosine between row i of q and row j of
            k. VV graphs pass the same tensor twice.
        n_intra: neighbours kept per row among tokens of the same image.
        n_inter: neighbours kept per row among tokens of other images.
        image_ids: (N,) integer image id per token (any integers, any order).
        threshold: similarities ≤ threshold are dropped (official: 0.1).
        exclude_self: skip j == i as an intra-image neighbour (official behaviour, also for
            q ≠ k, where it drops the token's own key).
        normalize: "row" → D⁻¹W (random walk, the official default), "sym" → D^-½ W D^-½,
            "none" → W, where W = ½(W₀ + W₀ᵀ) is the symmetrised top-k graph.
        block_size: int (square tiles) or (rows, columns) of one similarity tile;
            default (512, 32768) on CPU, (8192, 32768) on CUDA.
        backend: "auto" or "torch" (blockwise torch on the device of q).

    Returns:
        torch sparse CSR (N, N) tensor, float32 (float64 if q or k is float64); usable as
        ``graph @ X``. Rows of isolated tokens are zero.
    """
    q, k, ids, opts = _validate(q, k, n_intra=n_intra, n_inter=n_inter, image_ids=image_ids,
                                threshold=threshold, exclude_self=exclude_self, normalize=normalize,
                                block_size=block_size, backend=backend)
    rows, cols, vals = _knn_candidates(q, k, ids, opts)
    return _assemble(rows, cols, vals, q.shape[0], opts)


@dataclass(frozen=True)
class _Options:
    n_intra: int
    n_inter: int
    threshold: float
    exclude_self: bool
    normalize: str
    block_rows: int
    block_cols: int


# --------------------------------------------------------------------------- validation

def check_graph_options(*, n_intra, n_inter, threshold, normalize, block_size, device):
    """Checks shared by knn_graph and its sharded twin; returns the (rows, columns) tile."""
    for name, value in (("n_intra", n_intra), ("n_inter", n_inter)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        check_positive(name, value, allow_zero=True)
    if n_intra + n_inter == 0:
        raise ValueError("n_intra and n_inter are both 0: the graph would have no edges")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise TypeError(f"threshold must be a real number, got {threshold!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize != "none" and threshold < 0:
        raise ValueError(f"threshold={threshold} < 0 with normalize={normalize!r}: negative edge weights "
                         "make degrees non-positive; use threshold >= 0 or normalize='none'")
    if block_size is None:
        block_rows, block_cols = DEFAULT_BLOCK_CUDA if device.type == "cuda" else DEFAULT_BLOCK_CPU
    elif isinstance(block_size, int) and not isinstance(block_size, bool):
        block_rows, block_cols = block_size, block_size
    elif (isinstance(block_size, (tuple, list)) and len(block_size) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)):
        block_rows, block_cols = block_size
    else:
        raise TypeError(f"block_size must be an int or a (rows, columns) pair of ints, got {block_size!r}")
    check_positive("block_size rows", block_rows)
    check_positive("block_size columns", block_cols)
    return block_rows, block_cols


def _validate(q, k, *, n_intra, n_inter, image_ids, threshold, exclude_self, normalize,
              block_size, backend):
    check_tensor("q", q, dim=2, finite=False)
    check_tensor("k", k, dim=2, finite=False)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}); need at least one token and one feature")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k has feature dimension {k.shape[1]} but q has {q.shape[1]}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {q.shape[0]}; the graph is square")
    check_tensor("q", q, finite=True)
    if k is not q:
        check_tensor("k", k, finite=True)

    if not isinstance(image_ids, torch.Tensor):
        try:
            image_ids = torch.as_tensor(image_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"image_ids must be a 1-D integer tensor or sequence: {err}") from None
    if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex or image_ids.dtype == torch.bool:
        raise TypeError(f"image_ids must have an integer dtype, got {image_ids.dtype}")
    if image_ids.dim() != 1 or image_ids.shape[0] != q.shape[0]:
        raise ValueError(f"image_ids must have shape ({q.shape[0]},) (one id per token of q), "
                         f"got {tuple(image_ids.shape)}")
    check_same_device(q=q, k=k)
    image_ids = image_ids.to(q.device)

    block_rows, block_cols = check_graph_options(n_intra=n_intra, n_inter=n_inter, threshold=threshold,
                                                 normalize=normalize, block_size=block_size, device=q.device)
    _, sizes = torch.unique(image_ids, return_counts=True)
    smallest, largest = int(sizes.min()), int(sizes.max())
    intra_available = smallest - (1 if exclude_self else 0)
    if n_intra > intra_available:
        raise ValueError(f"n_intra={n_intra} exceeds the same-image tokens available to every row: "
                         f"the smallest image has {smallest} tokens"
                         + (" (minus the token itself)" if exclude_self else ""))
    inter_available = q.shape[0] - largest
    if n_inter > inter_available:
        raise ValueError(f"n_inter={n_inter} exceeds the other-image tokens available to every row: "
                         f"{inter_available} (N={q.shape[0]}, largest image {largest} tokens)")

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    opts = _Options(n_intra=n_intra, n_inter=n_inter, threshold=float(threshold),
                    exclude_self=bool(exclude_self), normalize=normalize,
                    block_rows=block_rows, block_cols=block_cols)
    return q, k, image_ids, opts


# --------------------------------------------------------------------------- streaming top-k

def _compute_dtype(q, k):
    return torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32


def _knn_candidates(q, k, image_ids, opts):
    """Per-row top-k lists (rows, cols, vals), rows in image-grouped order.

    rows (N,) is the original token index of each grouped row; cols (N, n_intra + n_inter)
    original column indices (intra first); vals their cosines, -inf where a row has fewer
    candidates than requested.
    """
    n = q.shape[0]
    device = q.device
    dtype = _compute_dtype(q, k)
    order = torch.argsort(image_ids, stable=True)
    identity = bool((order == torch.arange(n, device=device)).all())
    if identity:
        order = None
    # grouped (image-sorted) features; `orig` maps grouped index -> original token index
    qn = F.normalize(q.to(dtype), dim=-1)
    kn = qn if k is q else F.normalize(k.to(dtype), dim=-1)
    ids = image_ids
    if order is not None:
        qn = qn[order]
        kn = qn if k is q else kn[order]
        ids = image_ids[order]
    orig = order if order is not None else torch.arange(n, device=device)
    ids_cpu = ids.cpu()
    zone_start = torch.searchsorted(ids_cpu, ids_cpu, side="left")   # first token of each token's image
    zone_end = torch.searchsorted(ids_cpu, ids_cpu, side="right")    # one past its last token

    n_total = opts.n_intra + opts.n_inter
    out_vals = torch.empty(n, n_total, dtype=dtype, device=device)
    out_cols = torch.empty(n, n_total, dtype=torch.long, device=device)
    # One similarity buffer for every tile: a fresh 64 MiB tile per matmul costs page faults on
    # CPU (large blocks go back to the OS) comparable to the matmul itself.
    sim_buffer = torch.empty(min(opts.block_rows, n) * min(opts.block_cols, n), dtype=dtype, device=device)
    for r0 in range(0, n, opts.block_rows):
        r1 = min(r0 + opts.block_rows, n)
        intra, inter = _row_block(qn[r0:r1], kn, ids, orig, r0, r1,
                                  int(zone_start[r0]), int(zone_end[r1 - 1]), opts, sim_buffer)
        out_vals[r0:r1, :opts.n_intra], out_cols[r0:r1, :opts.n_intra] = intra
        out_vals[r0:r1, opts.n_intra:], out_cols[r0:r1, opts.n_intra:] = inter
    return orig, out_cols, out_vals


def _row_block(qb, kn, ids, orig, r0, r1, z0, z1, opts, sim_buffer):
    """Top-k intra and inter lists for grouped rows [r0, r1); same-image columns are [z0, z1).

    Every column tile feeds one top-k for the inter list; only the part of a tile that
    overlaps the zone is masked by image id, and only that part feeds the intra list.
    """
    b = r1 - r0
    intra = _CandidateList(b, opts.n_intra, qb)
    inter = _CandidateList(b, opts.n_inter, qb)
    start, stop = (0, kn.shape[0]) if opts.n_inter else (z0, z1)
    for c0 in range(start, stop, opts.block_cols):
        c1 = min(c0 + opts.block_cols, stop)
        sim = torch.mm(qb, kn[c0:c1].T, out=sim_buffer[:b * (c1 - c0)].view(b, c1 - c0))
        lo, hi = max(c0, z0), min(c1, z1)
        if lo < hi:
            zone = sim[:, lo - c0:hi - c0]
            same = ids[r0:r1, None] == ids[None, lo:hi]
            if opts.n_intra:
                intra_sim = zone.masked_fill(~same, -math.inf)
                if opts.exclude_self:
                    _mask_self(intra_sim, r0, r1, lo, hi)
                intra.add(tile_topk(intra_sim, orig[lo:hi], opts.n_intra, opts.threshold))
            if opts.n_inter:
                zone.masked_fill_(same, -math.inf)
        if opts.n_inter:
            inter.add(tile_topk(sim, orig[c0:c1], opts.n_inter, opts.threshold))
    return intra.best(), inter.best()


class _CandidateList:
    """Running best-k list of one row block; tile candidates are merged in batches.

    Merging after every tile costs a few small sorts per tile; collecting up to
    MERGE_EVERY tiles first keeps the list O(rows · k) while cutting those sorts. A list fed
    by one full-width tile (one column tile per row block: N ≤ the tile width) is that
    tile's top-k as it is — tile_topk already settled its ties — and needs no merge.
    """
    MERGE_EVERY = 16

    def __init__(self, b, kk, like):
        self.kk = kk
        self.empty = (torch.full((b, kk), -math.inf, dtype=like.dtype, device=like.device),
                      torch.full((b, kk), torch.iinfo(torch.long).max, dtype=torch.long, device=like.device))
        self.pending = []

    def add(self, candidates):
        self.pending.append(candidates)
        if len(self.pending) > self.MERGE_EVERY:
            self.pending = [self.best()]

    def best(self):
        if not self.pending:
            return self.empty
        if len(self.pending) == 1 and self.pending[0][0].shape[1] == self.kk:
            return self.pending[0]
        return merge_candidates([self.empty, *self.pending], self.kk)


def _mask_self(sim, r0, r1, c0, c1):
    """Set the diagonal entries (grouped row index == grouped column index) of a tile to -inf."""
    lo, hi = max(r0, c0), min(r1, c1)
    if lo < hi:
        diag = torch.arange(lo, hi, device=sim.device)
        sim[diag - r0, diag - c0] = -math.inf


def tile_topk(sim, cols, kk, threshold):
    """The kk best (value, original column) per row of one tile; ties → lower column index.

    torch.topk does not promise which of several equal values it keeps, so it is asked for one
    extra value: where the kk-th and (kk+1)-th values are equal (and would survive the
    threshold) the row is redone with a stable sort in column order. With continuous data this
    almost never happens; with duplicated tokens it is what makes neighbour sets reproducible.
    """
    b, t = sim.shape
    if t <= kk:
        return sim.clone(), cols.expand(b, t)  # a copy: the caller may reuse sim's storage
    top_vals, top_idx = _top_candidates(sim, kk + 1)
    tied = (top_vals[:, kk - 1] == top_vals[:, kk]) & (top_vals[:, kk - 1] > threshold)
    top_vals, top_cols = top_vals[:, :kk], cols[top_idx[:, :kk]]
    if bool(tied.any()):
        tied_rows = tied.nonzero().squeeze(1)
        col_order = torch.argsort(cols)
        tied_sim = sim[tied_rows][:, col_order]
        sorted_vals, sorted_idx = tied_sim.sort(dim=1, descending=True, stable=True)
        top_vals[tied_rows] = sorted_vals[:, :kk]
        top_cols[tied_rows] = cols[col_order][sorted_idx[:, :kk]]
    return top_vals, top_cols


# Wide tiles select through block maxima (see _top_candidates); measured on the 2-core CPU,
# 512 rows × 16 384 / 32 768 columns, k = 51: torch.topk 17.7 / 29.5 ms, prefiltered 12.4 /
# 18.0 ms; at 4 096 columns and below no gain (topk's per-row cost dominates).
PREFILTER_MIN_WIDTH = 16384
PREFILTER_BLOCK = 32


def _top_candidates(sim, kk1):
    """The kk1 largest values per row of a tile (sorted, descending) and their tile columns.

    Wide tiles are cut into blocks of PREFILTER_BLOCK columns; the kk1 blocks with the largest
    maxima hold every value above the kk1-th largest block maximum v, and kk1 values ≥ v (those
    maxima), so the kk1 largest of their columns are the row's kk1 largest values — exactly,
    except that a value equal to v in an unselected block may be left out. Then the kk1-th
    value itself equals v and so does the (kk1 − 1)-th or an excluded one: the caller's tie
    test (kk-th == (kk + 1)-th value) fires and redoes the row from the whole tile.
    """
    b, t = sim.shape
    g = PREFILTER_BLOCK
    if t < PREFILTER_MIN_WIDTH or 4 * kk1 * g > t:
        return sim.topk(kk1, dim=1)
    n_blocks = t // g
    head = n_blocks * g
    block_max = sim[:, :head].reshape(b, n_blocks, g).amax(-1)
    blocks = block_max.topk(kk1, dim=1, sorted=False).indices
    local = (blocks[:, :, None] * g + torch.arange(g, device=sim.device)).reshape(b, kk1 * g)
    if head < t:  # the ragged last columns are candidates as they are
        local = torch.cat([local, torch.arange(head, t, device=sim.device).expand(b, t - head)], dim=1)
    top_vals, idx = sim.gather(1, local).topk(kk1, dim=1)
    return top_vals, local.gather(1, idx)


def merge_candidates(candidates, kk):
    """Exact top-kk of several candidate lists under (value descending, column ascending)."""
    vals = torch.cat([v for v, _ in candidates], dim=1)
    cols = torch.cat([c for _, c in candidates], dim=1)
    by_col = torch.argsort(cols, dim=1, stable=True)
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    vals, by_val = vals.sort(dim=1, descending=True, stable=True)
    return vals[:, :kk], cols.gather(1, by_val[:, :kk])


# --------------------------------------------------------------------------- sparse assembly

def _assemble(rows, cols, vals, n, opts):
    """Threshold, symmetrise ½(W + Wᵀ), normalise, and pack as CSR.

    W and Wᵀ entries are keyed by row·n + column and sorted once; an edge present in both
    directions then sits in two adjacent slots and is summed (cheaper than COO coalesce).
    """
    keep = vals > opts.threshold
    r = rows[:, None].expand_as(cols)[keep]
    c = cols[keep]
    v = vals[keep] * 0.5
    del keep
    keys, order = torch.cat([r * n + c, c * n + r]).sort()
    del r, c
    v = torch.cat([v, v])[order]
    del order
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    slot = torch.cumsum(first, 0) - 1
    keys = keys[first]
    del first
    v = torch.zeros(keys.shape[0], dtype=v.dtype, device=v.device).index_add_(0, slot, v)
    del slot
    r, c = keys // n, keys % n
    del keys
    if opts.normalize != "none":
        degree = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, r, v)
        if opts.normalize == "row":
            v = v / degree[r]
        else:
            inv_sqrt = degree.rsqrt()
            v = v * inv_sqrt[r] * inv_sqrt[c]
    crow = torch.zeros(n + 1, dtype=torch.long, device=v.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, c, v, (n, n), check_invariants=False)
