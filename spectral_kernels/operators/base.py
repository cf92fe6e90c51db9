"""Matrix-free linear operators on token space: the interface, sums, adjoints, wrappers.

An operator is an N×N matrix known only through its products with N×m blocks. Every
graph of the package (attention, value similarity, pooled layers and their weighted
sums) is one, and the eigensolver consumes only this interface:

    op.shape == (N, N), op.device, op.dtype, op.is_symmetric
    op @ X, op.matmul(X)          X: (N,) or (N, m); result in op.dtype
    op.adjoint_matmul(X), op.T    the transposed product
    op1 + 0.5 * op2               weighted sums (flattened into one ``SumOperator``)
    op.trivial_eigenvector()      the known top eigenvector when there is one, else None
    op.to_dense()                 the materialised matrix, for tests on small N only

Subclasses implement ``_matmul(x)`` (and ``_adjoint_matmul`` unless symmetric) for a
validated 2-D ``x`` already in ``op.dtype`` on ``op.device``.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import Tensor

from .._validation import check_tensor

# to_dense() is for tests: refuse sizes where the matrix itself is the problem.
MAX_DENSE_N = 16384


class AffinityOperator:
    """Base class: an N×N operator applied blockwise, never materialised."""

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    is_symmetric: bool = False

    # ------------------------------------------------------------------ products
    def _matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adjoint_matmul(self, x: Tensor) -> Tensor:
        if self.is_symmetric:
            return self._matmul(x)
        raise NotImplementedError(f"{type(self).__name__} has no transposed product")

    def _prepare(self, x, name="x"):
        check_tensor(name, x, min_dim=1)
        if x.dim() > 2:
            raise ValueError(f"{name} must be (N,) or (N, m), got shape {tuple(x.shape)}")
        if x.shape[0] != self.shape[1]:
            raise ValueError(f"{name} must have {self.shape[1]} rows to match the operator of shape "
                             f"{self.shape}, got shape {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the operator is on {self.device}")
        vector = x.dim() == 1
        x2 = x.unsqueeze(1) if vector else x
        return x2.to(self.dtype), vector

    def matmul(self, x: Tensor) -> Tensor:
        """The product op·x for x of shape (N,) or (N, m), in the operator's dtype."""
        x2, vector = self._prepare(x)
        y = self._matmul(x2)
        return y.squeeze(1) if vector else y

    def adjoint_matmul(self, x: Tensor) -> Tensor:
        """The product opᵀ·x for x of shape (N,) or (N, m)."""
        x2, vector = self._prepare(x)
        y = self._adjoint_matmul(x2)
        return y.squeeze(1) if vector else y

    def __matmul__(self, x):
        return self.matmul(x)

    @property
    def T(self) -> "AffinityOperator":
        return self if self.is_symmetric else AdjointOperator(self)

    # ------------------------------------------------------------------ algebra
    def _make_sum(self, terms):
        """The weighted-sum type for this operator (sharded operators keep their sums sharded)."""
        return SumOperator(terms)

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self  # so that sum(operators) works
        if not isinstance(other, AffinityOperator):
            return NotImplemented
        return self._make_sum([(1.0, self), (1.0, other)])

    __radd__ = __add__

    def __mul__(self, scalar):
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = float(scalar)
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        return self._make_sum([(float(scalar), self)])

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        return self * (1.0 / scalar)

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        if not isinstance(other, AffinityOperator):
            return NotImplemented
        return self + (-1.0) * other

    # ------------------------------------------------------------------ helpers
    def trivial_eigenvector(self) -> Tensor | None:
        """Unit-norm eigenvector known in closed form (NCut: ∝ sqrt(degrees)), or None."""
        return None

    def can_subsample(self) -> bool:
        """True when ``subsample`` and ``extend_from_sample`` exist (eigsh's Nyström start)."""
        return False

    def subsample(self, index: Tensor) -> "AffinityOperator":
        """The same graph on the tokens ``index`` only (where ``can_subsample()``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be subsampled")

    def extend_from_sample(self, index: Tensor, sample: "AffinityOperator", vectors: Tensor) -> Tensor:
        """Eigenvectors of ``sample = self.subsample(index)`` extended to every token, as the
        block z that ``fused_start`` turns into a start (where ``can_subsample()``)."""
        raise NotImplementedError(f"{type(self).__name__} has no Nyström extension")

    def fused_start(self, z: Tensor) -> tuple[Tensor, Tensor] | None:
        """(X0, op·X0) for a start block X0 derived from z (N, m), or None.

        For operators whose statistics (degrees) cost a pass of their own before the first
        product, this computes both in that one pass; eigsh uses it for its random start.
        None: not available (the default), and eigsh applies the operator as usual.
        """
        return None

    def to_dense(self) -> Tensor:
        """The N×N matrix (applies the operator to the identity): tests on small N only."""
        n = self.shape[1]
        if n > MAX_DENSE_N:
            raise ValueError(f"to_dense() is for small operators (N ≤ {MAX_DENSE_N}), this one has N = {n}")
        return self._matmul(torch.eye(n, dtype=self.dtype, device=self.device))

    def __repr__(self):
        sym = ", symmetric" if self.is_symmetric else ""
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}{sym})"


def _promote(dtypes):
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


class SumOperator(AffinityOperator):
    """Σ_t w_t·op_t: weighted sums of operators (layers, heads, timesteps). Nested sums flatten."""

    def __init__(self, terms):
        flat = []
        for weight, op in terms:
            if not isinstance(op, AffinityOperator):
                raise TypeError(f"terms must be (weight, AffinityOperator) pairs, got {type(op).__name__}")
            if isinstance(op, SumOperator):
                flat.extend((float(weight) * w, inner) for w, inner in op.terms)
            else:
                flat.append((float(weight), op))
        if not flat:
            raise ValueError("a sum needs at least one operator")
        shapes = {op.shape for _, op in flat}
        if len(shapes) > 1:
            raise ValueError(f"operators in a sum must have one shape, got {sorted(shapes)}")
        devices = {op.device for _, op in flat}
        if len(devices) > 1:
            raise ValueError(f"operators in a sum must be on one device, got {devices}")
        self.terms = flat
        self.shape = flat[0][1].shape
        self.device = flat[0][1].device
        self.dtype = _promote(op.dtype for _, op in flat)
        self.is_symmetric = all(op.is_symmetric for _, op in flat)

    def _weighted_sum(self, product, x):
        """Σ_t w_t · product(op_t, x) in this operator's dtype."""
        out = None
        for weight, op in self.terms:
            y = product(op, x.to(op.dtype)).to(self.dtype)
            out = y.mul_(weight) if out is None else out.add_(y, alpha=weight)
        return out

    def _matmul(self, x):
        return self._weighted_sum(lambda op, v: op._matmul(v), x)

    def _adjoint_matmul(self, x):
        return self._weighted_sum(lambda op, v: op._adjoint_matmul(v), x)

    def trivial_eigenvector(self):
        # A positive multiple keeps the eigenvector (and its place at the top of the spectrum).
        if len(self.terms) == 1 and self.terms[0][0] > 0:
            return self.terms[0][1].trivial_eigenvector()
        return None


class AdjointOperator(AffinityOperator):
    """opᵀ of a non-symmetric operator."""

    def __init__(self, op: AffinityOperator):
        self.op, self.shape, self.device, self.dtype = op, op.shape[::-1], op.device, op.dtype
        self.is_symmetric = op.is_symmetric

    def _matmul(self, x):
        return self.op._adjoint_matmul(x)

    def _adjoint_matmul(self, x):
        return self.op._matmul(x)

    @property
    def T(self):
        return self.op


class DenseOperator(AffinityOperator):
    """An explicit matrix as an operator (small problems, tests, eigsh on a dense tensor)."""

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None, rtol: float = 1e-5):
        check_tensor("matrix", matrix, dim=2)
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix.to(_promote([matrix.dtype]))
        self.shape, self.device, self.dtype = tuple(matrix.shape), matrix.device, self.matrix.dtype
        if symmetric is None:
            scale = self.matrix.abs().max().clamp_min(torch.finfo(self.dtype).tiny)
            symmetric = bool(((self.matrix - self.matrix.T).abs().max() <= rtol * scale).item())
        self.is_symmetric = symmetric

    def _matmul(self, x):
        return self.matrix @ x

    def _adjoint_matmul(self, x):
        return self.matrix.T @ x

    def to_dense(self):
        return self.matrix


class CallableOperator(AffinityOperator):
    """An operator given by a function X (N, m) → (N, m), e.g. an external product."""

    def __init__(self, fn: Callable[[Tensor], Tensor], n: int, *, dtype=torch.float32, device="cpu",
                 symmetric: bool = True, adjoint: Callable[[Tensor], Tensor] | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.fn, self.adjoint_fn = fn, adjoint
        self.shape, self.dtype, self.device = (int(n), int(n)), dtype, torch.device(device)
        self.is_symmetric = symmetric

    def _check(self, y, x):
        if not isinstance(y, Tensor) or y.shape != x.shape:
            raise ValueError(f"the operator function must return a tensor of shape {tuple(x.shape)}, "
                             f"got {getattr(y, 'shape', type(y).__name__)}")
        return y.to(self.dtype)

    def _matmul(self, x):
        return self._check(self.fn(x), x)

    def _adjoint_matmul(self, x):
        if self.adjoint_fn is not None:
            return self._check(self.adjoint_fn(x), x)
        return super()._adjoint_matmul(x)


def as_operator(op, n: int | None = None) -> AffinityOperator:
    """An ``AffinityOperator`` from an operator, a dense or sparse square tensor, or a callable plus n."""
    if isinstance(op, AffinityOperator):
        return op
    if isinstance(op, Tensor):
        if op.layout != torch.strided:
            from .sparse import SparseOperator  # sparse graphs, e.g. knn_graph's CSR
            return SparseOperator(op)
        return DenseOperator(op)
    if callable(op):
        if n is None:
            raise ValueError("a callable operator needs n (its number of rows)")
        return CallableOperator(op, n)
    raise TypeError(f"op must be an AffinityOperator, a square tensor or a callable, got {type(op).__name__}")
