"""Gradient descent on the paper's objective over sharded graphs (dataset scale).

Every rank holds its rows of the logits θ (n_local × K, standard-normal start like the
official per-image logit tables) and of the graphs; X = softmax(θ) over the K channels
(or θ itself with ``softmax=False``), X̂ = X with unit-norm columns (global norms), and

    loss = w_eig · Σ_t w_t mean_k | x̂_kᵀ G_t x̂_k − 1 | / Σ_t w_t  +  w_orth · mean_{k≠k'} (X̂ᵀX̂)²_kk'

for the graphs G_t (sharded operators with weights w_t: a layer/head/timestep mix).
With random-walk graphs (normalize="row") this is the official objective (symmetric=0,
target 1); with NCut graphs (normalize="sym") and ``softmax=False`` its minimiser is the
top-K eigen-subspace of Σ_t w_t G_t (the "subspace" variant of ``solver.py``).

Gradients cross ranks in two places only, both exact:
    G_t x (a ring product) — its backward is the transposed ring product (collective);
    every XᵀY (``gram``: local product + all-reduce) — its backward is local, because the
    loss is a function of replicated k×k matrices only, identical on every rank. (A
    replicated quantity reused row by row — e.g. x̂ = x/‖x‖ formed on each rank's rows —
    would collect only the local rows' part of its gradient; so the loss is written as
    x_kᵀ G x_k / ‖x_k‖² and XᵀX / (‖x_k‖‖x_k'‖) instead.)
So each rank's θ gradient is the gradient of the one global loss with respect to its rows.
Checkpoints: per rank (θ, Adam state, step), two alternating slots, resumed consistently.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoints import load_common, save_slot
from .operators import ShardedOperator
from .shards import agree

__all__ = ["sharded_matmul", "global_gram", "sharded_objective", "sharded_fit", "ShardedFitResult"]

CHECKPOINT_VERSION = 1


class _ShardedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        ctx.op, ctx.dtype = op, x.dtype
        return op.matmul(x.detach()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return ctx.op.adjoint_matmul(grad.contiguous()).to(ctx.dtype), None


class _GlobalGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group):
        ctx.save_for_backward(a, b)
        out = a.T @ b
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # every rank holds the same loss of the replicated result: the local rows' gradient is local
        a, b = ctx.saved_tensors
        return b @ grad.T, a @ grad, None


def sharded_matmul(op: ShardedOperator, x_local: Tensor) -> Tensor:
    """op·x for this rank's rows, differentiable w.r.t. x (backward = transposed ring product)."""
    return _ShardedProduct.apply(x_local, op)


def global_gram(a_local: Tensor, b_local: Tensor, group=None) -> Tensor:
    """The global AᵀB of row-sharded A, B (replicated), differentiable w.r.t. both.

    The backward is local, which is exact when the result only feeds a loss computed the
    same way on every rank; do not combine it with rank-local rows in the forward pass.
    """
    return _GlobalGram.apply(a_local, b_local, group)


def _as_terms(graphs):
    if isinstance(graphs, ShardedOperator):
        return [(1.0, graphs)]
    terms = []
    for item in graphs:
        weight, op = item if isinstance(item, tuple) else (1.0, item)
        if not isinstance(op, ShardedOperator):
            raise TypeError(f"graphs must be ShardedOperators or (weight, ShardedOperator) pairs, got {type(op).__name__}")
        terms.append((float(weight), op))
    if not terms:
        raise ValueError("graphs is empty")
    if len({op.shape for _, op in terms}) > 1 or len({op.layout.counts for _, op in terms}) > 1:
        raise ValueError("all graphs must have the same shape and row shards")
    return terms


def sharded_objective(graphs, x_local: Tensor, *, w_eig: float = 2.0, w_orth: float = 2.0) -> Tensor:
    """The loss of the module docstring for this rank's rows of X (replicated scalar)."""
    terms = _as_terms(graphs)
    group = terms[0][1].group
    k = x_local.shape[1]
    # Written with replicated k×k matrices only (x̂ = x/‖x‖ never formed row by row): the gram
    # backward is then exactly local (see module docstring).
    gram = global_gram(x_local, x_local, group)
    norm2 = torch.diagonal(gram).clamp_min(1e-24)
    inv = norm2.rsqrt()
    # e_tk = x̂_kᵀ G_t x̂_k = x_kᵀ G_t x_k / ‖x_k‖²; the mean over graphs is weighted by w_t
    eig = torch.stack([torch.diagonal(global_gram(x_local, sharded_matmul(op, x_local), group)) / norm2
                       for _, op in terms])
    weights = torch.tensor([w for w, _ in terms], dtype=eig.dtype, device=eig.device)
    eig_term = (weights[:, None] * (eig - 1.0).abs()).mean(dim=1).sum() / weights.sum()
    cosines = gram * inv[:, None] * inv[None, :]
    off = cosines[~torch.eye(k, dtype=torch.bool, device=gram.device)]
    return w_eig * eig_term + w_orth * off.pow(2).mean()


@dataclass
class ShardedFitResult:
    features: Tensor            # (n_local, K) this rank's rows of X
    history: list = field(default_factory=list)   # loss per step (replicated)
    steps: int = 0


def sharded_fit(graphs, n_eig: int, *, steps: int = 2000, lr: float = 1e-2, w_eig: float = 2.0, w_orth: float = 2.0,
                softmax: bool = True, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                checkpoint_every: int = 100, resume: bool = False) -> ShardedFitResult:
    """Adam on per-token logits over sharded graphs; collective (same arguments on every rank).

    Args:
        graphs: a ShardedOperator, or a list of them / of (weight, ShardedOperator) pairs.
        n_eig: K channels. steps, lr: Adam steps and learning rate (official dataset mode: 1e-2).
        w_eig, w_orth: loss weights (official: 2, 2). softmax: X = softmax(θ) (official) or θ.
        seed: rank r draws its logits from (seed, r).
        checkpoint, checkpoint_every, resume: per-rank checkpoints (two alternating slots).

    Returns a ShardedFitResult with this rank's rows of X and the loss history.
    """
    terms = _as_terms(graphs)
    op = terms[0][1]
    layout, device = op.layout, op.device
    if isinstance(n_eig, bool) or not isinstance(n_eig, int) or n_eig < 2:
        raise ValueError(f"n_eig must be an int ≥ 2, got {n_eig!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path prefix")
    agree("sharded_fit", layout.n_local, {"n_eig": n_eig, "steps": steps, "lr": float(lr), "softmax": softmax,
                                          "graphs": len(terms)}, device=device, group=layout.group)
    generator = torch.Generator().manual_seed(int(seed) * 100_003 + layout.rank)
    theta = torch.randn(layout.n_local, n_eig, generator=generator, dtype=op.dtype).to(device).requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=lr)
    settings = {"version": CHECKPOINT_VERSION, "n_eig": n_eig, "shape": list(op.shape), "softmax": softmax}
    history, start = [], 0
    state = load_common(checkpoint, layout, device, settings) if resume else None
    if state is not None:
        with torch.no_grad():
            theta.copy_(state["theta"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["iteration"])
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        x = theta.softmax(dim=1) if softmax else theta
        loss = sharded_objective(terms, x, w_eig=w_eig, w_orth=w_orth)
        if not bool(torch.isfinite(loss)):  # replicated: every rank stops together
            raise FloatingPointError(f"sharded_fit: the loss became {float(loss)} at step {step}")
        loss.backward()
        optimizer.step()
        history.append(float(loss))
        done = step + 1
        if checkpoint is not None and done % checkpoint_every == 0:
            save_slot(checkpoint, layout, done, checkpoint_every,
                      dict(settings, theta=theta.detach(), optimizer=optimizer.state_dict(), history=history))
    with torch.no_grad():
        x = theta.softmax(dim=1) if softmax else theta
    return ShardedFitResult(features=x.detach(), history=history, steps=len(history))
