"""Top-k eigenpairs of a sharded operator: the block LOBPCG of ``spectral_kernels.eigsh`` with
every inner product all-reduced, plus per-rank checkpoints that resume.

The iteration is the single-process one step for step (soft locking, Rayleigh–Ritz on
span[X, W, P], two-round Gram–Schmidt + SVQB, float64 outside the products). The only
change is where inner products come from: the N×b blocks are row-sharded like the
operator, and every XᵀY goes through ``op.gram`` (local product + all-reduce), so all
small matrices — and therefore every decision (converged, active columns, kept
directions) — are the same on every rank. The small eigendecompositions are broadcast
from rank 0 so that ranks can never drift apart, even on a library whose eigh is not
bitwise reproducible.

Checkpoints (``checkpoint=PREFIX``, see ``checkpoints.py``): each rank writes its rows of the
LOBPCG state (X, AX, P, AP and the Ritz values) to ``PREFIX.rank{r}-of-{P}.slot{0,1}.pt``,
atomically, alternating two slots; ``resume=True`` continues from the newest iteration
that every rank has on disk, bit for bit as if never stopped.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from ..eigsh import SYMMETRY_RTOL, EigshInfo, _check_k
from .checkpoints import load_common, save_slot
from .operators import ShardedOperator
from .shards import agree

__all__ = ["distributed_eigsh"]

CHECKPOINT_VERSION = 1


class _Collective:
    """Inner products, norms and replicated small eigensolves for row-sharded blocks."""

    def __init__(self, op: ShardedOperator):
        self.op = op
        self.group = op.group
        self.root = op.layout.peer(0)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.op.gram(a, b)

    def col_norms(self, v: Tensor) -> Tensor:
        sq = (v * v).sum(dim=0)
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt()

    def eigh(self, sym: Tensor):
        evals, evecs = torch.linalg.eigh(sym.cpu())
        packed = torch.cat([evals[None], evecs]).to(sym.device)
        dist.broadcast(packed, src=self.root, group=self.group)
        return packed[0], packed[1:]

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.op.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)


def _project_out(v, against, c: _Collective):
    for basis in against:
        if basis is not None and basis.shape[1]:
            v = v - basis @ c.gram(basis, v)
    return v


def _orthonormalize(v: Tensor, against: list, c: _Collective, rank_tol: float = 1e-10) -> Tensor:
    """``eigsh._orthonormalize`` with all-reduced inner products (same steps, same tolerances)."""
    for _ in range(2):
        v = _project_out(v, against, c)
    if v.shape[1] == 0:
        return v
    norms = c.col_norms(v)
    keep = norms > rank_tol * max(float(norms.max()), 1e-300)
    v = v[:, keep] / norms[keep]
    if v.shape[1] == 0:
        return v
    for _ in range(2):
        evals, evecs = c.eigh(c.gram(v, v))
        keep = evals > rank_tol * float(evals.max())
        v = v @ (evecs[:, keep] / evals[keep].sqrt())
        v = _project_out(v, against, c)
    return v


def _rayleigh_ritz(basis, image, width, c: _Collective):
    projected = c.gram(basis, image)
    projected = 0.5 * (projected + projected.T)
    evals, evecs = c.eigh(projected)
    order = torch.argsort(evals, descending=True)[:width]
    return evals[order], evecs[:, order].to(basis.device)


class _Applier:
    def __init__(self, op, deflate, c: _Collective):
        self.op, self.deflate, self.c = op, deflate, c
        self.calls = self.columns = 0

    def __call__(self, x64):
        y = self.op.matmul(x64.to(self.op.dtype))
        self.calls += 1
        self.columns += x64.shape[1]
        if self.c.any(not bool(torch.isfinite(y).all())):  # collective: every rank raises together
            raise ValueError("the sharded operator returned NaN or Inf on some rank (an unnormalised "
                             "exp(τ·q·k) overflows in fp32: use normalize='sym' or 'row')")
        y = y.to(torch.float64)
        if self.deflate is not None:
            y = y - self.deflate @ self.c.gram(self.deflate, y)
        return y


def _fix_signs(vecs: Tensor, c: _Collective, layout) -> Tensor:
    """Largest-magnitude entry of each (global) eigenvector made positive, as ``eigsh`` does."""
    k = vecs.shape[1]
    pivot = vecs.abs().argmax(dim=0)
    local = vecs[pivot, torch.arange(k, device=vecs.device)]
    gathered = [torch.empty_like(local) for _ in range(layout.world_size)]
    dist.all_gather(gathered, local.contiguous(), group=layout.group)
    table = torch.stack(gathered)                     # (P, k): each rank's largest entry
    owner = table.abs().argmax(dim=0)                 # first rank on ties = lowest global index
    signs = torch.sign(table[owner, torch.arange(k, device=vecs.device)])
    signs[signs == 0] = 1
    return vecs * signs


def distributed_eigsh(op: ShardedOperator, k: int, *, tol: float = 1e-6, max_iter: int | None = None,
                      x0: Tensor | None = None, block_size: int | None = None, exclude_trivial: bool = False,
                      seed: int = 0, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10,
                      resume: bool = False, return_info: bool = False):
    """Top-k eigenpairs of a symmetric sharded operator; every rank gets its rows of the vectors.

    Collective: call on every rank with the same arguments (x0 holds this rank's rows).

    Args:
        op: a ``ShardedOperator`` (e.g. ``ShardedKQAffinity(..., normalize="sym")``).
        k, tol, max_iter, block_size, exclude_trivial: as ``spectral_kernels.eigsh``.
        x0: (n_local,) or (n_local, j) warm start, this rank's rows.
        seed: seeds the random start block (rank r draws its rows from seed and r).
        checkpoint: path prefix for per-rank checkpoints (see module docstring).
        checkpoint_every: iterations between checkpoints.
        resume: continue from the newest iteration every rank has saved (fresh start when
            no rank has a checkpoint).
        return_info: also return an ``EigshInfo``.

    Returns:
        (eigenvalues (k,) replicated on every rank, eigenvectors (n_local, k) this rank's
        rows), eigenvalues descending, each eigenvector's largest entry positive.
    """
    if not isinstance(op, ShardedOperator):
        raise TypeError(f"op must be a ShardedOperator (ShardedKQAffinity, ShardedVVAffinity), got {type(op).__name__}; "
                        f"use spectral_kernels.eigsh for single-process operators")
    if not op.is_symmetric:
        raise ValueError(f"distributed_eigsh needs a symmetric operator, got {op!r}; use normalize='sym'")
    if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    max_iter = 1000 if max_iter is None else max_iter
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path prefix")
    layout, device, n_rows = op.layout, op.device, op.shape[0]
    c = _Collective(op)

    deflate = None
    if exclude_trivial:
        u = op.trivial_eigenvector()
        if u is None:
            raise ValueError(f"exclude_trivial=True needs an operator with a known trivial eigenvector "
                             f"(single-head normalize='sym'); {op!r} has none")
        deflate = u.to(torch.float64).reshape(-1, 1)
        deflate = deflate / c.col_norms(deflate)
    _check_k(k, n_rows, 0 if deflate is None else 1)
    available = n_rows - (0 if deflate is None else 1)
    width = block_size if block_size is not None else k + max(8, k // 2)
    if not isinstance(width, int) or width < k:
        raise ValueError(f"block_size must be an int ≥ k = {k}, got {block_size!r}")
    width = min(width, available)
    x0_cols = 0 if x0 is None else (1 if x0.dim() == 1 else x0.shape[1])
    agree("distributed_eigsh", op.n_local, {"k": k, "block size": width, "x0 columns": x0_cols,
                                            "tol": float(tol), "max_iter": max_iter, "resume": bool(resume)},
          device=device, group=layout.group)

    apply = _Applier(op, deflate, c)
    settings = {"version": CHECKPOINT_VERSION, "k": k, "width": width, "shape": list(op.shape)}
    state = load_common(checkpoint, layout, device, settings) if resume else None
    if state is not None:
        X, AX, P, AP = state["X"], state["AX"], state["P"], state["AP"]
        evals, history, start = state["evals"], list(state["history"]), int(state["iteration"]) + 1
        apply.calls, apply.columns = state["calls"], state["columns"]
    else:
        X = _initial_block(x0, op, width, deflate, seed, c)
        AX = apply(X)
        gram = c.gram(X, AX)
        asym = float((gram - gram.T).abs().max()) / max(float(gram.abs().max()), torch.finfo(torch.float64).tiny)
        if asym > SYMMETRY_RTOL:
            raise ValueError(f"the operator is not symmetric: ⟨x, Ay⟩ and ⟨Ax, y⟩ differ by {asym:.2e} (relative)")
        evals, coeffs = _rayleigh_ritz(X, AX, width, c)
        X, AX = X @ coeffs, AX @ coeffs
        P = AP = None
        history, start = [], 1

    converged = False
    residuals = None
    n_iter = start - 1
    for n_iter in range(start, max_iter + 1):
        R = AX - X * evals.to(device)
        scale = max(float(evals.abs().max()), torch.finfo(torch.float64).tiny)
        rel = (c.col_norms(R) / scale).cpu()
        residuals = rel[:k]
        history.append(residuals.clone())
        if bool((residuals <= tol).all()):
            converged = True
            break
        active = (rel > tol).to(device)
        W = _orthonormalize(R[:, active], [deflate, X, P], c)
        if W.shape[1] == 0:
            converged = bool((residuals <= max(tol, 1e-12)).all())
            break
        AW = apply(W)
        basis = torch.cat([X, W] + ([P] if P is not None else []), dim=1)
        image = torch.cat([AX, AW] + ([AP] if AP is not None else []), dim=1)
        evals, coeffs = _rayleigh_ritz(basis, image, width, c)
        X, AX = basis @ coeffs, image @ coeffs
        # new search directions: orthonormal within the (replicated) coefficient space, no collective
        dirs = coeffs.clone()
        dirs[:width] = 0
        dirs = _orthonormalize_small(dirs, coeffs)
        P, AP = basis @ dirs, image @ dirs
        if checkpoint is not None and n_iter % checkpoint_every == 0:
            save_slot(checkpoint, layout, n_iter, checkpoint_every, dict(
                settings, X=X, AX=AX, P=P, AP=AP, evals=evals, history=history, calls=apply.calls,
                columns=apply.columns))
    if residuals is None:  # resumed from a checkpoint at or past max_iter
        residuals = history[-1] if history else torch.full((k,), math.inf)
    if not converged:
        warnings.warn(f"distributed_eigsh did not converge in {n_iter} iterations: largest relative residual "
                      f"{float(residuals.max()):.2e} > tol = {tol:g}", RuntimeWarning, stacklevel=2)
    vecs = _fix_signs(X[:, :k], c, layout).to(op.dtype)
    vals = evals[:k].to(device=device, dtype=op.dtype)
    if return_info:
        info = EigshInfo(converged=converged, n_iter=n_iter, n_calls=apply.calls, n_columns=apply.columns,
                         residuals=residuals, history=history)
        return vals, vecs, info
    return vals, vecs


def _orthonormalize_small(v: Tensor, against: Tensor) -> Tensor:
    """Replicated (coefficient-space) vectors: plain local algebra is the same on every rank."""
    from ..eigsh import _orthonormalize as local_orthonormalize
    return local_orthonormalize(v, [against])


def _initial_block(x0, op, width, deflate, seed, c):
    n_local, device = op.n_local, op.device
    if x0 is None:
        start = torch.empty(n_local, 0, dtype=torch.float64, device=device)
    else:
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if x0.dim() > 2 or x0.shape[0] != n_local:
            raise ValueError(f"x0 must be (n_local,) or (n_local, j) with n_local = {n_local} (this rank's rows), "
                             f"got shape {tuple(x0.shape)}")
        start = (x0.unsqueeze(1) if x0.dim() == 1 else x0).to(device=device, dtype=torch.float64)
        if start.shape[1] > width:
            raise ValueError(f"x0 has {start.shape[1]} columns, more than the block size {width}")
    fill = width - start.shape[1]
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + op.layout.rank)
    rand = torch.randn(n_local, fill + 2, dtype=torch.float64, generator=generator).to(device)
    block = _orthonormalize(torch.cat([start, rand], dim=1), [deflate], c)
    return block[:, :width]
