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

Row algebra: the iteration touches the rows of its N×b blocks only through a few
reductions — Gram matrices AᵀB, column norms, the finite check, the sign convention —
and the random start rows. It takes them from a row-algebra object (``LocalRows`` here);
an operator whose rows are split over processes supplies a collective one through
``op.row_algebra()`` (``ShardedOperator``: all-reduced Grams, small eigensolves broadcast
from one rank), so this one LOBPCG also runs sharded, as ``distributed_eigsh`` does. The
algebra's small matrices are replicated, hence so is every decision of the iteration.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._validation import check_tensor
from .operators.base import AffinityOperator, as_operator

__all__ = ["eigsh", "EigshInfo", "LocalRows", "LobpcgState"]

# Stop (with a warning) when the largest residual has not improved by STALL_FACTOR in
# STALL_PATIENCE iterations: tol is below what the operator's fp32 products can resolve.
STALL_PATIENCE = 20
STALL_FACTOR = 0.9

# Nyström start (init="nystrom", or "auto" from NYSTROM_MIN_N tokens): the top eigenvectors of
# the graph on a random sample of NYSTROM_SAMPLE(N) tokens, solved to NYSTROM_TOL (a start
# needs no more), extended to every token. From a start that close LOBPCG needs about half
# the passes over S (N = 20 000 on the CPU: 2 products instead of 4 at tol 1e-4).
NYSTROM_MIN_N = 5000
NYSTROM_TOL = 1e-2


def nystrom_sample_size(n: int) -> int:
    """Tokens in the Nyström sample: N/10, at least 2 000 and at most 8 192 (and < N)."""
    return min(max(2000, n // 10), 8192, n - 1)


INIT_MODES = ("auto", "random", "nystrom")

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
    init: str = "random"  # the start used: "random", "nystrom", "x0" or "resumed"


class LocalRows:
    """Row algebra of blocks whose ``n_local`` rows all live in this process (the default).

    The interface a collective algebra implements too: ``n_local`` (rows held here),
    ``rows_label`` (how messages name them), ``gram(a, b)`` (the global AᵀB, replicated),
    ``col_norms(v)``, ``all_finite(y)`` (true on every process or on none), ``eigh(sym)``
    (of a replicated symmetric matrix, identical everywhere) and ``all_gather(row)`` ((P, m)
    from each process's (m,)).
    """

    rows_label = "N"

    def __init__(self, n_local: int):
        self.n_local = n_local

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return a.T @ b

    def col_norms(self, v: Tensor) -> Tensor:
        return torch.linalg.vector_norm(v, dim=0)

    def all_finite(self, y: Tensor) -> bool:
        return bool(torch.isfinite(y).all())

    def eigh(self, sym: Tensor) -> tuple[Tensor, Tensor]:
        evals, evecs = torch.linalg.eigh(sym.cpu())  # tiny: the CPU beats a GPU launch here
        return evals.to(sym.device), evecs.to(sym.device)

    def all_gather(self, row: Tensor) -> Tensor:
        return row[None]


@dataclass
class LobpcgState:
    """The iteration's state after ``iteration`` complete iterations (enough to resume it exactly).

    X, AX: Ritz vectors and their images (rows held here); P, AP: search directions (None
    before the first iteration); evals: the Ritz values; history: residuals per iteration;
    calls, columns: operator applications and columns applied so far.
    """
    X: Tensor
    AX: Tensor
    P: Tensor | None
    AP: Tensor | None
    evals: Tensor
    history: list
    iteration: int
    calls: int
    columns: int


@dataclass
class _Problem:
    """A validated eigenproblem: what every LOBPCG run needs besides its start."""
    op: AffinityOperator
    algebra: object
    k: int
    tol: float
    max_iter: int
    width: int
    deflate: Tensor | None
    name: str
    init: str = "random"  # "random" or "nystrom" (resolved from INIT_MODES by eigsh)


def _check_k(k, n, n_deflated):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    available = n - n_deflated
    if k >= available:
        extra = " after excluding the trivial eigenvector" if n_deflated else ""
        raise ValueError(f"k must be smaller than the operator size N = {n}{extra} (k < {available}), got {k}")


def _project_out(v: Tensor, against: list, algebra) -> Tensor:
    for basis in against:
        if basis is not None and basis.shape[1]:
            v = v - basis @ algebra.gram(basis, v)
    return v


def _orthonormalize(v: Tensor, against: list, algebra, rank_tol: float = 1e-10) -> Tensor:
    """Columns of v made orthogonal to every block in ``against`` and orthonormal.

    Two rounds of block Gram–Schmidt, then an eigendecomposition of the Gram matrix
    (SVQB): directions that cancelled out (relative norm < rank_tol) are dropped.
    """
    for _ in range(2):
        v = _project_out(v, against, algebra)
    if v.shape[1] == 0:
        return v
    v, = _unit_columns(algebra, rank_tol, v)
    if v.shape[1] == 0:
        return v
    for _ in range(2):  # twice: one SVQB pass leaves O(ε·cond) loss of orthogonality
        v = v @ _svqb(v, algebra, rank_tol)
        v = _project_out(v, against, algebra)  # the final projection keeps orthogonality to ε
    return v


def _unit_columns(algebra, rank_tol: float, v: Tensor, *carried: Tensor) -> tuple:
    """v's columns scaled to unit norm, those that cancelled out (relative norm < rank_tol)
    dropped; each tensor in ``carried`` (e.g. v's image A·v) gets the same column operations."""
    norms = algebra.col_norms(v)
    largest = float(norms.max()) if norms.numel() else 0.0
    keep = norms > rank_tol * max(largest, 1e-300)
    return tuple(t[:, keep] / norms[keep] for t in (v, *carried))


def _svqb(v: Tensor, algebra, rank_tol: float = 1e-10) -> Tensor:
    """The transform T that makes v·T orthonormal (SVQB: from the eigendecomposition of the
    Gram matrix), dropping directions whose eigenvalue is below rank_tol of the largest."""
    evals, evecs = algebra.eigh(algebra.gram(v, v))
    keep = evals > rank_tol * float(evals.max())
    return evecs[:, keep] / evals[keep].sqrt()


class _Applier:
    """Operator products in the operator's dtype with float64 in and out; counts and checks them."""

    def __init__(self, op: AffinityOperator, deflate: Tensor | None, algebra):
        self.op, self.deflate, self.algebra = op, deflate, algebra
        self.calls = self.columns = 0

    def __call__(self, x64: Tensor) -> Tensor:
        return self.record(self.op.matmul(x64.to(self.op.dtype)))

    def record(self, y: Tensor) -> Tensor:
        """Count, check and deflate a product made by the operator (here or in ``fused_start``)."""
        self.calls += 1
        self.columns += y.shape[1]
        if not self.algebra.all_finite(y):  # collective for sharded rows: every rank raises together
            raise ValueError("the operator returned NaN or Inf (an unnormalised exp(τ·q·k) overflows in fp32: "
                             "use normalize='sym' or 'row', or smaller scores)")
        y = y.to(torch.float64)
        if self.deflate is not None:
            y = y - self.deflate @ self.algebra.gram(self.deflate, y)
        return y


class _StallWatch:
    """Flags STALL_PATIENCE iterations without the largest residual improving by STALL_FACTOR."""

    def __init__(self, history: list):
        self.best, self.best_iter = math.inf, 0
        for it, residuals in enumerate(history, start=1):  # a resumed run picks up where it stopped
            self.stalled(it, residuals)

    def stalled(self, it: int, residuals: Tensor) -> bool:
        worst = float(residuals.max())
        if worst < STALL_FACTOR * self.best:
            self.best, self.best_iter = worst, it
            return False
        return it - self.best_iter >= STALL_PATIENCE


def _setup(op: AffinityOperator, algebra, k, *, tol, max_iter, block_size, exclude_trivial, name) -> _Problem:
    """Validate the arguments shared by ``eigsh`` and ``distributed_eigsh``; deflation vector, block width."""
    if not op.is_symmetric:
        raise ValueError(f"{name} needs a symmetric operator, got {op!r} (is_symmetric=False); "
                         "use normalize='sym' for attention graphs")
    n_rows = op.shape[0]
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"the operator must be square, got shape {op.shape}")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    max_iter = 1000 if max_iter is None else max_iter
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")

    deflate = None
    if exclude_trivial:
        u = op.trivial_eigenvector()
        if u is None:
            raise ValueError(f"exclude_trivial=True needs an operator with a known trivial eigenvector "
                             f"(single-head normalize='sym'); {op!r} has none — ask for k + 1 pairs and "
                             f"drop the first instead")
        deflate = u.to(torch.float64).reshape(-1, 1)
        deflate = deflate / algebra.col_norms(deflate)
    _check_k(k, n_rows, 0 if deflate is None else 1)
    available = n_rows - (0 if deflate is None else 1)
    width = block_size if block_size is not None else k + max(8, k // 2)
    if not isinstance(width, int) or width < k:
        raise ValueError(f"block_size must be an int ≥ k = {k}, got {block_size!r}")
    return _Problem(op, algebra, k, tol, max_iter, min(width, available), deflate, name)


def _random_rows(problem: _Problem, columns: int, generator) -> Tensor:
    n = problem.algebra.n_local
    return torch.randn(n, columns, dtype=torch.float64, generator=generator).to(problem.op.device)


def _initial_block(problem: _Problem, x0, generator, rand: Tensor | None = None) -> Tensor:
    """Orthonormal (n_local, width) start: x0's columns, then random ones drawn from ``generator``
    (or the given ``rand``)."""
    algebra, width, device = problem.algebra, problem.width, problem.op.device
    n, label = algebra.n_local, algebra.rows_label
    if x0 is None:
        start = torch.empty(n, 0, dtype=torch.float64, device=device)
    else:
        check_tensor("x0", x0, min_dim=1)
        if x0.dim() > 2 or x0.shape[0] != n:
            raise ValueError(f"x0 must be ({label},) or ({label}, j) with {label} = {n}, got shape {tuple(x0.shape)}")
        start = (x0.unsqueeze(1) if x0.dim() == 1 else x0).to(device=device, dtype=torch.float64)
        if start.shape[1] > width:
            raise ValueError(f"x0 has {start.shape[1]} columns, more than the block size {width}")
    # x0 first and on its own: the orthonormalisation rotates within a block, and the
    # warm-start span must survive intact.
    start = _orthonormalize(start, [problem.deflate], algebra)
    if rand is None:
        rand = _random_rows(problem, width - start.shape[1], generator)
    block = torch.cat([start, _orthonormalize(rand, [problem.deflate, start], algebra)], dim=1)
    if block.shape[1] < problem.k:
        raise ValueError(f"could not build {problem.k} independent start vectors "
                         f"(x0 rank-deficient on a tiny operator)")
    return block


def _fused_start_block(problem: _Problem, apply: _Applier, z: Tensor):
    """(X, A·X) with X orthonormal from the operator's ``fused_start``, or None.

    The operator derives its start X0 from the block z (random, or a Nyström extension) and
    returns A·X0 from the pass that also computes its degrees; X = P·X0·T (P the deflation
    projector, T the SVQB transforms) and A·X = P·(A·X0)·T, since A·u = u for the deflated
    eigenvector u.
    """
    op, algebra = problem.op, problem.algebra
    if not isinstance(algebra, LocalRows):
        return None
    fused = op.fused_start(z.to(op.dtype))
    if fused is None:
        return None
    x0, image = fused
    X, AX = x0.to(torch.float64), apply.record(image)
    for _ in range(2):
        X = _project_out(X, [problem.deflate], algebra)
    # A start column can vanish (an extension of rank < width, e.g. duplicated tokens):
    # dropped here, as in _orthonormalize, instead of dividing by its zero norm.
    X, AX = _unit_columns(algebra, 1e-10, X, AX)
    if X.shape[1] < problem.k:
        return None
    for _ in range(2):  # as in _orthonormalize, with the image carried along
        transform = _svqb(X, algebra)
        X, AX = X @ transform, AX @ transform
    if X.shape[1] < problem.k:
        return None
    return X, AX


def _nystrom_block(problem: _Problem, generator) -> Tensor:
    """The start block z: eigenvectors of the graph on a random token sample, extended to all.

    The sample's problem is solved by this same LOBPCG (random start, tol NYSTROM_TOL); its
    non-convergence warnings are dropped, since any nearby subspace is a good start.
    """
    op, width = problem.op, problem.width
    n = op.shape[0]
    index = torch.randperm(n, generator=generator)[:nystrom_sample_size(n)].sort().values.to(op.device)
    sample = op.subsample(index)
    sample_problem = _setup(sample, LocalRows(index.shape[0]), width, tol=NYSTROM_TOL, max_iter=50,
                            block_size=None, exclude_trivial=False, name=f"{problem.name} (Nyström sample)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, vectors = _solve(sample_problem, generator)
    return op.extend_from_sample(index, sample, vectors).to(torch.float64)


def _resolve_init(init, op, deflate, algebra, width) -> str:
    """"random" or "nystrom" for eigsh's start; "auto" picks Nyström for large graphs that have it."""
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    n = op.shape[0]
    possible = (isinstance(algebra, LocalRows) and deflate is None and nystrom_sample_size(n) > width
                and op.can_subsample())
    if init == "nystrom" and not possible:
        raise ValueError(f"init='nystrom' needs a normalize='sym' KQAffinity/VVAffinity, no exclude_trivial, "
                         f"and N well above the block size; got {op!r} with N = {n}")
    return "nystrom" if possible and (init == "nystrom" or (init == "auto" and n >= NYSTROM_MIN_N)) else "random"


def _rayleigh_ritz(basis, image, width, algebra):
    """Top-``width`` Ritz pairs of the operator on span(basis) (orthonormal columns)."""
    projected = algebra.gram(basis, image)
    projected = 0.5 * (projected + projected.T)
    evals, evecs = algebra.eigh(projected)
    order = torch.argsort(evals, descending=True)[:width]
    return evals[order], evecs[:, order]


def _first_state(problem: _Problem, apply: _Applier, X: Tensor, AX: Tensor | None = None) -> LobpcgState:
    """Symmetry probe and the first Rayleigh–Ritz step on the start block (A·X computed here unless given)."""
    if AX is None:
        AX = apply(X)
    gram = problem.algebra.gram(X, AX)
    # max |⟨x_i, A x_j⟩ − ⟨A x_i, x_j⟩| relative to max |⟨x_i, A x_j⟩|, from products already made
    asym = float((gram - gram.T).abs().max()) / max(float(gram.abs().max()), torch.finfo(torch.float64).tiny)
    if asym > SYMMETRY_RTOL:
        raise ValueError(f"the operator is not symmetric: ⟨x, Ay⟩ and ⟨Ax, y⟩ differ by {asym:.2e} (relative) "
                         f"on random vectors; {problem.name} needs a symmetric operator")
    evals, coeffs = _rayleigh_ritz(X, AX, X.shape[1], problem.algebra)
    return LobpcgState(X @ coeffs, AX @ coeffs, None, None, evals, [], 0, apply.calls, apply.columns)


def _lobpcg(problem: _Problem, apply: _Applier, state: LobpcgState, bar, callback):
    """Iterate from ``state``, updated in place after every complete iteration.

    Returns (converged, stalled, iterations run in all, final residuals); ``state`` then
    holds the Ritz pairs the loop ended with.
    """
    algebra, k, tol, width, deflate = problem.algebra, problem.k, problem.tol, problem.width, problem.deflate
    X, AX, P, AP, evals, history = state.X, state.AX, state.P, state.AP, state.evals, state.history
    device = X.device
    watch = _StallWatch(history)
    converged = stalled = False
    # a run resumed at or past max_iter does no iteration: its last residuals stand
    residuals = history[-1] if history else torch.full((k,), math.inf)
    n_iter = state.iteration
    for n_iter in range(state.iteration + 1, problem.max_iter + 1):
        R = AX - X * evals.to(device)
        scale = max(float(evals.abs().max()), torch.finfo(torch.float64).tiny)
        rel = (algebra.col_norms(R) / scale).cpu()
        residuals = rel[:k]
        history.append(residuals.clone())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{float(residuals.max()):.1e}", tol=f"{problem.tol:g}")
        if bool((residuals <= tol).all()):
            converged = True
            break
        if watch.stalled(n_iter, residuals):
            stalled = True
            break
        # Soft locking: only the residuals of unconverged columns enter the search space.
        W = _orthonormalize(R[:, (rel > tol).to(device)], [deflate, X, P], algebra)
        if W.shape[1] == 0:  # the residuals lie in the current space: nothing left to find
            converged = bool((residuals <= max(tol, 1e-12)).all())
            break
        AW = apply(W)
        basis = torch.cat([X, W] + ([P] if P is not None else []), dim=1)
        image = torch.cat([AX, AW] + ([AP] if AP is not None else []), dim=1)
        evals, coeffs = _rayleigh_ritz(basis, image, width, algebra)
        X, AX = basis @ coeffs, image @ coeffs
        # New search directions: the [W, P] part of the new Ritz vectors, made orthonormal
        # and orthogonal to X within the (orthonormal, replicated) coefficient space — local algebra.
        dirs = coeffs.clone()
        dirs[:width] = 0
        dirs = _orthonormalize(dirs, [coeffs], LocalRows(dirs.shape[0]))
        P, AP = basis @ dirs, image @ dirs
        state.X, state.AX, state.P, state.AP, state.evals = X, AX, P, AP, evals
        state.iteration, state.calls, state.columns = n_iter, apply.calls, apply.columns
        if callback is not None:
            callback(state)
    return converged, stalled, n_iter, residuals


def _solve(problem: _Problem, start, *, progress=False, callback=None, return_info=False):
    """Run LOBPCG from a start block (Tensor) or a saved ``LobpcgState``; the public return value.

    ``callback(state)`` is called after every complete iteration (e.g. to checkpoint it).
    Warnings are issued at the caller of the public function (stacklevel 3).
    """
    op, k, name = problem.op, problem.k, problem.name
    apply = _Applier(op, problem.deflate, problem.algebra)
    if isinstance(start, LobpcgState):
        state = dataclasses.replace(start, history=list(start.history))  # the caller's copy stays as saved
        apply.calls, apply.columns = state.calls, state.columns
        init = "resumed"
    elif isinstance(start, torch.Generator) or start is None:  # built here, fused when the operator can
        init = problem.init
        z = _nystrom_block(problem, start) if init == "nystrom" else _random_rows(problem, problem.width, start)
        fused = _fused_start_block(problem, apply, z)
        if fused is not None:
            X, AX = fused
        else:  # no fused pass: z is the start itself (a random block, or the extended u)
            try:
                X, AX = _initial_block(problem, None, start, z), None
            except ValueError:
                if init != "nystrom":
                    raise
                # an extension of rank < k (e.g. duplicated tokens): a random start is not
                init, X, AX = "random", _initial_block(problem, None, start), None
        state = _first_state(problem, apply, X, AX)
    else:
        init = "x0"
        state = _first_state(problem, apply, start)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        # Iterations, not a fraction of max_iter (a cap that converged runs never approach);
        # the postfix shows the residual closing on tol.
        bar = tqdm(initial=state.iteration, desc=name, unit="it", leave=False)
    try:
        converged, stalled, n_iter, residuals = _lobpcg(problem, apply, state, bar, callback)
    finally:
        if bar is not None:
            bar.close()
    worst, tol = float(residuals.max()), problem.tol
    if stalled:
        warnings.warn(f"{name} stopped after {n_iter} iterations: the largest relative residual stalled at "
                      f"{worst:.2e} > tol = {tol:g}, likely the noise floor of the operator's "
                      f"{op.dtype} products; use a larger tol", RuntimeWarning, stacklevel=3)
    elif not converged:
        warnings.warn(f"{name} did not converge in {n_iter} iterations: largest relative residual "
                      f"{worst:.2e} > tol = {tol:g}", RuntimeWarning, stacklevel=3)

    vals = state.evals[:k].to(device=op.device, dtype=op.dtype)
    vecs = _fix_signs(state.X[:, :k], problem.algebra).to(op.dtype)
    if return_info:
        info = EigshInfo(converged=converged, n_iter=n_iter, n_calls=apply.calls,
                         n_columns=apply.columns, residuals=residuals, history=state.history, init=init)
        return vals, vecs, info
    return vals, vecs


def _fix_signs(vecs: Tensor, algebra) -> Tensor:
    """Deterministic signs: the largest-magnitude entry of each (global) eigenvector is positive."""
    columns = torch.arange(vecs.shape[1], device=vecs.device)
    pivot = vecs.abs().argmax(dim=0)
    table = algebra.all_gather(vecs[pivot, columns].contiguous())  # (P, k): each process's largest entry
    owner = table.abs().argmax(dim=0)                              # first on ties = lowest global row
    signs = torch.sign(table[owner, columns])
    signs[signs == 0] = 1
    return vecs * signs


def eigsh(op, k: int, *, tol: float = 1e-6, max_iter: int | None = None, x0: Tensor | None = None,
          block_size: int | None = None, exclude_trivial: bool = False, n: int | None = None,
          init: str = "auto", progress: bool = False, return_info: bool = False,
          generator: torch.Generator | None = None):
    """Top-k eigenpairs of a symmetric operator, matrix-free (block LOBPCG).

    Args:
        op: an ``AffinityOperator`` (KQAffinity, VVAffinity, sums, pooled...), a dense
            symmetric (N, N) tensor, or a callable X (N, m) → (N, m) together with ``n``.
            An operator with ``row_algebra()`` (a ``ShardedOperator``) is solved on its
            row shards, collectively; ``distributed_eigsh`` adds per-rank seeds and checkpoints.
        k: number of eigenpairs, 1 ≤ k < N.
        tol: relative residual ‖A x − λ x‖ / max|λ| at which a pair counts as converged.
        max_iter: iteration cap (default 1000); on reaching it — or when the residuals stop
            improving for 20 iterations, i.e. tol is below the fp32 products' noise floor — a
            RuntimeWarning is issued and the current pairs are returned (info.converged False).
        x0: (N,) or (N, j) warm start (e.g. the eigenvectors of a neighbouring problem);
            j ≤ block size, remaining columns are random.
        init: the start without x0. "random"; "nystrom": the top eigenvectors of the graph on
            a random sample of N/10 tokens (2 000 to 8 192), solved loosely and extended to
            every token — about half the LOBPCG products for the same tol (normalize="sym"
            KQAffinity/VVAffinity, without exclude_trivial); "auto" (default): "nystrom"
            where possible from N = 5 000 tokens, else "random". The result is exact to tol
            either way.
        block_size: columns per block (default k + max(8, k // 2)).
        exclude_trivial: deflate ``op.trivial_eigenvector()`` (the ∝ sqrt(d) eigenvector of
            a single-head NCut operator) and return the k eigenpairs after it.
        progress: show a tqdm progress bar.
        return_info: also return an ``EigshInfo`` (residual history, operator calls, the start).
        generator: torch.Generator for the random start block.

    Returns:
        (eigenvalues (k,), eigenvectors (N, k)) in the operator's dtype, eigenvalues
        descending (algebraically largest first); each eigenvector's largest-magnitude
        entry is positive. With return_info, (eigenvalues, eigenvectors, info).
    """
    A = as_operator(op, n)
    row_algebra = getattr(A, "row_algebra", None)
    algebra = row_algebra() if row_algebra is not None else LocalRows(A.shape[0])
    problem = _setup(A, algebra, k, tol=tol, max_iter=max_iter, block_size=block_size,
                     exclude_trivial=exclude_trivial, name="eigsh")
    if x0 is not None and init == "nystrom":
        raise ValueError("init='nystrom' and x0 both choose the start: pass one of them")
    problem.init = _resolve_init(init, A, problem.deflate, algebra, problem.width)
    # A random start is built inside _solve, where it can share the operator's degree pass.
    start = generator if x0 is None else _initial_block(problem, x0, generator)
    return _solve(problem, start, progress=progress, return_info=return_info)
