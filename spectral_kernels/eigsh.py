"""Exact top-k eigenpairs of a symmetric matrix-free operator (block LOBPCG).

Each iteration applies the operator once, to the residuals of the vectors that have not
converged yet (soft locking), and does a Rayleigh–Ritz step on span[X, W, P] (current
Ritz vectors, residuals, previous search directions). The block is wider than k: the
convergence rate of vector i is governed by the gap to λ_{b+1}, not λ_{k+1}.

Precision: the operator products run in the operator's dtype (fp32 for the affinity
operators); everything else — the N×3b basis, orthogonalisation, the small projected
eigenproblem — is float64, so the solver adds no error beyond the products' own.

Residuals are relative: ‖A x_i − λ_i x_i‖ / max_j |λ_j|. A known trivial eigenvector
(``op.trivial_eigenvector()``, ∝ sqrt(d) for an NCut operator) can be deflated.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._validation import check_tensor
from .operators.base import AffinityOperator, as_operator

__all__ = ["eigsh", "EigshInfo"]

# Stop (with a warning) when the largest residual has not improved by STALL_FACTOR in
# STALL_PATIENCE iterations: tol is below what the operator's fp32 products can resolve.
STALL_PATIENCE = 20
STALL_FACTOR = 0.9

# Relative asymmetry of Xᵀ A X (random X) above which an operator is declared non-symmetric;
# far above fp32 product noise (~1e-6), far below any genuinely non-symmetric graph.
SYMMETRY_RTOL = 1e-3


@dataclass
class EigshInfo:
    """How the solve went. ``history[t]`` holds the k relative residual norms after iteration t."""
    converged: bool
    n_iter: int
    n_calls: int          # operator applications
    n_columns: int        # columns applied in total (the cost of a call grows with its width)
    residuals: Tensor     # final relative residual norms (k,)
    history: list = field(default_factory=list)


def _check_k(k, n, n_deflated):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    available = n - n_deflated
    if k >= available:
        extra = " after excluding the trivial eigenvector" if n_deflated else ""
        raise ValueError(f"k must be smaller than the operator size N = {n}{extra} (k < {available}), got {k}")


def _orthonormalize(v: Tensor, against: list[Tensor], rank_tol: float = 1e-10) -> Tensor:
    """Columns of v made orthogonal to every block in ``against`` and orthonormal.

    Two rounds of block Gram–Schmidt, then an eigendecomposition of the Gram matrix
    (SVQB): directions that cancelled out (relative norm < rank_tol) are dropped.
    """
    for _ in range(2):
        for basis in against:
            if basis is not None and basis.shape[1]:
                v = v - basis @ (basis.T @ v)
    if v.shape[1] == 0:
        return v
    norms = torch.linalg.vector_norm(v, dim=0)
    keep = norms > rank_tol * max(float(norms.max()), 1e-300)
    v = v[:, keep] / norms[keep]
    if v.shape[1] == 0:
        return v
    for _ in range(2):  # twice: one SVQB pass leaves O(ε·cond) loss of orthogonality
        gram = v.T @ v
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > rank_tol * float(evals.max())
        v = v @ (evecs[:, keep] / evals[keep].sqrt())
        for basis in against:  # the final projection keeps orthogonality to ε
            if basis is not None and basis.shape[1]:
                v = v - basis @ (basis.T @ v)
    return v


class _Applier:
    """Operator products in the operator's dtype with float64 in and out; counts and checks them."""

    def __init__(self, op: AffinityOperator, deflate: Tensor | None):
        self.op, self.deflate = op, deflate
        self.calls = self.columns = 0

    def __call__(self, x64: Tensor) -> Tensor:
        y = self.op.matmul(x64.to(self.op.dtype))
        self.calls += 1
        self.columns += x64.shape[1]
        if not bool(torch.isfinite(y).all()):
            raise ValueError("the operator returned NaN or Inf (an unnormalised exp(τ·q·k) overflows in fp32: "
                             "use normalize='sym' or 'row', or smaller scores)")
        y = y.to(torch.float64)
        if self.deflate is not None:
            y = y - self.deflate @ (self.deflate.T @ y)
        return y


def _initial_block(x0, n, width, deflate, device, generator):
    if x0 is None:
        start = torch.empty(n, 0, dtype=torch.float64, device=device)
    else:
        check_tensor("x0", x0, min_dim=1)
        if x0.dim() > 2 or x0.shape[0] != n:
            raise ValueError(f"x0 must be (N,) or (N, j) with N = {n}, got shape {tuple(x0.shape)}")
        start = (x0.unsqueeze(1) if x0.dim() == 1 else x0).to(device=device, dtype=torch.float64)
        if start.shape[1] > width:
            raise ValueError(f"x0 has {start.shape[1]} columns, more than the block size {width}")
    # x0 first and on its own: the orthonormalisation rotates within a block, and the
    # warm-start span must survive intact.
    start = _orthonormalize(start, [deflate])
    rand = torch.randn(n, width - start.shape[1], dtype=torch.float64, generator=generator).to(device)
    return torch.cat([start, _orthonormalize(rand, [deflate, start])], dim=1)


def _rayleigh_ritz(basis, image, width):
    """Top-``width`` Ritz pairs of the operator on span(basis) (orthonormal columns)."""
    projected = basis.T @ image
    projected = 0.5 * (projected + projected.T)
    evals, evecs = torch.linalg.eigh(projected.cpu())  # tiny: the CPU beats a GPU launch here
    order = torch.argsort(evals, descending=True)[:width]
    return evals[order], evecs[:, order].to(basis.device)


def _lobpcg(apply, X, k, tol, max_iter, deflate, bar):
    """Block LOBPCG from the orthonormal start block X; returns (Ritz values, vectors, state)."""
    width = X.shape[1]
    AX = apply(X)
    asym = _asymmetry(X, AX)
    if asym > SYMMETRY_RTOL:
        raise ValueError(f"the operator is not symmetric: ⟨x, Ay⟩ and ⟨Ax, y⟩ differ by {asym:.2e} (relative) "
                         f"on random vectors; eigsh needs a symmetric operator")
    evals, coeffs = _rayleigh_ritz(X, AX, width)
    X, AX = X @ coeffs, AX @ coeffs
    P = AP = None
    state = {"converged": False, "stalled": False, "n_iter": 0, "history": [], "residuals": None}
    best, best_iter = math.inf, 0
    for it in range(1, max_iter + 1):
        state["n_iter"] = it
        R = AX - X * evals.to(X.device)
        scale = max(float(evals.abs().max()), torch.finfo(torch.float64).tiny)
        rel = (torch.linalg.vector_norm(R, dim=0) / scale).cpu()
        residuals = state["residuals"] = rel[:k]
        state["history"].append(residuals.clone())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{float(residuals.max()):.1e}")
        if bool((residuals <= tol).all()):
            state["converged"] = True
            break
        worst = float(residuals.max())
        if worst < STALL_FACTOR * best:
            best, best_iter = worst, it
        elif it - best_iter >= STALL_PATIENCE:
            state["stalled"] = True
            break
        # Soft locking: only the residuals of unconverged columns enter the search space.
        W = _orthonormalize(R[:, (rel > tol).to(X.device)], [deflate, X, P])
        if W.shape[1] == 0:  # the residuals lie in the current space: nothing left to find
            state["converged"] = bool((residuals <= max(tol, 1e-12)).all())
            break
        AW = apply(W)
        basis = torch.cat([X, W] + ([P] if P is not None else []), dim=1)
        image = torch.cat([AX, AW] + ([AP] if AP is not None else []), dim=1)
        evals, coeffs = _rayleigh_ritz(basis, image, width)
        X, AX = basis @ coeffs, image @ coeffs
        # New search directions: the [W, P] part of the new Ritz vectors, made orthonormal
        # and orthogonal to X within the (orthonormal) coefficient space.
        dirs = coeffs.clone()
        dirs[:width] = 0
        dirs = _orthonormalize(dirs, [coeffs])
        P, AP = basis @ dirs, image @ dirs
    return evals, X, state


def eigsh(op, k: int, *, tol: float = 1e-6, max_iter: int | None = None, x0: Tensor | None = None,
          block_size: int | None = None, exclude_trivial: bool = False, n: int | None = None,
          progress: bool = False, return_info: bool = False, generator: torch.Generator | None = None):
    """Top-k eigenpairs of a symmetric operator, matrix-free (block LOBPCG).

    Args:
        op: an ``AffinityOperator`` (KQAffinity, VVAffinity, sums, pooled...), a dense
            symmetric (N, N) tensor, or a callable X (N, m) → (N, m) together with ``n``.
        k: number of eigenpairs, 1 ≤ k < N.
        tol: relative residual ‖A x − λ x‖ / max|λ| at which a pair counts as converged.
        max_iter: iteration cap (default 1000); on reaching it — or when the residuals stop
            improving for 20 iterations, i.e. tol is below the fp32 products' noise floor — a
            RuntimeWarning is issued and the current pairs are returned (info.converged False).
        x0: (N,) or (N, j) warm start (e.g. the eigenvectors of a neighbouring problem);
            j ≤ block size, remaining columns are random.
        block_size: columns per block (default k + max(8, k // 2)).
        exclude_trivial: deflate ``op.trivial_eigenvector()`` (the ∝ sqrt(d) eigenvector of
            a single-head NCut operator) and return the k eigenpairs after it.
        progress: show a tqdm progress bar.
        return_info: also return an ``EigshInfo`` (residual history, operator calls).
        generator: torch.Generator for the random start block.

    Returns:
        (eigenvalues (k,), eigenvectors (N, k)) in the operator's dtype, eigenvalues
        descending (algebraically largest first); each eigenvector's largest-magnitude
        entry is positive. With return_info, (eigenvalues, eigenvectors, info).
    """
    A = as_operator(op, n)
    if not A.is_symmetric:
        raise ValueError(f"eigsh needs a symmetric operator, got {A!r} (is_symmetric=False); "
                         "use normalize='sym' for attention graphs")
    n_rows = A.shape[0]
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"the operator must be square, got shape {A.shape}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    max_iter = 1000 if max_iter is None else max_iter
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    device = A.device

    deflate = None
    if exclude_trivial:
        u = A.trivial_eigenvector()
        if u is None:
            raise ValueError(f"exclude_trivial=True needs an operator with a known trivial eigenvector "
                             f"(single-head normalize='sym'); {A!r} has none — ask for k + 1 pairs and "
                             f"drop the first instead")
        deflate = (u / torch.linalg.vector_norm(u)).to(torch.float64).reshape(n_rows, 1)
    _check_k(k, n_rows, 0 if deflate is None else 1)
    available = n_rows - (0 if deflate is None else 1)
    width = block_size if block_size is not None else k + max(8, k // 2)
    if not isinstance(width, int) or width < k:
        raise ValueError(f"block_size must be an int ≥ k = {k}, got {block_size!r}")
    width = min(width, available)

    apply = _Applier(A, deflate)
    X = _initial_block(x0, n_rows, width, deflate, device, generator)
    if X.shape[1] < k:
        raise ValueError(f"could not build {k} independent start vectors (x0 rank-deficient on a tiny operator)")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iter, desc="eigsh", leave=False)
    try:
        evals, X, state = _lobpcg(apply, X, k, tol, max_iter, deflate, bar)
    finally:
        if bar is not None:
            bar.close()
    worst = float(state["residuals"].max())
    if state["stalled"]:
        warnings.warn(f"eigsh stopped after {state['n_iter']} iterations: the largest relative residual stalled at "
                      f"{worst:.2e} > tol = {tol:g}, likely the noise floor of the operator's "
                      f"{A.dtype} products; use a larger tol", RuntimeWarning, stacklevel=2)
    elif not state["converged"]:
        warnings.warn(f"eigsh did not converge in {state['n_iter']} iterations: largest relative residual "
                      f"{worst:.2e} > tol = {tol:g}", RuntimeWarning, stacklevel=2)

    vecs = X[:, :k]
    # Deterministic signs: the largest-magnitude entry of each eigenvector is positive.
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivot, torch.arange(k, device=device)])
    signs[signs == 0] = 1
    vals = evals[:k].to(device=device, dtype=A.dtype)
    vecs = (vecs * signs).to(A.dtype)
    if return_info:
        info = EigshInfo(converged=state["converged"], n_iter=state["n_iter"], n_calls=apply.calls,
                         n_columns=apply.columns, residuals=state["residuals"], history=state["history"])
        return vals, vecs, info
    return vals, vecs


def _asymmetry(x: Tensor, ax: Tensor) -> float:
    """max |⟨x_i, A x_j⟩ − ⟨A x_i, x_j⟩| relative to max |⟨x_i, A x_j⟩|, from products already made."""
    gram = x.T @ ax
    return float((gram - gram.T).abs().max()) / max(float(gram.abs().max()), torch.finfo(torch.float64).tiny)
