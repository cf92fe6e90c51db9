"""Sharded KQ / VV affinity operators: the single-process graphs with rows split over ranks.

Rank p holds rows [s_p, s_p + n_p) of q, k (and v) and of every X it multiplies; it gets
back the same rows of the product. Each product is one ring pass (``ring.py``) of the
visiting shards' keys, right-hand sides and offsets; per rank, memory is O(N/P) (own
shard + the visiting one + the one in flight) and no rank ever holds all tokens.

    "none"  Y_p = Σ_s A_ps X_s                 packet (k_s, X_s)
    "row"   Y_p = Σ_s D_r⁻¹ A_ps X_s           first call: per-step softmax partials merged
                                               by log-sum-exp rescaling (online softmax over
                                               shards), which also yields the row LSE; later
                                               calls: offset form with the cached LSE
    "sym"   Y_p = ½ Σ_s (E_ps X_s + E_spᵀ X_s) packet (k_s, X_s, a_s) + a carried accumulator

For "sym" (E_ij = exp(S_ij − a_i − a_j), a = ½ log d), the diagonal block uses the fused
one-pass symmetric primitive. For an off-diagonal block rank p computes the tile S_ps only:
its row part E_ps X_s stays on p, its column part E_psᵀ X_p belongs to rank s and travels
back in an accumulator that follows the shard around the ring (one message of n_s × m per
step, one extra hop at the end). The alternative — circulating q_s too and computing
E_sp X_s locally — needs no return trip but sends q as well (larger than the accumulator
whenever H·d·bytes(q) > m·4) and evaluates every tile of S twice (S_ps on p and again on s);
with the carried accumulator every tile is evaluated once, so a rectangular fused kernel
(both products from one exponentiated tile) would halve the exponentials, as the one-pass
symmetric kernel does on one GPU.

When q is k (VV graphs, or KQ built with one tensor), S = Sᵀ and block (s, p) is block
(p, s) transposed, so each pair of shards is computed once: a half ring of ⌊P/2⌋ steps,
the column parts carried home directly, the pair at distance P/2 (P even) split in two by
rows and columns so that every rank does equal work — half the compute and transfers of
the full ring, for all three normalisations and the "row" adjoint.

Degrees: r (row LSE) and c (column LSE) of the local rows come from one ring pass of
(q_s, k_s): r_p = ⊕_s lse(q_p, k_s), c_p = ⊕_s lse(k_p, q_s) with ⊕ = logaddexp.
Small dense algebra for the eigensolver goes through ``row_algebra()`` (``ShardedRows``:
``gram`` and norms all-reduced, small eigensolves broadcast from rank 0).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import check_tensor
from ..operators.affinity import NORMALIZE_MODES, _head_weights, _query_key_heads, _unit_values
from ..operators.base import AffinityOperator, SumOperator
from ..ops import affinity_logsumexp, affinity_matmul, affinity_symmetric_matmul
from ..ops._layout import compute_dtype
from ..ops._common import resolve_scale
from .ring import ring_pass
from .shards import ShardLayout, agree

__all__ = ["ShardedOperator", "ShardedSumOperator", "ShardedKQAffinity", "ShardedVVAffinity", "ShardedRows"]

_NORMALIZE_CODE = {name: i for i, name in enumerate(NORMALIZE_MODES)}


class ShardedOperator(AffinityOperator):
    """An N×N operator whose rows (and those of every X) are split over the ranks of a group.

    ``matmul`` takes and returns this rank's rows; ``shape`` is global. ``gram`` gives the
    global AᵀB of two row-sharded blocks, which is all the eigensolver's small dense algebra
    needs. Every method is collective: all ranks must call it, in the same order.
    """

    layout: ShardLayout

    @property
    def local_rows(self) -> tuple[int, int]:
        """(start, stop) of this rank's rows in the global token order."""
        return self.layout.local_rows

    @property
    def n_local(self) -> int:
        return self.layout.n_local

    @property
    def group(self):
        return self.layout.group

    def _prepare(self, x, name="x"):
        check_tensor(name, x, min_dim=1, finite=False)
        problem = None
        if x.dim() > 2:
            problem = f"{name} must be (n_local,) or (n_local, m), got shape {tuple(x.shape)}"
        elif x.shape[0] != self.n_local:
            problem = (f"{name} must hold this rank's {self.n_local} rows (rows {self.local_rows} of "
                       f"{self.shape[0]}), got shape {tuple(x.shape)}")
        elif x.device != self.device:
            problem = f"{name} is on {x.device} but the operator is on {self.device}"
        elif not bool(torch.isfinite(x).all()):
            problem = f"{name} contains NaN or Inf values"
        width = (x.shape[1] if x.dim() == 2 else 1) if problem is None else -1
        # Collective, so that a bad block on one rank stops every rank (rather than leaving the
        # others waiting in the ring), and so that every rank circulates blocks of one width.
        try:
            agree(type(self).__name__ + ".matmul", self.n_local,
                  {"x columns": width, "x valid on every rank": problem is None}, device=self.device, group=self.group)
        except ValueError as err:
            raise ValueError(f"{problem} (on rank {self.layout.rank})" if problem else str(err)) from None
        vector = x.dim() == 1
        x2 = x.unsqueeze(1) if vector else x
        return x2.to(self.dtype), vector

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """The global AᵀB (float64, replicated on every rank) of row-sharded A, B (n_local × ·)."""
        out = a.to(torch.float64).T @ b.to(torch.float64)
        dist.all_reduce(out, group=self.group)
        return out

    def row_algebra(self) -> "ShardedRows":
        """The eigensolver's reductions over rows, made collective for this operator's shards."""
        return ShardedRows(self)

    def to_dense(self):
        raise NotImplementedError("a sharded operator is never materialised; gather products instead")

    @property
    def T(self):
        if self.is_symmetric:
            return self
        raise NotImplementedError("use adjoint_matmul(x_local) for the transposed product of a sharded operator")

    def _make_sum(self, terms):
        # weighted sums stay sharded (layers, heads, timesteps of one token set)
        return ShardedSumOperator(terms)


class ShardedRows:
    """``spectral_kernels.eigsh``'s row algebra for blocks row-sharded like ``op``.

    Grams and norms are all-reduced and the finite check is a logical or over ranks, so
    every rank sees the same small matrices and takes the same decisions. The small
    eigendecompositions are broadcast from rank 0, so that ranks can never drift apart,
    even on a library whose eigh is not bitwise reproducible. Every method is collective.
    """

    rows_label = "n_local"

    def __init__(self, op: ShardedOperator):
        self.op, self.layout = op, op.layout
        self.n_local = op.n_local

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.op.gram(a, b)

    def col_norms(self, v: Tensor) -> Tensor:
        sq = (v * v).sum(dim=0)
        dist.all_reduce(sq, group=self.layout.group)
        return sq.sqrt()

    def all_finite(self, y: Tensor) -> bool:
        bad = torch.tensor([0.0 if bool(torch.isfinite(y).all()) else 1.0], dtype=torch.float64, device=self.op.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.layout.group)
        return not bool(bad.item() > 0)

    def eigh(self, sym: Tensor) -> tuple[Tensor, Tensor]:
        evals, evecs = torch.linalg.eigh(sym.cpu())
        packed = torch.cat([evals[None], evecs]).to(sym.device)
        dist.broadcast(packed, src=self.layout.peer(0), group=self.layout.group)
        return packed[0], packed[1:]

    def all_gather(self, row: Tensor) -> Tensor:
        gathered = [torch.empty_like(row) for _ in range(self.layout.world_size)]
        dist.all_gather(gathered, row.contiguous(), group=self.layout.group)
        return torch.stack(gathered)


class ShardedSumOperator(ShardedOperator, SumOperator):
    """Σ_t w_t·op_t of sharded operators on the same row shards (nested sums flatten).

    Only the construction differs from ``SumOperator`` (terms must share row shards and
    process group); the products and the trivial eigenvector are SumOperator's.
    """

    def __init__(self, terms):
        flat = []
        for weight, op in terms:
            if not isinstance(op, ShardedOperator):
                raise TypeError(f"terms must be (weight, ShardedOperator) pairs, got {type(op).__name__}")
            if isinstance(op, ShardedSumOperator):
                flat.extend((float(weight) * w, inner) for w, inner in op.terms)
            else:
                flat.append((float(weight), op))
        if not flat:
            raise ValueError("a sum needs at least one operator")
        first = flat[0][1]
        for _, op in flat[1:]:
            if op.layout.counts != first.layout.counts or op.group is not first.group:
                raise ValueError(f"operators in a sum must share row shards and process group, got row counts "
                                 f"{first.layout.counts} and {op.layout.counts}")
            if op.device != first.device:
                raise ValueError(f"operators in a sum must be on one device, got {first.device} and {op.device}")
        self.terms, self.layout = flat, first.layout
        self.shape, self.device = first.shape, first.device
        self.dtype = torch.float64 if any(op.dtype == torch.float64 for _, op in flat) else torch.float32
        self.is_symmetric = all(op.is_symmetric for _, op in flat)


class ShardedKQAffinity(ShardedOperator):
    """``KQAffinity`` with its tokens split over the ranks of a process group.

    Args:
        q_local, k_local: this rank's rows, (n_local, d) or (H, n_local, d); n_local may
            differ between ranks (≥ 1). Passing the same tensor for both (VV-style shared
            features) is honoured on every rank.
        normalize, scale, head_weights, backend: as ``KQAffinity`` (must agree across ranks).
        group: the process group (default: the world).

    Construction is collective: it all-gathers the shard sizes and checks that every rank
    has the same heads, feature dimension, dtype, normalisation, scale and head weights,
    raising ValueError on every rank otherwise.
    """

    def __init__(self, q_local: Tensor, k_local: Tensor, *, normalize: str = "sym", scale: float | None = None,
                 head_weights: Tensor | None = None, backend: str = "auto", group=None):
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        q3, k3, shared = _query_key_heads(q_local, k_local, "q_local", "k_local")
        heads, n_local, d = q3.shape
        if d == 0:
            raise ValueError(f"q_local needs at least one feature, got shape {tuple(q3.shape)}")
        self.scale = resolve_scale(scale, d)
        self.dtype = compute_dtype(q3, k3)
        self.device = q3.device
        weights = _head_weights(head_weights, heads, self.dtype, self.device)
        self.layout = agree(type(self).__name__, n_local, {
            "heads": heads, "feature dim d": d, "dtype": q3.dtype, "normalize": _NORMALIZE_CODE[normalize],
            "scale": self.scale, "q is k": shared,
            **{f"head weight {h}": float(w) for h, w in enumerate(weights.tolist())},
        }, device=self.device, group=group)
        self.q = q3.contiguous()
        self.k = self.q if shared else k3.contiguous()   # identity kept: q is k means S = Sᵀ
        self.normalize, self.backend = normalize, backend
        self.n_heads, self.head_weights = heads, weights
        n = self.layout.n_total
        self.shape = (n, n)
        self.is_symmetric = normalize == "sym" or (normalize == "none" and shared)
        self._row_lse = self._col_lse = self._sym_offset = None

    @property
    def scores_symmetric(self) -> bool:
        return self.q is self.k

    def _common(self):
        return dict(scale=self.scale, backend=self.backend)

    # ------------------------------------------------------------------ degrees
    def _lse_pass(self):
        """Row and column LSE of the local rows in one ring pass of (q_s, k_s)."""
        row = col = None
        shared = self.scores_symmetric

        def visit(_source, shard):
            nonlocal row, col
            q_s, k_s = (shard[0], shard[0]) if shared else shard
            r = affinity_logsumexp(self.q, k_s, **self._common())
            row = r if row is None else torch.logaddexp(row, r)
            if not shared:
                c = affinity_logsumexp(self.k, q_s, **self._common())
                col = c if col is None else torch.logaddexp(col, c)

        packet = [self.k] if shared else [self.q, self.k]
        ring_pass(self.layout, packet, [-2] * len(packet), visit)
        self._row_lse = row.to(self.dtype)
        self._col_lse = self._row_lse if shared else col.to(self.dtype)

    def row_lse(self) -> Tensor:
        """r (H, n_local): log row sums of A over all N columns, for this rank's rows."""
        if self._row_lse is None:
            # a row-normalised operator needs no column sums: circulate k only
            self._lse_pass_rows_only() if self.normalize == "row" else self._lse_pass()
        return self._row_lse

    def col_lse(self) -> Tensor:
        """c (H, n_local): log column sums of A (over all N rows) for this rank's columns."""
        if self._col_lse is None:
            self._lse_pass()
        return self._col_lse

    def log_degrees(self) -> Tensor:
        """log d (H, n_local) of W = (A + Aᵀ)/2 for this rank's rows."""
        return torch.logaddexp(self.row_lse(), self.col_lse()) - math.log(2.0)

    def _offset(self) -> Tensor:
        if self._sym_offset is None:
            self._sym_offset = (0.5 * self.log_degrees()).contiguous()
        return self._sym_offset

    # ------------------------------------------------------------------ products
    def _matmul(self, x):
        if self.normalize == "row" and self._row_lse is None:
            return self._row_softmax_first_pass(x)
        if self.scores_symmetric:  # q = k (VV): each pair of shards once, on a half ring
            alpha = {"sym": self._offset, "row": self.row_lse, "none": lambda: None}[self.normalize]()
            return self._half_ring_product(x, alpha=alpha, beta=alpha if self.normalize == "sym" else None)
        if self.normalize == "sym":
            return self._sym_matmul(x)
        return self._offset_pass(x, row_offset=self._row_lse if self.normalize == "row" else None)

    def _offset_pass(self, x, row_offset):
        """Σ_s exp(S_ps − α_p)·X_s, heads summed with their weights (one primitive call per step)."""
        y = torch.zeros(self.n_local, x.shape[1], dtype=self.dtype, device=self.device)
        weights = self.head_weights

        def visit(_source, shard):
            k_s, x_s = shard
            y.add_(affinity_matmul(self.q, k_s, x_s, row_offset=row_offset, head_weights=weights, **self._common()))

        ring_pass(self.layout, [self.k, x], [-2, -2], visit)
        return y

    def _row_softmax_first_pass(self, x):
        """Softmax rows merged across shards by LSE rescaling; caches the row LSE.

        Per step the primitive returns each head's softmax over the visiting shard's
        columns and its LSE; partials combine as y ← y·e^{l−l'} + y_s·e^{l_s−l'} with
        l' = logaddexp(l, l_s).
        """
        y = lse = None

        def visit(_source, shard):
            nonlocal y, lse
            k_s, x_s = shard
            y_s, lse_s = affinity_matmul(self.q, k_s, x_s, normalize="row", return_lse=True, **self._common())
            if y is None:
                y, lse = y_s.to(self.dtype), lse_s.to(self.dtype)
                return
            merged = torch.logaddexp(lse, lse_s)
            y = y * torch.exp(lse - merged)[..., None] + y_s * torch.exp(lse_s - merged)[..., None]
            lse = merged

        ring_pass(self.layout, [self.k, x], [-2, -2], visit)
        self._row_lse = lse.contiguous()
        return torch.einsum("h,hnm->nm", self.head_weights, y)

    def _lse_pass_rows_only(self):
        row = None

        def visit(_source, shard):
            nonlocal row
            r = affinity_logsumexp(self.q, shard[0], **self._common())
            row = r if row is None else torch.logaddexp(row, r)

        ring_pass(self.layout, [self.k], [-2], visit)
        self._row_lse = row.to(self.dtype).contiguous()

    def _sym_matmul(self, x):
        """½(E + Eᵀ)X with the transposed half carried back to its owner (module docstring)."""
        a = self._offset()
        weights, rank = self.head_weights, self.layout.rank
        y = torch.zeros(self.n_local, x.shape[1], dtype=self.dtype, device=self.device)

        def visit(source, shard):
            k_s, x_s, a_s = shard
            if source == rank:  # the diagonal block: the fused one-pass symmetric kernel
                y.add_(affinity_symmetric_matmul(self.q, self.k, x, offset=a, head_weights=weights,
                                                 **self._common()))
                return None
            y.add_(affinity_matmul(self.q, k_s, x_s, row_offset=a, col_offset=a_s, head_weights=weights,
                                   **self._common()), alpha=0.5)
            back = affinity_matmul(k_s, self.q, x, row_offset=a_s, col_offset=a, head_weights=weights,
                                   **self._common())
            return back.mul_(0.5)

        home = ring_pass(self.layout, [self.k, x, a], [-2, -2, -1], visit, carry=True, carry_like=y)
        if home is not None:
            y.add_(home)
        return y

    def _half_ring_product(self, x, *, alpha, beta):
        """Σ_s exp(S_ps − α_p − β_s)·X_s when S = Sᵀ (q is k), each pair of shards computed once.

        Block (p, s) and block (s, p) are transposes, so rank p visits only the ⌊P/2⌋ shards
        before it: from each tile it keeps the row part exp(S_ps − α_p − β_s) X_s and sends
        the column part exp(S_sp − α_s − β_p) X_p home to s in the carried accumulator. With
        P even, the pair at distance P/2 is split between its two ranks by rows (lower rank)
        and columns (higher rank), so every rank does the same work. α, β: (H, n_local) or
        None; passing the same tensor for both (NCut offsets) keeps the diagonal block
        symmetric for the one-pass kernel.
        """
        layout, rank, world = self.layout, self.layout.rank, self.layout.world_size
        half = world // 2
        weights, common = self.head_weights, self._common()
        y = torch.zeros(self.n_local, x.shape[1], dtype=self.dtype, device=self.device)
        packet, dims = [self.q, x], [-2, -2]
        where = {}
        for name, t in (("alpha", alpha), ("beta", beta)):
            if t is not None and not (name == "beta" and beta is alpha):
                where[name] = len(packet)
                packet.append(t)
                dims.append(-1)
        if beta is not None and beta is alpha:
            where["beta"] = where["alpha"]

        def part(t, index):
            return None if t is None else t[:, index]

        def visit(source, shard):
            q_s, x_s = shard[0], shard[1]
            a_s = shard[where["alpha"]] if "alpha" in where else None
            b_s = shard[where["beta"]] if "beta" in where else None
            if source == rank:
                if alpha is beta:  # a symmetric block: the one-pass kernel computes half its tiles
                    y.add_(affinity_symmetric_matmul(self.q, self.q, x, offset=alpha, head_weights=weights, **common))
                else:
                    y.add_(affinity_matmul(self.q, self.q, x, row_offset=alpha, col_offset=beta, head_weights=weights,
                                           **common))
                return None
            rows, cols = slice(None), slice(None)
            if world % 2 == 0 and (rank - source) % world == half:
                if rank < source:
                    rows = slice(0, self.n_local // 2)
                else:
                    cols = slice(layout.counts[source] // 2, None)
            q_p, x_p, q_c, x_c = self.q[:, rows], x[rows], q_s[:, cols], x_s[cols]
            y[rows] += affinity_matmul(q_p, q_c, x_c, row_offset=part(alpha, rows), col_offset=part(b_s, cols),
                                       head_weights=weights, **common)
            back = torch.zeros(layout.counts[source], x.shape[1], dtype=self.dtype, device=self.device)
            back[cols] = affinity_matmul(q_c, q_p, x_p, row_offset=part(a_s, cols), col_offset=part(beta, rows),
                                         head_weights=weights, **common)
            return back

        home = ring_pass(layout, packet, dims, visit, carry=True, carry_like=y, steps=half + 1)
        if home is not None:
            y.add_(home)
        return y

    def _adjoint_matmul(self, x):
        if self.is_symmetric:
            return self._matmul(x)
        if self.scores_symmetric:  # VV "row": Pᵀ X = Σ_s exp(S_ps − r_s) X_s, again on a half ring
            return self._half_ring_product(x, alpha=None, beta=self.row_lse())
        # (Aᵀ X)_p = Σ_s exp(S_sp − β_s)ᵀ X_s: circulate (q_s, X_s[, r_s]); "row" has β = row LSE.
        y = torch.zeros(self.n_local, x.shape[1], dtype=self.dtype, device=self.device)
        weights = self.head_weights
        with_lse = self.normalize == "row"
        packet = [self.q, x] + ([self.row_lse()] if with_lse else [])

        def visit(_source, shard):
            q_s, x_s = shard[0], shard[1]
            col_offset = shard[2] if with_lse else None
            y.add_(affinity_matmul(self.k, q_s, x_s, col_offset=col_offset, head_weights=weights, **self._common()))

        ring_pass(self.layout, packet, [-2, -2, -1][:len(packet)], visit)
        return y

    def trivial_eigenvector(self):
        """This rank's rows of the unit eigenvector ∝ sqrt(d) (single-head "sym"), else None."""
        if self.normalize != "sym" or self.n_heads != 1:
            return None
        a = self._offset()[0]
        top = a.max().reshape(1).clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        u = torch.exp(a - top)
        norm2 = (u.to(torch.float64) ** 2).sum().reshape(1)
        dist.all_reduce(norm2, group=self.group)
        return u / norm2.sqrt().to(u.dtype)


class ShardedVVAffinity(ShardedKQAffinity):
    """``VVAffinity`` sharded: exp(cos(v_i, v_j)/t) with q = k = v/‖v‖ and τ = 1/t.

    Args:
        v_local: this rank's rows, (n_local, d) or (H, n_local, d).
        temperature, normalize, head_weights, backend: as ``VVAffinity``.
        group: the process group (default: the world).
    """

    def __init__(self, v_local: Tensor, *, temperature: float = 0.1, normalize: str = "sym",
                 head_weights: Tensor | None = None, backend: str = "auto", group=None):
        unit = _unit_values("v_local", v_local, temperature)
        self.temperature = float(temperature)
        super().__init__(unit, unit, normalize=normalize, scale=1.0 / temperature, head_weights=head_weights,
                         backend=backend, group=group)
