"""Gradient descent on the paper's objective over many attention layers (the official solver).

    θ → logits (B, K, h0, w0) → X = softmax over K → per layer l: Z_l = pool(X → grid_l)
    loss = w_eig · mean |eigval − target| + w_orth · mean ortho²      (official concatenation)

Variants (``variant``):
    "random_walk"  official symmetric=0: eigval = z_kᵀ P z_k, P the softmax attention, target 1.
    "symmetric"    official symmetric=1: D^-½(D−W)D^-½ with z ∝ D^½x, target 0 (its
                   cross-head terms included, as in the official code).
    "subspace"     exact alternative: X̂ column-normalised once on the base grid, loss
                   w_eig·mean_{l,h,k}(1 − x̂_kᵀ G_lᵀ M_lh G_l x̂_k) + w_orth·mean off-diag(X̂ᵀX̂)²
                   with M = D^-½ W D^-½. Without the softmax (``softmax=False``) its minimiser is
                   the top-K eigen-subspace of Σ_lh G_lᵀ M_lh G_l — the operator an eigensolver
                   solves; the official variants have no such closed form over several
                   layers (each head weights x by its own D^½ and layers normalise after pooling).

Layers of one resolution are stacked into one primitive call (``layer_groups``), and the
per-token vectors that depend only on q, k (row LSE, NCut offsets) are computed once per set
of captures. Passes over the score tiles per step and group, values and gradient together:
"random_walk" one (``affinity_symmetric_matmul`` with the row LSE: ½(P + Pᵀ)·z), "subspace"
one (M is symmetric, its gradient 2·M z is the forward product), "symmetric" two (its
cross-head terms are not a quadratic form: backward needs M applied to other vectors). The
official training loop differs in two small ways, kept on purpose: it never divides the
accumulated gradient (Adam is invariant to that scale) and takes its first step after
accumulate + 1 backward passes; here a step follows every ``accumulate`` passes.

``cuda_graph=True`` (CUDA, a fixed list of captures, accumulate = 1) captures one whole
step after three eager ones and replays it (``graphed_step``): at single-image sizes the
step is launch-bound, and a replay costs one launch instead of the Python and the few
dozen kernel launches of a step.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from ._validation import finite_checks
from .graphed_step import GraphedStep
from .layer_groups import GRAPHS, LayerGroup, group_layers
from .models.capture import LayerCapture
from .objective import eigen_terms, ncut_quadratic_form, normalize_columns, off_diagonal
from .ops import affinity_symmetric_matmul
from .parameterizations import PARAMETERIZATIONS, make_parameterization
from .pooling import EXTRA_TOKEN_MODES

__all__ = ["SolverConfig", "SolverResult", "SpectralSolver", "VARIANTS"]

VARIANTS = ("random_walk", "symmetric", "subspace")
OPTIMIZERS = ("adam", "adamw")
INITS = ("random", "eigsh")
CHECKPOINT_VERSION = 1
QK_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}


@dataclass
class SolverConfig:
    """Every setting of a run; saved in checkpoints (a resumed run must use the same)."""
    n_eig: int = 20
    steps: int = 2000
    variant: str = "random_walk"
    graph: str = "kq"
    vv_temperature: float = 0.1
    parameterization: str = "pixel"
    softmax: bool = True
    hidden: int = 128
    n_images: int | None = None
    base_grid: tuple[int, int] | None = None
    extra_tokens: str = "drop"
    optimizer: str = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    w_eig: float = 2.0
    w_orth: float = 2.0
    accumulate: int = 1
    ema: float | None = None
    buffer_size: int = 0
    buffer_prob: float = 0.0
    init: str = "random"
    seed: int | None = 0
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    checkpoint_every_s: float | None = None
    progress: bool = True
    progress_every: int = 10
    backend: str = "auto"
    qk_dtype: str | None = None
    cuda_graph: bool = False

    def validate(self) -> "SolverConfig":
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        if not isinstance(self.n_eig, int) or self.n_eig < 2:
            raise ValueError(f"n_eig must be an integer ≥ 2 (K ≥ 2), got {self.n_eig!r}")
        for name in ("steps", "accumulate", "progress_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} "
                                 f"integer, got {value!r}")
        choice("variant", VARIANTS)
        choice("graph", GRAPHS)
        choice("parameterization", PARAMETERIZATIONS)
        choice("extra_tokens", EXTRA_TOKEN_MODES)
        choice("optimizer", OPTIMIZERS)
        choice("init", INITS)
        for name in ("lr", "vv_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("w_eig", "w_orth", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.qk_dtype not in QK_DTYPES:
            raise ValueError(f"qk_dtype must be one of {tuple(QK_DTYPES)}, got {self.qk_dtype!r}")
        if self.cuda_graph and (self.accumulate != 1 or self.parameterization == "table"):
            raise ValueError("cuda_graph=True replays one whole optimiser step: it needs accumulate=1 and a "
                             "fixed image index (parameterization 'pixel' or 'conv'), got "
                             f"accumulate={self.accumulate}, parameterization={self.parameterization!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be in (0, 1) or None, got {self.ema!r}")
        if not 0.0 <= self.buffer_prob <= 1.0:
            raise ValueError(f"buffer_prob must be in [0, 1], got {self.buffer_prob!r}")
        if self.buffer_size < 0 or (self.buffer_prob > 0 and self.buffer_size < 1):
            raise ValueError(f"buffer_size must be ≥ 1 when buffer_prob > 0, got {self.buffer_size!r}")
        if (self.checkpoint_every or self.checkpoint_every_s) and not self.checkpoint_path:
            raise ValueError("checkpoint_every/checkpoint_every_s need checkpoint_path")
        if self.checkpoint_every is not None and self.checkpoint_every % self.accumulate:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of accumulate "
                             f"({self.accumulate}): checkpoints are taken between optimiser steps")
        return self


@dataclass
class SolverResult:
    """Output of ``SpectralSolver.fit``.

    eigenvectors: (h0, w0, K) for one image, (B, h0, w0, K) otherwise — the SVD-orthogonalised,
        column-normalised features (U·S, component 0 the trivial one), as in the official code.
    singular_values: (K,) or (B, K).
    features: X before orthogonalisation, same layout as ``eigenvectors``.
    eigenvalues: layer name → (B, H, K) Rayleigh quotients of the orthogonalised components
        under the variant's per-head operator (P; L = I − M for "symmetric"; M for "subspace").
    loss_history: one float per step.
    """
    eigenvectors: Tensor
    singular_values: Tensor
    features: Tensor
    eigenvalues: dict[str, Tensor]
    loss_history: list[float]
    steps: int


@dataclass
class _Batch:
    groups: list[LayerGroup]
    image_index: Tensor | None = None


class SpectralSolver:
    """Gradient-descent solver for the official objective; see the module docstring.

    ``SpectralSolver(n_eig=20, steps=2000, variant="random_walk", ...)`` takes the fields of
    ``SolverConfig`` as keywords. ``fit(source)`` runs it, where ``source`` is a list of
    ``LayerCapture`` (fixed affinities) or a callable ``source(step)`` returning fresh
    captures (or ``(captures, image_index)`` for per-image tables), e.g. a new diffusion
    timestep each step; with ``buffer_prob`` > 0 a step reuses, with that probability, one
    of the last ``buffer_size`` fresh sets (the official attention buffer).
    """

    def __init__(self, config: SolverConfig | None = None, **overrides):
        config = copy.deepcopy(config) if config is not None else SolverConfig()
        for name, value in overrides.items():
            if not hasattr(config, name):
                raise TypeError(f"SpectralSolver got an unknown setting {name!r}")
            setattr(config, name, value)
        if config.base_grid is not None:
            config.base_grid = tuple(config.base_grid)
        self.config = config.validate()

    # ------------------------------------------------------------------ affinities
    def _prepare(self, captures, image_index=None) -> _Batch:
        cfg = self.config
        groups = group_layers(captures, base_grid=self._base_grid, graph=cfg.graph, temperature=cfg.vv_temperature,
                              extra_tokens=cfg.extra_tokens, with_offsets=cfg.variant != "random_walk",
                              with_row_lse=cfg.variant == "random_walk",
                              qk_dtype=QK_DTYPES[cfg.qk_dtype], backend=cfg.backend)
        if image_index is not None:
            image_index = torch.as_tensor(image_index, dtype=torch.long).reshape(-1)
        return _Batch(groups, image_index)

    def _next_batch(self, source, step: int) -> _Batch:
        if self._static is not None:
            return self._static
        cfg = self.config
        full = len(self._buffer) == cfg.buffer_size and cfg.buffer_size > 0
        if cfg.buffer_prob > 0:
            draw = float(torch.rand((), generator=self._generator))
            if full and draw < cfg.buffer_prob:
                pick = int(torch.randint(len(self._buffer), (), generator=self._generator))
                return self._buffer[pick]
        if self._first_fresh is not None:
            out, self._first_fresh = self._first_fresh, None
        else:
            out = source(step)
        batch = self._prepare(*out) if isinstance(out, tuple) else self._prepare(out)
        if cfg.buffer_prob > 0:
            if full:
                self._buffer.pop(0)
            self._buffer.append(batch)
        return batch

    # ------------------------------------------------------------------ objective
    def _rows(self, logits: Tensor) -> Tensor:
        x = logits.softmax(dim=1) if self.config.softmax else logits
        return x.flatten(2).transpose(1, 2)                       # (B, h0·w0, K)

    def _loss(self, rows: Tensor, batch: _Batch) -> Tensor:
        cfg = self.config
        eig_sum = rows.new_zeros(())
        ortho_sum = rows.new_zeros(())
        eig_count = ortho_count = 0
        if cfg.variant == "subspace":
            rows = normalize_columns(rows)
            ortho = off_diagonal(rows.transpose(-1, -2) @ rows)
            ortho_sum, ortho_count = ortho.pow(2).sum(), ortho.numel()
        for group in batch.groups:
            x = group.pooling.pool(rows)[None]                    # (1, B, N, K): shared by layers
            if cfg.variant == "subspace":
                heads = group.q.shape[2]
                weights = torch.full((heads,), 1.0 / heads, device=rows.device)
                # head-mean quotient (L, B, K); its gradient reuses the forward product
                eig = ncut_quadratic_form(group.q, group.k, x, offset=group.offsets, head_weights=weights,
                                          scale=group.scale, backend=cfg.backend)
                eig_sum = eig_sum + heads * (1.0 - eig).sum()
                eig_count += heads * eig.numel()
                continue
            symmetric = int(cfg.variant == "symmetric")
            eig, ortho = eigen_terms(group.q, group.k, x, symmetric=symmetric, scale=group.scale,
                                     offsets=group.offsets, row_lse=group.row_lse, backend=cfg.backend)
            eig_sum = eig_sum + (eig - (1 - symmetric)).abs().sum()
            eig_count += eig.numel()
            # The official loop concatenates one copy of ortho per layer: the random-walk
            # Z is the same for all layers of a group, so it counts n_layers times.
            copies = group.n_layers if symmetric == 0 else 1
            ortho_sum = ortho_sum + copies * ortho.pow(2).sum()
            ortho_count += copies * ortho.numel()
        return cfg.w_eig * eig_sum / eig_count + cfg.w_orth * ortho_sum / ortho_count

    # ------------------------------------------------------------------ setup
    def _base_grid_of(self, batch_captures) -> tuple[int, int]:
        if self.config.base_grid is not None:
            return self.config.base_grid
        return max((tuple(c.grid) for c in batch_captures), key=lambda g: g[0] * g[1])

    def _build(self, first_captures, device, n_batch):
        cfg = self.config
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(7), "little")
        self._generator = torch.Generator().manual_seed(seed)
        module = make_parameterization(cfg.parameterization, cfg.n_eig, self._base_grid, batch=n_batch,
                                       n_images=cfg.n_images, hidden=cfg.hidden, generator=self._generator)
        self.module = module.to(device)
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        # fused: one kernel for the whole update on a GPU instead of a few per parameter;
        # capturable: its step counter lives on the GPU, so a CUDA graph can replay it
        fused = {"fused": True, "capturable": cfg.cuda_graph} if device.type == "cuda" else {}
        self.optimizer = opt_cls(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.ema_module = None
        if cfg.ema is not None:
            self.ema_module = copy.deepcopy(self.module).requires_grad_(False)

    @torch.no_grad()
    def _update_ema(self):
        m = self.config.ema
        for ema_p, p in zip(self.ema_module.parameters(), self.module.parameters()):
            ema_p.mul_(m).add_(p.detach(), alpha=1.0 - m)
        for ema_b, b in zip(self.ema_module.buffers(), self.module.buffers()):
            ema_b.copy_(b)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, step: int, history: list[float]) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.config),
            "step": step,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema_module is None else self.ema_module.state_dict(),
            "rng": ckpt.capture_rng_states(self._generator),
            "buffer": self._buffer,
            "history": list(history),
        }

    def _restore(self, state: dict) -> tuple[int, list[float]]:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        saved = dict(state["config"])
        current = asdict(self.config)
        ignored = {"steps", "checkpoint_path", "checkpoint_every", "checkpoint_every_s", "progress",
                   "progress_every", "backend", "cuda_graph"}
        diff = {k: (saved.get(k), v) for k, v in current.items()
                if k not in ignored and saved.get(k) != v and not (k == "base_grid" and saved.get(k) is None)}
        if diff:
            raise ValueError(f"checkpoint {self.config.checkpoint_path} was written with other settings: "
                             + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema_module is not None:
            self.ema_module.load_state_dict(state["ema"])
        ckpt.restore_rng_states(state["rng"], self._generator)
        self._buffer = list(state["buffer"])
        return int(state["step"]), list(state["history"])

    # ------------------------------------------------------------------ run
    def fit(self, source: list[LayerCapture] | Callable, *, image_index=None, resume: bool = False) -> SolverResult:
        """Run the optimisation (or continue it from ``checkpoint_path`` with ``resume=True``)."""
        cfg = self.config
        path = cfg.checkpoint_path
        if resume and path is None:
            raise ValueError("resume=True needs checkpoint_path")
        resuming = resume and os.path.exists(path)
        if cfg.seed is not None and not resuming:
            torch.manual_seed(cfg.seed)  # fresh captures drawn with the global RNG are reproducible too
        static = not callable(source)
        self._buffer: list[_Batch] = []
        self._static = None
        self._first_fresh = None

        # The first set of captures fixes base grid, batch and device; a fresh run uses the
        # callable's first answer as step 0's captures (a resumed run restores the RNG anyway).
        if static:
            probe, probe_index = list(source), image_index
        else:
            out = source(0)
            probe, probe_index = out if isinstance(out, tuple) else (out, image_index)
            if not resuming:
                self._first_fresh = (probe, probe_index)
        if not probe or not all(isinstance(c, LayerCapture) for c in probe):
            raise TypeError("source must be a non-empty list of LayerCapture or a callable returning one")
        self._base_grid = self._base_grid_of(probe)
        device = probe[0].q.device
        n_batch = probe[0].q.shape[0]
        if cfg.parameterization == "table" and probe_index is None:
            raise ValueError('parameterization "table" needs image_index (per batch image, into the table)')
        if probe_index is not None and len(torch.as_tensor(probe_index).reshape(-1)) != n_batch:
            raise ValueError(f"image_index has {len(torch.as_tensor(probe_index).reshape(-1))} entries but the "
                             f"captures hold {n_batch} images")
        if cfg.cuda_graph and (device.type != "cuda" or not static):
            raise ValueError("cuda_graph=True needs CUDA captures and a fixed list of them (the graph replays one "
                             f"set of affinities), got {device.type} tensors from a "
                             f"{'list' if static else 'callable source'}")
        self._build(probe, device, n_batch)
        if static:
            self._static = self._prepare(probe, image_index)

        start, history = 0, []
        if resuming:
            start, history = self._restore(ckpt.load(path, device=device))
        if start == 0 and cfg.init == "eigsh":
            self._init_from_eigsh(probe, probe_index)

        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress,
                   desc="spectral solver", dynamic_ncols=True)
        pending: list[Tensor] = []
        self.optimizer.zero_grad(set_to_none=True)
        try:
            # Inputs were scanned once when their group was built and the loss is checked every
            # progress_every steps: skip the per-call scans (each a host sync on a GPU).
            with finite_checks(False):
                history = self._loop(source, bar, start, history, pending, path)
        finally:
            bar.close()
        if pending:
            history.extend(float(v) for v in torch.stack(pending).cpu())
        bad = [i for i, v in enumerate(history) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"the loss became {history[bad[0]]} at step {bad[0] + 1}")
        if path and (cfg.checkpoint_every or cfg.checkpoint_every_s) and cfg.steps % cfg.accumulate == 0:
            ckpt.save_atomic(self._state(cfg.steps, history), path)
        return self._result(history)

    def _forward_backward(self, batch: _Batch) -> Tensor:
        logits = self.module(batch.image_index)
        loss = self._loss(self._rows(logits), batch)
        (loss / self.config.accumulate).backward()
        return loss

    def _graphed_step(self) -> GraphedStep:
        """Forward, backward and update of the fixed captures, replayed as one CUDA graph."""
        def step():
            loss = self._forward_backward(self._static)
            self.optimizer.step()
            return loss
        return GraphedStep(step, self.optimizer)

    def _loop(self, source, bar, start, history, pending, path):
        cfg = self.config
        last_save = time.monotonic()
        graphed = self._graphed_step() if cfg.cuda_graph else None
        for step in bar:
            done = step + 1
            if graphed is not None:
                loss = graphed()
                pending.append(loss.detach().clone())  # the graph's output is rewritten next step
                stepped = True
            else:
                loss = self._forward_backward(self._next_batch(source, step))
                pending.append(loss.detach())
                stepped = done % cfg.accumulate == 0
                if stepped:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            if stepped:
                if self.ema_module is not None:
                    self._update_ema()
                due = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or \
                      (cfg.checkpoint_every_s and time.monotonic() - last_save >= cfg.checkpoint_every_s)
                if due:
                    history.extend(float(v) for v in torch.stack(pending).cpu())
                    pending.clear()
                    ckpt.save_atomic(self._state(done, history), path)
                    last_save = time.monotonic()
            if done % cfg.progress_every == 0 or done == cfg.steps:
                value = float(loss.detach())  # one host sync per progress_every steps
                if value != value or abs(value) == float("inf"):
                    raise FloatingPointError(f"the loss became {value} at step {done}")
                bar.set_postfix(step=done, loss=f"{value:.5f}")
        return history

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def _result(self, history) -> SolverResult:
        module = self.ema_module if self.ema_module is not None else self.module
        # Train mode, as the official code reads its final features (batch-norm batch
        # statistics); the running statistics that forward updates are put back after.
        saved = {name: b.clone() for name, b in module.named_buffers()}
        rows = self._rows(module(None)).detach().clone()             # (B, h0·w0, K)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])
        unit = normalize_columns(rows)
        u, s, _ = torch.linalg.svd(unit, full_matrices=False)
        ortho = u * s[:, None, :]
        batch = self._static if self._static is not None else (self._buffer[-1] if self._buffer else None)
        eigenvalues = {} if batch is None or rows.shape[0] != batch.groups[0].q.shape[1] else \
            self._layer_eigenvalues(ortho, batch)
        h0, w0 = self._base_grid
        shape = (rows.shape[0], h0, w0, rows.shape[-1])
        single = rows.shape[0] == 1
        pick = (lambda t: t[0]) if single else (lambda t: t)
        return SolverResult(pick(ortho.reshape(shape)), pick(s), pick(rows.reshape(shape)), eigenvalues,
                            list(history), len(history))

    def _layer_eigenvalues(self, features: Tensor, batch: _Batch) -> dict[str, Tensor]:
        out = {}
        cfg = self.config
        for group in batch.groups:
            x = group.pooling.pool(features)[None]
            if cfg.variant == "subspace":
                z = normalize_columns(x).unsqueeze(-3)
                mz = affinity_symmetric_matmul(group.q, group.k, z, scale=group.scale, offset=group.offsets,
                                               backend=cfg.backend)
                eig = (mz * z).sum(-2)
            else:
                symmetric = int(cfg.variant == "symmetric")
                eig, _ = eigen_terms(group.q, group.k, x, symmetric=symmetric, scale=group.scale,
                                     offsets=group.offsets, row_lse=group.row_lse, backend=cfg.backend)
                if symmetric:
                    eig = eig.diagonal(dim1=-3, dim2=-2).movedim(-1, -2)  # z_hᵀ L_h z_h
            for i, name in enumerate(group.names):
                out[name] = eig[i]
        return out

    # ------------------------------------------------------------------ exact initialisation
    @torch.no_grad()
    def _init_from_eigsh(self, captures, image_index) -> None:
        """Start from the exact top-K subspace of Σ_l G_lᵀ M_l G_l (mean over layers and heads).

        Free logits (``softmax=False``) are set to the eigenvectors themselves. Under the
        softmax no X spans an arbitrary subspace: logits θ = c·√N·U give X ≈ (1 + θ − mean_k θ)/K
        to first order, i.e. the constant plus K − 1 directions of span(U) — close to the
        subspace when the top (trivial) eigenvector is nearly constant.
        """
        from .eigsh import eigsh
        from .operators import multilayer_operator

        cfg = self.config
        if cfg.parameterization == "conv":
            raise ValueError('init="eigsh" sets logits directly: use parameterization "pixel" or "table"')
        n_base = self._base_grid[0] * self._base_grid[1]
        n_images = captures[0].q.shape[0]
        vectors = []
        for image in range(n_images):
            op = multilayer_operator(captures, graph=cfg.graph, normalize="sym", base_grid=self._base_grid,
                                     extra_tokens=cfg.extra_tokens, temperature=cfg.vv_temperature,
                                     image=image, backend=cfg.backend)
            _, vecs = eigsh(op, cfg.n_eig, generator=torch.Generator().manual_seed(int(self._generator.initial_seed())))
            vectors.append(vecs.T.reshape(cfg.n_eig, *self._base_grid))
        logits = torch.stack(vectors).to(next(self.module.parameters()))
        if cfg.softmax:
            logits = 0.5 * n_base ** 0.5 * logits
        param = next(self.module.parameters())
        if cfg.parameterization == "table":
            param[torch.as_tensor(image_index, dtype=torch.long).reshape(-1)] = logits
        else:
            param.copy_(logits)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, captures, logits: Tensor, *, image_index=None) -> Tensor:
        """The training loss for given logits (B, K, h0, w0) on these captures (differentiable)."""
        captures = list(captures)
        if logits.dim() != 4 or logits.shape[1] != self.config.n_eig:
            raise ValueError(f"logits must be (B, {self.config.n_eig}, h0, w0), got {tuple(logits.shape)}")
        self._base_grid = tuple(logits.shape[-2:])
        return self._loss(self._rows(logits), self._prepare(captures, image_index))
