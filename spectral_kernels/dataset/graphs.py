"""The objective of one batch of images: their tokens form one graph per layer and head.

Both modes compute, for a batch of B images with base-grid features X (B, h0·w0, K):

    per layer l: Z_l = pool(X → grid_l), flattened over the batch (B·N_l, K) and
                 column-L2-normalised over ALL the batch's tokens (official dataset code)
    eig_lhk = z_lkᵀ A_lh z_lk,        ortho_l = off-diagonal entries of Z_lᵀ Z_l
    loss    = w_eig · mean_{l,h,k} |ω_l (eig_lhk − 1)| + w_orth · mean_{l,h} ω_l ortho_l²

with the official layer weight ω_l = side(base grid) / side(layer grid) (32/res there; the
official code indexes its resolution list by graph number, which is the layer number when a
layer has one head — here every head of a layer gets that layer's weight) and A_lh:

* ``KnnBatchGraph`` (mode "knn", official): the random-walk normalised kNN graph D⁻¹W of the
  batch's tokens (n_intra neighbours in the same image, n_inter in the others, cosine >
  threshold, W = ½(W₀+W₀ᵀ)), built once per batch with ``knn_graph``. All (layer, head) graphs
  sit in one block-diagonal sparse W, so a step is one sparse product; the gradient uses
  Wᵀ = W (A z = D⁻¹(W z), Aᵀ g = W (D⁻¹ g)), so no transposed matrix is ever built.
* ``DenseBatchGraph`` (mode "dense"): the implicit dense graph P = softmax(τ q kᵀ) over all
  the batch's tokens (intra and inter edges): zᵀPz and its gradient from one symmetric pass
  with the row log-sum-exp cached per batch — no N×N array. For VV graphs q = k = unit v
  and τ = 1/temperature.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..knn import knn_graph
from ..pooling import GridPooling
from ..objective import normalize_columns, off_diagonal, softmax_quadratic_form
from ..ops import affinity_logsumexp, affinity_matmul
from .features import LayerFeatures

__all__ = ["KnnBatchGraph", "DenseBatchGraph", "block_diagonal_csr", "compact_csr", "layer_weight"]


def layer_weight(base_grid, grid) -> float:
    """Official ω_l = 32 / res: the base side over the layer side (geometric mean for non-square)."""
    return math.sqrt((base_grid[0] * base_grid[1]) / (grid[0] * grid[1]))


_INT32_LIMIT = 2 ** 31 - 1


def _index_dtype(rows: int, nnz: int) -> torch.dtype:
    """int32 CSR indices where they fit: half the index memory, and a faster sparse product
    (CPU: 96 vs 137 ms for 20 M entries × 20 columns)."""
    return torch.int32 if max(rows, nnz) <= _INT32_LIMIT else torch.int64


def compact_csr(g: Tensor) -> Tensor:
    """The same CSR matrix with the smallest index dtype that holds it."""
    dtype = _index_dtype(g.shape[0], g.values().numel())
    if g.crow_indices().dtype == dtype:
        return g
    return torch.sparse_csr_tensor(g.crow_indices().to(dtype), g.col_indices().to(dtype), g.values(), g.shape,
                                   check_invariants=False)


def block_diagonal_csr(graphs: list[Tensor], *, consume: bool = False) -> Tensor:
    """Square CSR matrices → one block-diagonal CSR matrix (no dense intermediate), with
    int32 indices when the result fits. The result is allocated once and filled block by
    block; ``consume=True`` releases each list entry once copied (peak: the result plus one
    block, not twice the result)."""
    sizes = [g.shape[0] for g in graphs]
    counts = [g.values().numel() for g in graphs]
    n_total, nnz_total = sum(sizes), sum(counts)
    dtype = _index_dtype(n_total, nnz_total)
    like = graphs[0].values() if graphs else torch.empty(0)
    crow = torch.empty(n_total + 1, dtype=dtype, device=like.device)
    cols = torch.empty(nnz_total, dtype=dtype, device=like.device)
    vals = torch.empty(nnz_total, dtype=like.dtype, device=like.device)
    crow[:1] = 0
    n_rows = nnz = 0
    for i, (rows, count) in enumerate(zip(sizes, counts)):
        g = graphs[i]
        crow[n_rows + 1:n_rows + rows + 1] = g.crow_indices()[1:] + nnz
        cols[nnz:nnz + count] = g.col_indices() + n_rows
        vals[nnz:nnz + count] = g.values()
        if consume:
            graphs[i] = None
        del g
        n_rows += rows
        nnz += count
    return torch.sparse_csr_tensor(crow, cols, vals, (n_total, n_total), check_invariants=False)


class _SymmetricSparseProduct(torch.autograd.Function):
    """y = W z for a symmetric sparse W; the backward W g reuses W itself (Wᵀ = W)."""

    @staticmethod
    def forward(ctx, w, z):
        ctx.w = w
        return w @ z

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.w @ grad


def _flat_batch(t: Tensor) -> Tensor:
    """(B, H, N, d) → (H, B·N, d): the batch's tokens of each head, image after image."""
    return t.permute(1, 0, 2, 3).flatten(1, 2)


class _BatchGraph:
    """Shared part: pooling, normalisation and the official weighted loss."""

    def __init__(self, layers: list[LayerFeatures], base_grid, n_batch: int):
        self.base_grid = tuple(base_grid)
        self.n_batch = n_batch
        self.poolings = [GridPooling(self.base_grid, lf.grid, 0, "drop") for lf in layers]
        self.weights = [layer_weight(self.base_grid, lf.grid) for lf in layers]
        self.heads = [lf.heads for lf in layers]

    def layer_z(self, rows: Tensor) -> list[Tensor]:
        """rows (B, h0·w0, K) → per layer Z_l (B·N_l, K), unit columns over the batch."""
        return [normalize_columns(p.pool(rows).flatten(0, 1)) for p in self.poolings]

    def quotients(self, zs: list[Tensor]) -> list[Tensor]:  # per layer (H_l, K)
        raise NotImplementedError

    def loss(self, rows: Tensor, *, w_eig: float = 1.0, w_orth: float = 1.0) -> Tensor:
        zs = self.layer_z(rows)
        eig_sum = ortho_sum = rows.new_zeros(())
        eig_count = ortho_count = 0
        for z, eig, w, heads in zip(zs, self.quotients(zs), self.weights, self.heads):
            eig_sum = eig_sum + (w * (eig - 1.0)).abs().sum()
            eig_count += eig.numel()
            ortho = off_diagonal(z.T @ z)
            # the official code concatenates one copy of ortho per (layer, head)
            ortho_sum = ortho_sum + heads * w * ortho.pow(2).sum()
            ortho_count += heads * ortho.numel()
        return w_eig * eig_sum / eig_count + w_orth * ortho_sum / ortho_count


class KnnBatchGraph(_BatchGraph):
    """Official mode: one kNN graph per (layer, head) over the batch's tokens, D⁻¹W."""

    def __init__(self, layers: list[LayerFeatures], index: Tensor, base_grid, *, n_intra: int, n_inter: int,
                 threshold: float, device, dtype=torch.float32):
        super().__init__(layers, base_grid, len(index))
        blocks, self.sizes = [], []
        for lf in layers:
            a = _flat_batch(lf.a[index].to(device, dtype))
            b = a if lf.b is None else _flat_batch(lf.b[index].to(device, dtype))
            n_tokens = a.shape[1]
            ids = torch.arange(len(index), device=device).repeat_interleave(n_tokens // len(index))
            for h in range(a.shape[0]):
                q = a[h]
                k = q if lf.b is None else b[h]
                # compacted at once: the int64 indices of 72 graphs would double the peak
                blocks.append(compact_csr(knn_graph(q, k, n_intra=n_intra, n_inter=n_inter, image_ids=ids,
                                                    threshold=threshold, normalize="none")))
            self.sizes.append((a.shape[0], n_tokens))
        self.w = block_diagonal_csr(blocks, consume=True)
        crow = self.w.crow_indices()
        rows = torch.repeat_interleave(torch.arange(self.w.shape[0], device=crow.device), crow.diff().long())
        degree = torch.zeros(self.w.shape[0], dtype=dtype, device=crow.device).index_add_(0, rows, self.w.values())
        # isolated tokens (no edge above the threshold) get a zero row, as knn_graph's "row" mode
        self.inv_degree = torch.where(degree > 0, 1.0 / degree, torch.zeros_like(degree))[:, None]

    @property
    def nnz(self) -> int:
        return self.w.values().numel()

    def quotients(self, zs: list[Tensor]) -> list[Tensor]:
        stacked = torch.cat([z.repeat(heads, 1) for z, (heads, _) in zip(zs, self.sizes)])
        az = self.inv_degree * _SymmetricSparseProduct.apply(self.w, stacked)
        products = (az * stacked).split([h * n for h, n in self.sizes])
        return [p.reshape(h, n, -1).sum(1) for p, (h, n) in zip(products, self.sizes)]


class DenseBatchGraph(_BatchGraph):
    """Implicit dense mode: P = softmax(τ q kᵀ) over all the batch's tokens, via the primitive.

    The row log-sum-exp of each layer's scores is computed once per batch (it depends only on
    q, k), so every inner step costs one symmetric pass per layer for the quotients zᵀPz and
    their gradient (``softmax_quadratic_form``) instead of a softmax pass and its transpose.
    """

    def __init__(self, layers: list[LayerFeatures], index: Tensor, base_grid, *, graph: str, temperature: float,
                 device, dtype=torch.float32, backend: str = "auto"):
        super().__init__(layers, base_grid, len(index))
        self.backend = backend
        self.qk = []
        for lf in layers:
            q = _flat_batch(lf.a[index].to(device, dtype))
            k = q if lf.b is None else _flat_batch(lf.b[index].to(device, dtype))
            scale = 1.0 / temperature if graph == "vv" else lf.scale
            self.qk.append((q, k, scale))
        self._row_lse = [None] * len(self.qk)

    def quotients(self, zs: list[Tensor]) -> list[Tensor]:
        out = []
        for i, (z, (q, k, scale)) in enumerate(zip(zs, self.qk)):
            if not (torch.is_grad_enabled() and z.requires_grad):
                # values only (e.g. the final per-image eigenvalues): one softmax pass
                pz = affinity_matmul(q, k, z[None], scale=scale, normalize="row", backend=self.backend)
                out.append((pz * z[None]).sum(-2))                        # (H, K)
                continue
            if self._row_lse[i] is None:  # first inner step of this batch
                self._row_lse[i] = affinity_logsumexp(q, k, scale=scale, backend=self.backend)
            out.append(softmax_quadratic_form(q, k, z, row_lse=self._row_lse[i], scale=scale,
                                              backend=self.backend))      # (H, K)
        return out
