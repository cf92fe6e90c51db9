"""Top-k eigenpairs of a sharded operator: ``spectral_kernels.eigsh``'s block LOBPCG on row
shards, plus per-rank checkpoints that resume.

There is one LOBPCG (``spectral_kernels/eigsh.py``); it takes every reduction over rows from
the operator's row algebra (``ShardedOperator.row_algebra()``: Grams and norms all-reduced,
small eigensolves broadcast from rank 0), so all small matrices — and therefore every
decision (converged, active columns, kept directions) — are the same on every rank. This
module adds what a multi-process run needs around it: a cross-rank agreement check of the
arguments, a random start seeded per rank, and checkpoints.

Checkpoints (``checkpoint=PREFIX``, see ``checkpoints.py``): each rank writes its rows of the
LOBPCG state (X, AX, P, AP and the Ritz values) to ``PREFIX.rank{r}-of-{P}.slot{0,1}.pt``,
atomically, alternating two slots; ``resume=True`` continues from the newest iteration
that every rank has on disk, bit for bit as if never stopped.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from ..eigsh import LobpcgState, _initial_block, _setup, _solve
from .checkpoints import load_common, save_slot
from .operators import ShardedOperator
from .shards import agree

__all__ = ["distributed_eigsh"]

CHECKPOINT_VERSION = 1


def distributed_eigsh(op: ShardedOperator, k: int, *, tol: float = 1e-6, max_iter: int | None = None,
                      x0: Tensor | None = None, block_size: int | None = None, exclude_trivial: bool = False,
                      seed: int = 0, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10,
                      resume: bool = False, return_info: bool = False):
    """Top-k eigenpairs of a symmetric sharded operator; every rank gets its rows of the vectors.

    Collective: call on every rank with the same arguments (x0 holds this rank's rows).

    Args:
        op: a ``ShardedOperator`` (e.g. ``ShardedKQAffinity(..., normalize="sym")``).
        k, tol, max_iter, block_size, exclude_trivial: as ``spectral_kernels.eigsh`` (including
            its stop, with a RuntimeWarning, when the residuals stall at the products' noise floor).
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
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path prefix")
    problem = _setup(op, op.row_algebra(), k, tol=tol, max_iter=max_iter, block_size=block_size,
                     exclude_trivial=exclude_trivial, name="distributed_eigsh")
    layout, width = op.layout, problem.width
    x0_cols = 0 if x0 is None else (1 if x0.dim() == 1 else x0.shape[1])
    agree("distributed_eigsh", op.n_local, {"k": k, "block size": width, "x0 columns": x0_cols,
                                            "tol": float(tol), "max_iter": problem.max_iter, "resume": bool(resume)},
          device=op.device, group=layout.group)

    settings = {"version": CHECKPOINT_VERSION, "k": k, "width": width, "shape": list(op.shape)}
    start = None
    if resume:
        saved = load_common(checkpoint, layout, op.device, settings)
        if saved is not None:
            start = LobpcgState(**{f.name: saved[f.name] for f in dataclasses.fields(LobpcgState)})
    if start is None:
        generator = torch.Generator().manual_seed(int(seed) * 100_003 + layout.rank)
        start = _initial_block(problem, x0, generator)

    def save(state: LobpcgState) -> None:
        if state.iteration % checkpoint_every == 0:
            fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(LobpcgState) if f.name != "iteration"}
            save_slot(checkpoint, layout, state.iteration, checkpoint_every, dict(settings, **fields))

    return _solve(problem, start, callback=None if checkpoint is None else save, return_info=return_info)
