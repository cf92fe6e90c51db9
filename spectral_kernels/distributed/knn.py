"""The kNN graph of ``spectral_kernels.knn_graph`` with tokens sharded over ranks.

Each rank finds its own rows' neighbours by a ring pass of the other ranks' (normalised)
key shards and image ids; every tile's best candidates are merged into the running
per-row lists with the single-process streaming top-k (same tie rule: among equal
similarities the lower global column wins), so the neighbour lists equal the
single-process ones. Then:

    symmetrise ½(W₀ + W₀ᵀ): the transposed edge (j, i) of every kept edge (i, j) is sent to
        the owner of row j (one ``all_to_all_single``), so each rank holds all entries of
        its rows of W;
    degrees: row sums of W, local;
    "sym" normalisation also needs d_j of each column: the owner of row j sends d_j back
        along its own (j, i) entries (W is symmetric, so they are exactly the transposes of
        the entries that need it) — a second all-to-all, O(edges / P) per rank.

Nothing of size N × N, and nothing of size N per rank except the image-size table.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_same_device, check_tensor
from ..knn import NORMALIZATIONS, check_graph_options, merge_candidates, tile_topk
from .ring import ring_pass
from .shards import ShardLayout, agree

__all__ = ["sharded_knn_graph"]


@torch.no_grad()
def sharded_knn_graph(q_local: Tensor, k_local: Tensor, *, n_intra: int, n_inter: int, image_ids_local: Tensor,
                      threshold: float = 0.1, exclude_self: bool = True, normalize: str = "row",
                      block_size: int | tuple | None = None, group=None) -> Tensor:
    """This rank's rows of ``knn_graph(q, k, ...)`` for row-sharded q, k and image ids.

    Collective: every rank calls it with its own rows and the same settings.

    Args:
        q_local, k_local: (n_local, d) this rank's token features (the same tensor twice for
            VV graphs); n_local may differ between ranks.
        image_ids_local: (n_local,) integer image id of each local token (global ids: a
            token's image may span ranks).
        n_intra, n_inter, threshold, exclude_self, normalize: as ``knn_graph``.
        block_size: rows (or (rows, columns)) of one similarity tile.
        group: the process group (default: the world).

    Returns:
        sparse CSR (n_local, N) float32 (float64 for float64 inputs): rows
        ``[start, start + n_local)`` of the global graph, columns in the global token order.
    """
    q_local, k_local, ids, block_rows, block_cols = _validate_local(q_local, k_local, image_ids_local, n_intra,
                                                                    n_inter, threshold, normalize, block_size)
    dtype = torch.float64 if torch.float64 in (q_local.dtype, k_local.dtype) else torch.float32
    layout = agree("sharded_knn_graph", q_local.shape[0], {
        "feature dim d": q_local.shape[1], "dtype": dtype, "n_intra": n_intra, "n_inter": n_inter,
        "threshold": float(threshold), "exclude_self": bool(exclude_self), "normalize": NORMALIZATIONS.index(normalize),
    }, device=q_local.device, group=group)
    _check_available(ids, n_intra, n_inter, exclude_self, layout)

    qn = F.normalize(q_local.to(dtype), dim=-1)
    kn = qn if k_local is q_local else F.normalize(k_local.to(dtype), dim=-1)
    row0, _ = layout.local_rows
    n_local = layout.n_local
    intra = _empty_list(n_local, n_intra, qn)
    inter = _empty_list(n_local, n_inter, qn)
    device = qn.device

    def visit(source, shard):
        k_s, ids_s = shard
        col0 = layout.start(source)
        for r0 in range(0, n_local, block_rows):
            r1 = min(r0 + block_rows, n_local)
            rows_intra = (intra[0][r0:r1], intra[1][r0:r1])
            rows_inter = (inter[0][r0:r1], inter[1][r0:r1])
            for c0 in range(0, k_s.shape[0], block_cols):
                c1 = min(c0 + block_cols, k_s.shape[0])
                cols = torch.arange(col0 + c0, col0 + c1, device=device)
                sim = qn[r0:r1] @ k_s[c0:c1].T
                same = ids[r0:r1, None] == ids_s[None, c0:c1]
                if n_inter:
                    cand = tile_topk(sim.masked_fill(same, -math.inf), cols, n_inter, threshold)
                    rows_inter = merge_candidates([rows_inter, cand], n_inter)
                if n_intra:
                    intra_sim = sim.masked_fill_(~same, -math.inf)
                    if exclude_self:
                        rows = torch.arange(row0 + r0, row0 + r1, device=device)
                        intra_sim.masked_fill_(rows[:, None] == cols[None, :], -math.inf)
                    rows_intra = merge_candidates([rows_intra, tile_topk(intra_sim, cols, n_intra, threshold)], n_intra)
            intra[0][r0:r1], intra[1][r0:r1] = rows_intra
            inter[0][r0:r1], inter[1][r0:r1] = rows_inter

    ring_pass(layout, [kn, ids], [0, 0], visit)
    vals = torch.cat([intra[0], inter[0]], dim=1)
    cols = torch.cat([intra[1], inter[1]], dim=1)
    keep = vals > threshold
    rows = torch.arange(row0, row0 + n_local, device=device)[:, None].expand_as(cols)[keep]
    return _assemble(rows, cols[keep], vals[keep], layout, normalize)


# --------------------------------------------------------------------------- streaming top-k
def _empty_list(rows, kk, like):
    return (torch.full((rows, kk), -math.inf, dtype=like.dtype, device=like.device),
            torch.full((rows, kk), torch.iinfo(torch.long).max, dtype=torch.long, device=like.device))


# --------------------------------------------------------------------------- validation

def _validate_local(q, k, ids, n_intra, n_inter, threshold, normalize, block_size):
    check_tensor("q_local", q, dim=2)
    if k is not q:
        check_tensor("k_local", k, dim=2)
    check_same_device(q_local=q, k_local=k)
    if k.shape != q.shape:
        raise ValueError(f"k_local must have q_local's shape {tuple(q.shape)} (the same tokens), got {tuple(k.shape)}")
    if q.shape[1] == 0:
        raise ValueError("q_local needs at least one feature")
    if not isinstance(ids, Tensor):
        raise TypeError(f"image_ids_local must be a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"image_ids_local must have an integer dtype, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != q.shape[0]:
        raise ValueError(f"image_ids_local must have shape ({q.shape[0]},) (one id per local token), "
                         f"got {tuple(ids.shape)}")
    block_rows, block_cols = check_graph_options(n_intra=n_intra, n_inter=n_inter, threshold=threshold,
                                                 normalize=normalize, block_size=block_size, device=q.device)
    return q, k, ids.to(device=q.device, dtype=torch.int64).contiguous(), block_rows, block_cols


def _all_gather_varlen(t: Tensor, layout: ShardLayout) -> Tensor:
    """Concatenation over ranks of 1-D tensors of different lengths."""
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(layout.world_size)]
    dist.all_gather(sizes, size, group=layout.group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(layout.world_size)]
    dist.all_gather(parts, padded, group=layout.group)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def _check_available(ids, n_intra, n_inter, exclude_self, layout):
    """The single-process availability checks, on global image sizes (an all-gather of per-image counts)."""
    local_ids, local_counts = torch.unique(ids, return_counts=True)
    all_ids = _all_gather_varlen(local_ids, layout)
    all_counts = _all_gather_varlen(local_counts, layout)
    image, inverse = torch.unique(all_ids, return_inverse=True)
    sizes = torch.zeros(image.shape[0], dtype=torch.int64, device=ids.device).index_add_(0, inverse, all_counts)
    smallest, largest = int(sizes.min()), int(sizes.max())
    if n_intra > smallest - (1 if exclude_self else 0):
        raise ValueError(f"n_intra={n_intra} exceeds the same-image tokens available to every row: "
                         f"the smallest image has {smallest} tokens" + (" (minus the token itself)" if exclude_self else ""))
    available = layout.n_total - largest
    if n_inter > available:
        raise ValueError(f"n_inter={n_inter} exceeds the other-image tokens available to every row: "
                         f"{available} (N={layout.n_total}, largest image {largest} tokens)")


def _owner(index: Tensor, layout: ShardLayout) -> Tensor:
    bounds = torch.tensor([layout.start(r + 1) for r in range(layout.world_size)], device=index.device)
    return torch.searchsorted(bounds, index, right=True)


def _exchange(dest: Tensor, tensors: list, layout: ShardLayout) -> list:
    """Send row i of every tensor to rank dest[i] (one all_to_all_single per tensor)."""
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=layout.world_size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=layout.group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    out = []
    for t in tensors:
        t = t[order].contiguous()
        received = torch.empty(sum(recv_splits), dtype=t.dtype, device=t.device)
        dist.all_to_all_single(received, t, recv_splits, send_splits, group=layout.group)
        out.append(received)
    return out


def _assemble(rows, cols, vals, layout: ShardLayout, normalize: str) -> Tensor:
    """Symmetrise across ranks, normalise, and pack this rank's rows as CSR (n_local, N)."""
    n, row0, n_local = layout.n_total, layout.local_rows[0], layout.n_local
    # the transposed entry (j, i) of every kept (i, j) goes to the owner of row j
    t_rows, t_cols, t_vals = _exchange(_owner(cols, layout), [cols, rows, vals], layout)
    w = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, t_rows]) - row0, torch.cat([cols, t_cols])]),
                                torch.cat([vals, t_vals]) * 0.5, (n_local, n), check_invariants=False).coalesce()
    r, c = w.indices()
    v = w.values()
    if normalize != "none":
        degree = torch.zeros(n_local, dtype=v.dtype, device=v.device).index_add_(0, r, v)
        if normalize == "row":
            v = v / degree[r]
        else:
            col_degree = _column_degrees(r, c, degree, layout)
            v = v * degree[r].rsqrt() * col_degree.rsqrt()
    crow = torch.zeros(n_local + 1, dtype=torch.long, device=v.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=n_local), 0)
    return torch.sparse_csr_tensor(crow, c.contiguous(), v.contiguous(), (n_local, n), check_invariants=False)


def _column_degrees(r, c, degree, layout: ShardLayout) -> Tensor:
    """d_c for every local entry (r, c): the owner of row c sends d_c along its entry (c, r).

    W is symmetric, so the entries arriving here are exactly the transposes of the local
    entries; matching them on the key (row, column) gives each entry its column degree.
    """
    row0, n = layout.local_rows[0], layout.n_total
    glob_r = r + row0
    # what this rank sends: for its entry (glob_r, c), d_{glob_r} addressed to the owner of row c,
    # keyed by the receiver's (row, column) = (c, glob_r)
    recv_rows, recv_cols, recv_deg = _exchange(_owner(c, layout), [c, glob_r, degree[r]], layout)
    recv_key = recv_rows * n + recv_cols
    order = torch.argsort(recv_key)
    want = glob_r * n + c
    pos = torch.searchsorted(recv_key[order], want)
    if pos.numel() and (bool((pos >= recv_key.numel()).any()) or bool((recv_key[order][pos] != want).any())):
        raise RuntimeError("sharded_knn_graph: the symmetrised graph is not symmetric across ranks (internal error)")
    return recv_deg[order][pos]
