"""The paper's objective as a drop-in ``ncut_loss``, computed without N×N matrices.

Official semantics (xiao7199/layer_distributed_spectral_clustering, ``single_img/
train_utils.py``; where DESIGN.md §3 differs, the official code wins):

* features ``feat`` (B, K, h0, w0) are adaptive-average-pooled to the affinity's grid and
  flattened to Z (B, K, N);
* ``symmetric=0``: matrix = the affinity as given (softmax attention P), Z is column-L2-
  normalised over tokens, ``eigval[b, h, k] = z_bkᵀ P_h z_bk`` (target 1 in the training loop);
* ``symmetric=1``: A = exp(affinity), W = (A + Aᵀ)/2, D = row sums of W, matrix =
  D^-½ (D − W) D^-½ and Z is multiplied by D^½ *per head* before normalisation. The official
  broadcasting then yields cross-head terms ``eigval[h, h', k] = z_hkᵀ L_h' z_h'k`` of shape
  (H, H, K) (target 0), reproduced here as is;
* ``ortho`` = the off-diagonal entries of ZᵀZ, flattened.

With q, k instead of a dense affinity, P = softmax(τ q kᵀ) and, for ``symmetric=1``,
A = exp(τ q kᵀ) (the NCut of the attention kernel itself, not exp of the probabilities the
official code receives).

``symmetric=0``: with the row log-sum-exp r (P = D_r⁻¹A, P_ij = exp(τ q_i·k_j − r_i)) one
``affinity_symmetric_matmul`` call with row offsets r gives ½(P + Pᵀ)·Z for all heads in a
single pass over the score tiles: the values diag(Zᵀ P_h Z) = diag(Zᵀ·½(P_h + P_hᵀ)·Z) and
their gradient (P_h + P_hᵀ)·Z, so backward is an einsum and needs no second pass
(``softmax_quadratic_form``). ½(P + Pᵀ) is symmetric, so GPU kernels may walk only the
upper triangle of pair tiles P_IJ + (P_JI)ᵀ. r depends only on q, k: callers
with fixed affinities (the solver's layer groups) compute it once and pass ``row_lse``.
``symmetric=1``: D^-½ W D^-½ · Z is ``affinity_symmetric_matmul`` with offsets ½·log d from
row and column log-sum-exps (log space, no overflow); that operator is self-adjoint, so its
gradient is the same product (the primitive's backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._validation import check_same_device, check_tensor
from .ops import affinity_logsumexp, affinity_symmetric_matmul
from .pooling import GridPooling

__all__ = ["ncut_loss", "off_diagonal", "symmetric_offsets", "eigen_terms", "softmax_quadratic_form",
           "ncut_quadratic_form", "SYMMETRIC_FLAGS"]

SYMMETRIC_FLAGS = (0, 1)


def off_diagonal(gram: Tensor) -> Tensor:
    """(..., K, K) → (..., K·(K−1)): the entries off the diagonal, row by row."""
    kk = gram.shape[-1]
    flat = gram.flatten(-2)[..., :-1].reshape(*gram.shape[:-2], kk - 1, kk + 1)
    return flat[..., 1:].flatten(-2)


def normalize_columns(z: Tensor) -> Tensor:
    """Unit L2 norm per channel over the tokens (dim −2), as F.normalize(dim=-1) on (K, N)."""
    return F.normalize(z, dim=-2)


def symmetric_offsets(q: Tensor, k: Tensor, *, scale: float | None = None, backend: str = "auto") -> Tensor:
    """a_i = ½·log d_i, d the degrees of W = (A + Aᵀ)/2 with A = exp(τ q kᵀ); shape (..., N).

    d_i = (e^{r_i} + e^{c_i})/2 with r the row and c the column log-sum-exp, combined in
    log space so that no exponent overflows.
    """
    if q is k:
        rows = cols = affinity_logsumexp(q, k, scale=scale, backend=backend)
    else:  # both from one pass where the backend can
        rows, cols = affinity_logsumexp(q, k, scale=scale, return_col_lse=True, backend=backend)
    return 0.5 * (torch.logaddexp(rows, cols) - math.log(2.0))


class _SoftmaxQuadraticForm(torch.autograd.Function):
    """diag(Zᵀ P_h Z) per head from one symmetric pass; backward reuses the saved (P_h + P_hᵀ)·Z."""

    @staticmethod
    def forward(ctx, z, q, k, row_lse, scale, backend):
        heads_z = z.unsqueeze(-3)                                  # one Z shared by the heads
        # ½(P + Pᵀ)·Z: P_ij = exp(S_ij − r_i), so α = r and β = 0 in the symmetric product.
        half_sym_z = affinity_symmetric_matmul(q, k, heads_z, scale=scale, row_offset=row_lse, backend=backend)
        ctx.save_for_backward(half_sym_z)                          # ∂(zᵀPz)/∂z = (P + Pᵀ)z
        ctx.z_shape = z.shape
        return (half_sym_z * heads_z).sum(-2)                      # zᵀ·½(P + Pᵀ)·z = zᵀPz, (..., H, K)

    @staticmethod
    @once_differentiable  # (P + Pᵀ)z is saved as data: a second derivative would need P again
    def backward(ctx, grad_values):
        (half_sym_z,) = ctx.saved_tensors
        grad_z = 2.0 * torch.einsum("...hk,...hnk->...nk", grad_values.to(half_sym_z.dtype), half_sym_z)
        # Z broadcast over q/k's batch dims (e.g. one Z for all layers of a group): sum back.
        return grad_z.sum_to_size(ctx.z_shape), None, None, None, None, None


def softmax_quadratic_form(q: Tensor, k: Tensor, z: Tensor, *, row_lse: Tensor | None = None,
                           scale: float | None = None, backend: str = "auto") -> Tensor:
    """Per-head quadratic forms z_kᵀ P_h z_k, P_h = softmax(τ q_h k_hᵀ) by rows, in one pass.

    q, k: (..., H, N, d) data (no gradient); z: (..., N, K), shared by the heads, its batch
    dims broadcasting against q/k's without the head dim. ``row_lse`` (..., H, N): the row
    log-sum-exp of τ q kᵀ (``affinity_logsumexp(q, k)``), computed here when None — pass it
    when the same q, k serve many calls. Returns (..., H, K), differentiable w.r.t. z once:
    forward runs ``affinity_symmetric_matmul`` with α = r (½(P + Pᵀ)·z from one pass over
    the score tiles) and backward is an einsum with the saved product.
    """
    _check_form_inputs(q, k, z)
    if row_lse is None:
        row_lse = affinity_logsumexp(q, k, scale=scale, backend=backend)
    else:
        check_tensor("row_lse", row_lse, min_dim=1, finite=False)
        if row_lse.shape != q.shape[:-1]:
            raise ValueError(f"row_lse must have shape {tuple(q.shape[:-1])} (q without its feature dim), "
                             f"got {tuple(row_lse.shape)}")
    return _SoftmaxQuadraticForm.apply(z, q, k, row_lse, scale, backend)


class _NCutQuadraticForm(torch.autograd.Function):
    """z_kᵀ M z_k from one symmetric pass; M is self-adjoint, so the gradient 2·M z is saved."""

    @staticmethod
    def forward(ctx, z, q, k, offset, head_weights, scale, backend):
        mz = affinity_symmetric_matmul(q, k, z.unsqueeze(-3), scale=scale, offset=offset,
                                       head_weights=head_weights, backend=backend)
        ctx.save_for_backward(mz)
        ctx.z_shape, ctx.per_head = z.shape, head_weights is None
        return (mz * (z.unsqueeze(-3) if ctx.per_head else z)).sum(-2)

    @staticmethod
    @once_differentiable  # M z is saved as data: a second derivative would need M again
    def backward(ctx, grad_values):
        (mz,) = ctx.saved_tensors
        grad_z = 2.0 * grad_values.to(mz.dtype).unsqueeze(-2) * mz
        if ctx.per_head:
            grad_z = grad_z.sum(-3)
        return grad_z.sum_to_size(ctx.z_shape), None, None, None, None, None, None


def ncut_quadratic_form(q: Tensor, k: Tensor, z: Tensor, *, offset: Tensor | None = None,
                        head_weights: Tensor | None = None, scale: float | None = None,
                        backend: str = "auto") -> Tensor:
    """Quadratic forms z_kᵀ M_h z_k, M_h = D^-½ W_h D^-½ (W = (A + Aᵀ)/2), in one pass.

    q, k: (..., H, N, d) data; z: (..., N, K) shared by the heads. ``offset`` (..., H, N):
    ``symmetric_offsets(q, k)``, computed here when None. Returns (..., H, K), or with
    ``head_weights`` (H,) the weighted sum over heads (..., K). Differentiable w.r.t. z once:
    M is symmetric, so the gradient 2·M z is the forward product itself — no second pass.
    """
    _check_form_inputs(q, k, z)
    if offset is None:
        offset = symmetric_offsets(q, k, scale=scale, backend=backend)
    return _NCutQuadraticForm.apply(z, q, k, offset, head_weights, scale, backend)


def _check_form_inputs(q, k, z):
    """The checks shared by the quadratic forms: (..., H, N, d) data q, k and (..., N, K) z."""
    check_tensor("q", q, min_dim=3, finite=False)
    check_tensor("k", k, min_dim=3, finite=False)
    check_tensor("z", z, min_dim=2)
    _check_square(q, k, z)


def _check_square(q, k, z):
    n = q.shape[-2]
    if k.shape[-2] != n:
        raise ValueError(f"k must have as many tokens as q ({n}) for a quadratic form, got {tuple(k.shape)}")
    if z.shape[-2] != n:
        raise ValueError(f"z must have one row per token ({n}), got shape {tuple(z.shape)}")


def check_symmetric_flag(symmetric) -> int:
    if isinstance(symmetric, bool) or symmetric not in SYMMETRIC_FLAGS:
        raise ValueError(f"symmetric must be 0 or 1, got {symmetric!r}")
    return int(symmetric)


def eigen_terms(q: Tensor, k: Tensor, x: Tensor, *, symmetric: int, scale: float | None = None,
                offsets: Tensor | None = None, row_lse: Tensor | None = None,
                backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Official eigenvalue and orthogonality terms for pooled features on the layer's tokens.

    q, k: (..., H, N, d); x: (..., N, K) pooled features, shared by the heads (not yet
    normalised). Precomputed per-token vectors (..., H, N), each used by one variant only:
    ``row_lse`` = ``affinity_logsumexp(q, k)`` for ``symmetric=0`` (one symmetric pass per
    call then, values and gradient), ``offsets`` = ``symmetric_offsets`` for ``symmetric=1``.

    Returns eigval (..., H, K) for ``symmetric=0`` or (..., H, H, K) for ``symmetric=1``
    (index [h, h'] = z_hᵀ L_h' z_h', the official cross-head broadcast), and the Gram
    off-diagonals (..., K(K−1)) resp. (..., H, K(K−1)).
    """
    if symmetric == 0:
        z = normalize_columns(x)
        eigval = softmax_quadratic_form(q, k, z, row_lse=row_lse, scale=scale, backend=backend)
        ortho = off_diagonal(z.transpose(-1, -2) @ z)
        return eigval, ortho
    if offsets is None:
        offsets = symmetric_offsets(q, k, scale=scale, backend=backend)
    # z ∝ D^½ x per head, D^½ = exp(a). Column normalisation ignores a common factor per
    # head, so exp(a − max a) gives the same z without overflowing for large scores.
    sqrt_deg = torch.exp(offsets - offsets.amax(-1, keepdim=True)).to(x.dtype)
    z = normalize_columns(x.unsqueeze(-3) * sqrt_deg.unsqueeze(-1))
    kk = q if q is k else k
    mz = affinity_symmetric_matmul(q, kk, z, scale=scale, offset=offsets, backend=backend)
    lz = z - mz  # D^-½ (D − W) D^-½ = I − D^-½ W D^-½
    eigval = torch.einsum("...hnk,...gnk->...hgk", z, lz)
    ortho = off_diagonal(z.transpose(-1, -2) @ z)
    return eigval, ortho


# --------------------------------------------------------------------------- dense path
def _dense_ncut_loss(affinity: Tensor, feat: Tensor, symmetric: int) -> tuple[Tensor, Tensor]:
    """The official function, step for step, for a dense (b, N, N) affinity."""
    check_tensor("affinity", affinity, dim=3)
    n = affinity.shape[-1]
    if affinity.shape[-2] != n:
        raise ValueError(f"affinity must be (H, N, N), got {tuple(affinity.shape)}")
    if feat.shape[2] * feat.shape[3] != n:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"affinity has {n} tokens, not a square grid; pool feat yourself")
        feat = F.adaptive_avg_pool2d(feat, side)
    b, c = feat.shape[:2]
    z = feat.reshape(b, c, -1)
    if symmetric == 1:
        a = affinity.exp()
        w = 0.5 * (a + a.transpose(-1, -2))
        deg = w.sum(-1)
        matrix = torch.diag_embed(deg) - w
        matrix = matrix * torch.rsqrt(deg)[:, :, None] * torch.rsqrt(deg)[:, None, :]
        z = z * torch.sqrt(deg)[:, None]
    else:
        matrix = affinity
    z = F.normalize(z, dim=-1)
    mz = matrix @ z[None].transpose(-1, -2)                      # (1, b', N, c) over matrix heads
    eigval = (mz * z.transpose(-1, -2)[:, None]).sum(dim=2)      # official broadcast
    ortho = off_diagonal(z @ z.transpose(-1, -2))
    return eigval, ortho.reshape(-1)


# --------------------------------------------------------------------------- public
def _infer_grid(n_tokens: int, n_extra: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens - n_extra)
    if side * side != n_tokens - n_extra:
        raise ValueError(f"q/k have {n_tokens} tokens ({n_extra} extra): not a square grid; pass grid=(h, w)")
    return side, side


def ncut_loss(q: Tensor, k: Tensor | None, feat: Tensor | int | None = None, symmetric: int = 0, *,
              scale: float | None = None, grid: tuple[int, int] | None = None, n_extra: int = 0,
              extra_tokens: str = "drop", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Drop-in for the official ``ncut_loss``: returns (eigval, ortho) with its semantics.

    Two call forms:

    * ``ncut_loss(q, k, feat, symmetric=0)``: q, k (H, N, d) or (B, H, N, d) of one layer,
      feat (B, K, h0, w0) on the base grid (B = 1 for 3-D q/k). feat is pooled to the layer
      grid (``grid``, default square) with ``GridPooling``; the first ``n_extra`` tokens
      (CLS, registers) are removed from q/k (``extra_tokens="drop"``) or receive the mean
      feature (``"mean"``). Returns eigval (B, H, K) [symmetric=0] or (H, H, K) / (B, H, H, K)
      [symmetric=1, official cross-head layout], and ortho flattened like the official code.
    * ``ncut_loss(affinity, feat, symmetric)`` or ``ncut_loss(affinity, None, feat, symmetric=s)``:
      a dense (H, N, N) affinity, computed literally as the official code does (N×N memory).

    Training loss (official): ``w_eig·|eigval − (1 − symmetric)|.mean() + w_orth·(ortho²).mean()``.
    """
    if k is None or not isinstance(feat, Tensor):
        # Dense form: (affinity, feat[, symmetric]) or (affinity, None, feat, symmetric=).
        if k is None:
            affinity = q
        else:
            if feat is not None:
                symmetric = feat
            affinity, feat = q, k
        symmetric = check_symmetric_flag(symmetric)
        check_tensor("feat", feat, dim=4)
        check_same_device(affinity=affinity, feat=feat)
        return _dense_ncut_loss(affinity, feat, symmetric)

    symmetric = check_symmetric_flag(symmetric)
    check_tensor("q", q, min_dim=3)
    check_tensor("k", k, min_dim=3)
    check_tensor("feat", feat, dim=4)
    check_same_device(q=q, k=k, feat=feat)
    if q.dim() not in (3, 4) or k.shape != q.shape:
        raise ValueError(f"q and k must both be (H, N, d) or (B, H, N, d) of one shape, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    batched = q.dim() == 4
    qb, kb = (q, k) if batched else (q.unsqueeze(0), k.unsqueeze(0))
    if feat.shape[0] != qb.shape[0]:
        raise ValueError(f"feat has batch {feat.shape[0]} but q/k have {qb.shape[0]} images "
                         f"(3-D q/k take feat of batch 1)")
    if feat.shape[1] < 2:
        raise ValueError(f"feat must have at least 2 channels (K ≥ 2), got {feat.shape[1]}")
    n_tokens = qb.shape[-2]
    if not 0 <= n_extra < n_tokens:
        raise ValueError(f"n_extra must be in [0, {n_tokens}), got {n_extra}")
    grid = tuple(grid) if grid is not None else _infer_grid(n_tokens, n_extra)
    if grid[0] * grid[1] + n_extra != n_tokens:
        raise ValueError(f"grid {grid} plus {n_extra} extra tokens makes {grid[0] * grid[1] + n_extra}, "
                         f"but q/k have {n_tokens} tokens")
    pooling = GridPooling(tuple(feat.shape[-2:]), grid, n_extra, extra_tokens)
    if extra_tokens == "drop" and n_extra:
        qb, kb = qb[..., n_extra:, :], kb[..., n_extra:, :]
    rows = feat.flatten(2).transpose(1, 2)                  # (B, h0·w0, K)
    x = pooling.pool(rows)                                   # (B, N, K)
    eigval, ortho = eigen_terms(qb, kb if k is not q else qb, x, symmetric=symmetric, scale=scale,
                                backend=backend)
    if symmetric == 1 and not batched:
        eigval = eigval.squeeze(0)
    return eigval, ortho.reshape(-1)
