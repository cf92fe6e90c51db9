"""The graphs of one attention layer: KQ (attention) and VV (value similarity) affinities.

For each head h, S_h = τ·Q_h·K_hᵀ and A_h = exp(S_h). The operator is the (weighted)
mean over heads of each head's normalised matrix (DESIGN.md §2):

    "none"  A_h                                   (overflows once τ·q·k > ~88 in fp32)
    "row"   P_h = D_r⁻¹ A_h  (softmax attention)  Pᵀ·X: swap q, k; column offset = row LSE
    "sym"   M_h = D^-½ W_h D^-½,  W_h = (A_h + A_hᵀ)/2,  d_i = (e^{r_i} + e^{c_i})/2

r = row LSE, c = column LSE (the LSE with q and k swapped), all in log space so no
exponent exceeds log 2. Every product is one call of the primitive with the heads summed
inside it (``head_weights``) and one X shared by the heads. LSEs and offsets are computed
on first use and cached.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_positive, check_same_device, check_tensor, finite_checks
from ..ops import affinity_logsumexp, affinity_matmul, affinity_symmetric_matmul
from ..ops._common import resolve_scale
from ..ops._layout import compute_dtype
from .base import AffinityOperator

NORMALIZE_MODES = ("sym", "row", "none")


def _as_heads(name: str, t) -> Tensor:
    """(N, d), (H, N, d) or (1, H, N, d) → (H, N, d)."""
    check_tensor(name, t, min_dim=2)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[0] == 1:
        return t[0]
    raise ValueError(f"{name} must be (N, d), (H, N, d) or (1, H, N, d); got shape {tuple(t.shape)} "
                     f"(build one operator per image, or sum them, for a batch)")


def _query_key_heads(q, k, q_name: str, k_name: str) -> tuple[Tensor, Tensor, bool]:
    """Validated (H, N, d) views of q and k, and whether they are one tensor (S symmetric).

    Shared by KQAffinity and its sharded twin, whose arguments carry other names.
    """
    shared = q is k
    q3 = _as_heads(q_name, q).detach()
    k3 = q3 if shared else _as_heads(k_name, k).detach()
    check_same_device(**{q_name: q3, k_name: k3})
    if q3.shape != k3.shape:
        raise ValueError(f"{q_name} and {k_name} must have the same (H, N, d) shape, got "
                         f"{tuple(q3.shape)} and {tuple(k3.shape)}")
    if q3.dtype != k3.dtype:
        raise TypeError(f"{q_name} and {k_name} must have the same dtype, got {q3.dtype} and {k3.dtype}")
    return q3, k3, shared


def _unit_values(name: str, v, temperature) -> Tensor:
    """L2-normalised (H, N, d) values for a cosine graph exp(cos/t), after checking t > 0.

    Shared by VVAffinity and its sharded twin.
    """
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature!r}")
    check_positive("temperature", temperature)
    v3 = _as_heads(name, v).detach()
    return F.normalize(v3.to(compute_dtype(v3)), dim=-1)


def _head_weights(head_weights, heads: int, dtype, device) -> Tensor:
    """Weights normalised to sum 1 (a weighted mean); uniform when not given."""
    if head_weights is None:
        return torch.full((heads,), 1.0 / heads, dtype=dtype, device=device)
    if not isinstance(head_weights, Tensor):
        head_weights = torch.as_tensor(head_weights, dtype=dtype)
    check_tensor("head_weights", head_weights, dim=1)
    if head_weights.shape[0] != heads:
        raise ValueError(f"head_weights must have one weight per head ({heads}), got shape {tuple(head_weights.shape)}")
    head_weights = head_weights.to(dtype=dtype, device=device)
    if bool((head_weights < 0).any()):
        raise ValueError("head_weights must be non-negative")
    total = float(head_weights.sum())
    if total <= 0:
        raise ValueError("head_weights must not all be zero")
    return head_weights / total


def _inputs_scanned(method):
    """Run a method's primitive calls without their NaN/Inf scans of q, k and x.

    q and k were scanned once at construction and x by ``matmul()``; re-scanning the
    (N, d) features on every product costs a pass (and a sync on a GPU) each time.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with finite_checks(False):
            return method(self, *args, **kwargs)
    return wrapper


class KQAffinity(AffinityOperator):
    """The attention graph of one layer, exp(τ·q kᵀ) per head, normalised and head-averaged.

    Args:
        q, k: (N, d), (H, N, d) or (1, H, N, d) queries and keys (one image; for a batch of
            images build one operator per image). Passing the same tensor as q and k makes
            S symmetric, which the backends exploit.
        normalize: "sym" (NCut M = D^-½ W D^-½, symmetric; the default), "row" (softmax
            attention P, not symmetric) or "none" (A itself; exp overflows in fp32 once
            τ·q·k exceeds ~88 — use "row"/"sym", which work in log space, for raw features).
        scale: τ, default 1/sqrt(d).
        head_weights: (H,) non-negative weights, normalised to sum 1; default the plain mean.
        backend: primitive backend ("auto", "torch", "triton", "cuda", "dense").

    Products are computed in fp32 (fp64 if q/k are fp64), whatever X's dtype.
    """

    def __init__(self, q: Tensor, k: Tensor, *, normalize: str = "sym", scale: float | None = None,
                 head_weights: Tensor | None = None, backend: str = "auto"):
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        q3, k3, _ = _query_key_heads(q, k, "q", "k")
        heads, n, d = q3.shape
        if n == 0 or d == 0:
            raise ValueError(f"q and k need at least one token and one feature, got shape {tuple(q3.shape)}")
        self.q, self.k = q3, k3
        self.scale = resolve_scale(scale, d)
        self.normalize = normalize
        self.backend = backend
        self.shape = (n, n)
        self.device = q3.device
        self.dtype = compute_dtype(q3, k3)
        self.n_heads = heads
        self.head_weights = _head_weights(head_weights, heads, self.dtype, self.device)
        self.is_symmetric = normalize == "sym" or (normalize == "none" and self.scores_symmetric)
        self._row_lse = None
        self._col_lse = None
        self._sym_offset = None

    @property
    def scores_symmetric(self) -> bool:
        """True when q and k are one tensor, so S = Sᵀ and the transposed product is free."""
        return self.q is self.k

    # ------------------------------------------------------------------ cached statistics
    @_inputs_scanned
    def row_lse(self) -> Tensor:
        """r (H, N): r_i = log Σ_j exp(S_ij), the log row sums (log out-degrees) of A."""
        if self._row_lse is None:
            self._row_lse = affinity_logsumexp(self.q, self.k, scale=self.scale, backend=self.backend).to(self.dtype)
        return self._row_lse

    @_inputs_scanned
    def _row_and_col_lse(self) -> None:
        """Both LSEs from one pass (q ≠ k), for the "sym" degrees that need both."""
        r, c = affinity_logsumexp(self.q, self.k, scale=self.scale, return_col_lse=True, backend=self.backend)
        self._row_lse, self._col_lse = r.to(self.dtype), c.to(self.dtype)

    @_inputs_scanned
    def col_lse(self) -> Tensor:
        """c (H, N): c_j = log Σ_i exp(S_ij), the log column sums of A."""
        if self.scores_symmetric:
            return self.row_lse()
        if self._col_lse is None:
            self._col_lse = affinity_logsumexp(self.k, self.q, scale=self.scale, backend=self.backend).to(self.dtype)
        return self._col_lse

    def log_degrees(self) -> Tensor:
        """log d (H, N) of W = (A + Aᵀ)/2: d_i = (e^{r_i} + e^{c_i})/2, computed in log space."""
        if not self.scores_symmetric and self._row_lse is None and self._col_lse is None:
            self._row_and_col_lse()
        return torch.logaddexp(self.row_lse(), self.col_lse()) - math.log(2.0)

    def _offset(self) -> Tensor:
        if self._sym_offset is None:
            self._sym_offset = 0.5 * self.log_degrees()
        return self._sym_offset

    # ------------------------------------------------------------------ products
    @_inputs_scanned
    def _matmul(self, x):
        common = dict(scale=self.scale, head_weights=self.head_weights, backend=self.backend)
        if self.normalize == "sym":
            return affinity_symmetric_matmul(self.q, self.k, x, offset=self._offset(), **common)
        if self.normalize == "row":
            return affinity_matmul(self.q, self.k, x, normalize="row", **common)
        if self.scores_symmetric:  # ½(A + Aᵀ) = A, and only half the tiles are computed
            return affinity_symmetric_matmul(self.q, self.q, x, **common)
        return affinity_matmul(self.q, self.k, x, **common)

    @_inputs_scanned
    def _adjoint_matmul(self, x):
        if self.is_symmetric:
            return self._matmul(x)
        common = dict(scale=self.scale, head_weights=self.head_weights, backend=self.backend)
        if self.normalize == "row":
            # (Pᵀ)_ji = exp(S_ij − r_i): the swapped product with the row LSE as column offset.
            return affinity_matmul(self.k, self.q, x, col_offset=self.row_lse(), **common)
        return affinity_matmul(self.k, self.q, x, **common)

    # ------------------------------------------------------------------ eigsh's starts
    def can_subsample(self) -> bool:
        """"sym" graphs (τ > 0) have a Nyström start in eigsh: ``subsample`` and
        ``extend_from_sample``."""
        return self.normalize == "sym" and self.scale > 0

    def subsample(self, index):
        """This graph (same heads, weights and τ) on the tokens ``index`` only."""
        if not self.can_subsample():
            raise ValueError(f"only a normalize='sym' graph with τ > 0 can be subsampled, not {self!r}")
        q = self.q[:, index]
        k = q if self.scores_symmetric else self.k[:, index]
        return KQAffinity(q, k, normalize="sym", scale=self.scale, head_weights=self.head_weights,
                          backend=self.backend)

    def _diagonal_half_score_range(self) -> tuple[float, float]:
        """(min, max) over the tokens of τ|q_i|²/2 = S_ii/2 (first head)."""
        half = 0.5 * self.scale * self.q[0].double().pow(2).sum(-1)
        return float(half.min()), float(half.max())

    def _fusable(self) -> bool:
        """Whether ``fused_start`` applies: one head, q is k, degrees not known yet, and the
        squared norms close enough for one constant offset (see fused_start)."""
        if not (self.can_subsample() and self.scores_symmetric and self.n_heads == 1 and self._row_lse is None):
            return False
        low, top = self._diagonal_half_score_range()
        return 2.0 * (top - low) <= 40.0

    @_inputs_scanned
    def extend_from_sample(self, index, sample, vectors):
        """Nyström extension of the sample graph's top eigenvectors u_s to every token.

        Where ``fused_start`` applies (its pass finds the degrees), the block returned is for
        it: the random-walk eigenvectors φ_s = D_s^-½ u_s extend as φ(i) = Σ_{j∈s} W_ij φ_s(j)
        / Σ_{j∈s} W_ij — one softmax-row product against the sample — and fused_start turns φ
        into D^½ φ. Otherwise the block is the start itself, M[:, s]·u_s (the full graph's
        columns of the sample tokens, with the full degrees): two products against the sample
        (one when q is k). Either way up to 1/λ per column, which leaves the span unchanged.
        """
        if self._fusable():
            r = sample.row_lse()[0]
            phi = vectors.to(self.dtype) * torch.exp(-0.5 * (r - r.max()))[:, None]
            return affinity_matmul(self.q[0], self.q[0, index], phi, normalize="row", scale=self.scale,
                                   backend=self.backend)
        a = self._offset()
        common = dict(row_offset=a, col_offset=a[:, index], scale=self.scale, head_weights=self.head_weights,
                      backend=self.backend)
        v = vectors.to(self.dtype)
        y = affinity_matmul(self.q, self.k[:, index], v, **common)
        if not self.scores_symmetric:  # W = (A + Aᵀ)/2: the transposed columns too
            y = 0.5 * (y + affinity_matmul(self.k, self.q[:, index], v, **common))
        return y

    @_inputs_scanned
    def fused_start(self, z):
        """(D^½·z, M·D^½·z) and the degrees, from one pass instead of two (single-head VV-type "sym").

        When q is k, Cauchy–Schwarz bounds every score by S_ii = τ|q_i|²'s maximum, so one
        constant offset a = max_i τ|q_i|²/2 makes every exp(S_ij − 2a) ≤ 1 while each row
        keeps its diagonal term exp(τ|q_i|² − 2a) far above underflow (when the squared norms
        spread by < 40/τ). Then ½(E + Eᵀ)·[1, z] gives the degrees d̃ = d·e^{−2a} in its first
        column and W̃·z in the others, and with X0 = D̃^½ z, M·X0 = D̃^-½ W̃ z (M = D^-½ W D^-½
        is invariant to the common factor e^{−2a}). The degrees are cached as the row LSE, so
        later products need no separate degree pass. None when not applicable.
        """
        if not self._fusable():
            return None
        top = self._diagonal_half_score_range()[1]
        ones = torch.ones(z.shape[0], 1, dtype=self.dtype, device=self.device)
        offset = torch.full((1, z.shape[0]), top, dtype=self.dtype, device=self.device)
        y = affinity_symmetric_matmul(self.q, self.q, torch.cat([ones, z.to(self.dtype)], 1), scale=self.scale,
                                      offset=offset, head_weights=self.head_weights, backend=self.backend)
        degrees = y[:, 0]
        if not bool(torch.isfinite(y).all()) or not bool((degrees > 0).all()):
            return None
        self._row_lse = (degrees.log() + 2.0 * top)[None].to(self.dtype)
        root = degrees.sqrt()[:, None]
        return root * z.to(self.dtype), y[:, 1:] / root

    def trivial_eigenvector(self):
        """∝ sqrt(d) for a single-head "sym" operator (eigenvalue 1); None otherwise.

        With several heads each M_h has its own sqrt(d_h), so their mean has no closed-form
        top eigenvector.
        """
        if self.normalize != "sym" or self.n_heads != 1:
            return None
        a = self._offset()[0]
        u = torch.exp(a - a.max())
        return u / torch.linalg.vector_norm(u)


class VVAffinity(KQAffinity):
    """The value-similarity graph exp(cos(v_i, v_j)/t): KQAffinity with q = k = v/‖v‖, τ = 1/t.

    Args:
        v: (N, d), (H, N, d) or (1, H, N, d) value vectors (zero vectors have cosine 0).
        temperature: t > 0 (default 0.1). With normalize="none" entries reach e^{1/t}, which
            overflows fp32 for t < ~0.0113.
        normalize: "sym" (default), "row" or "none"; "sym" and "none" are symmetric.
        head_weights, backend: as for ``KQAffinity``.
    """

    def __init__(self, v: Tensor, *, temperature: float = 0.1, normalize: str = "sym",
                 head_weights: Tensor | None = None, backend: str = "auto"):
        unit = _unit_values("v", v, temperature)
        self.temperature = float(temperature)
        super().__init__(unit, unit, normalize=normalize, scale=1.0 / temperature,
                         head_weights=head_weights, backend=backend)
