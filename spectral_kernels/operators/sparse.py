"""A sparse graph (e.g. from ``knn_graph``) as an operator: products are sparse matmuls."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import AffinityOperator

SPARSE_LAYOUTS = (torch.sparse_csr, torch.sparse_coo)


class SparseOperator(AffinityOperator):
    """Wrap a square torch sparse (CSR or COO) matrix.

    ``symmetric=None`` decides by a probe ⟨x, Wy⟩ vs ⟨Wx, y⟩ on random vectors: cheap,
    and exact up to rounding for the symmetrised (``none``/``sym``) kNN graphs, while a
    random-walk (``row``) graph is genuinely non-symmetric.
    """

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None, rtol: float = 1e-4):
        if not isinstance(matrix, Tensor) or matrix.layout not in SPARSE_LAYOUTS:
            raise TypeError(f"matrix must be a torch sparse CSR/COO tensor, got "
                            f"{getattr(matrix, 'layout', type(matrix).__name__)}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        if not matrix.dtype.is_floating_point:
            raise TypeError(f"matrix must have a floating dtype, got {matrix.dtype}")
        self.matrix = matrix
        self.shape, self.device, self.dtype = tuple(matrix.shape), matrix.device, matrix.dtype
        self._transpose = None
        self.is_symmetric = self._probe_symmetry(rtol) if symmetric is None else bool(symmetric)

    def _probe_symmetry(self, rtol: float) -> bool:
        n = self.shape[0]
        if n == 0:
            return True
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, 2, generator=g, dtype=torch.float64).to(self.device, self.dtype)
        wx = self.matrix @ x
        lhs, rhs = float(x[:, 0] @ wx[:, 1]), float(wx[:, 0] @ x[:, 1])
        scale = float(x.norm() * wx.norm()) or 1.0
        return abs(lhs - rhs) <= rtol * scale

    def _matmul(self, x):
        return self.matrix @ x

    def _adjoint_matmul(self, x):
        if self.is_symmetric:
            return self.matrix @ x
        if self._transpose is None:  # built once: a transposed CSR is a full re-sort
            self._transpose = self.matrix.to_sparse_coo().t().coalesce().to_sparse_csr()
        return self._transpose @ x

    def to_dense(self):
        return self.matrix.to_dense()
