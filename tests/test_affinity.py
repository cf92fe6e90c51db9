"""The primitive (DESIGN.md §2) on the CPU backends against float64 formulas written here.

The dense backend is itself checked against the formulas; the torch backend against both.
Triton kernels have their own file (tests/test_triton_backend.py).
"""
import math

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.ops import blockwise

CPU_BACKENDS = ["dense", "torch"]


def randn(rng, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


def formula_matmul(q, k, x, scale=None, alpha=None, beta=None, normalize="none"):
    """Y = exp(τ q kᵀ − α − β) X in float64, straight from the definition."""
    q, k, x = q.double(), k.double(), x.double()
    tau = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = tau * q @ k.transpose(-1, -2)
    if beta is not None:
        s = s - beta.double()[..., None, :]
    if normalize == "row":
        s = s - torch.logsumexp(s, -1, keepdim=True)
    if alpha is not None:
        s = s - alpha.double()[..., :, None]
    return torch.exp(s) @ x


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,m_tokens,d,m", [(1, 1, 1, 1), (7, 257, 40, 3), (257, 7, 64, 20), (1000, 257, 1, 1)])
@pytest.mark.parametrize("normalize", ["none", "row"])
def test_matmul_matches_formula(rng, backend, n, m_tokens, d, m, normalize):
    q, k, x = randn(rng, n, d), randn(rng, m_tokens, d), randn(rng, m_tokens, m)
    alpha, beta = randn(rng, n, scale=0.3), randn(rng, m_tokens, scale=0.3)
    y = sk.affinity_matmul(q, k, x, row_offset=alpha, col_offset=beta, normalize=normalize, backend=backend)
    assert y.shape == (n, m) and y.dtype == torch.float32
    assert rel_err(y, formula_matmul(q, k, x, alpha=alpha, beta=beta, normalize=normalize)) < 2e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logsumexp_and_row_lse(rng, backend):
    q, k, x = randn(rng, 3, 33, 40), randn(rng, 3, 70, 40), randn(rng, 3, 70, 2)
    beta = randn(rng, 3, 70)
    r = sk.affinity_logsumexp(q, k, col_offset=beta, backend=backend)
    ref = torch.logsumexp(q.double() @ k.double().transpose(1, 2) / math.sqrt(40) - beta.double()[:, None], -1)
    assert r.shape == (3, 33)
    assert (r.double() - ref).abs().max() < 1e-5
    _, lse = sk.affinity_matmul(q, k, x, col_offset=beta, normalize="row", return_lse=True, backend=backend)
    assert (lse.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,m_tokens", [(1, 1), (7, 257), (300, 301)])
def test_row_and_column_lse_from_one_call(rng, backend, n, m_tokens, monkeypatch):
    """return_col_lse: both LSEs (one pass on the torch backend; ragged tiles, batch dims)."""
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 64)
    q, k = randn(rng, 2, 3, n, 5), randn(rng, 2, 3, m_tokens, 5)
    r, c = sk.affinity_logsumexp(q, k, return_col_lse=True, backend=backend)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(5)
    assert r.shape == (2, 3, n) and c.shape == (2, 3, m_tokens)
    assert (r.double() - torch.logsumexp(s, -1)).abs().max() < 1e-5
    assert (c.double() - torch.logsumexp(s, -2)).abs().max() < 1e-5
    # |τ q·k| up to ~1e4 with rows far apart: columns whose reweighted sums underflow are recomputed
    q, k = randn(rng, 40, 8, scale=60.0), randn(rng, 33, 8, scale=60.0)
    q[::2] *= 0.01
    r, c = sk.affinity_logsumexp(q, k, return_col_lse=True, backend=backend)
    s = q.double() @ k.double().T / math.sqrt(8)
    assert torch.isfinite(r).all() and torch.isfinite(c).all()
    # fp32 scores near 1e4 carry ~1e-3 rounding: the bound is 2× torch's own fp32 error
    s32 = q @ k.T / math.sqrt(8)
    for dim, ours in ((0, c), (1, r)):
        ref = torch.logsumexp(s, dim)
        torch_err = (torch.logsumexp(s32, dim).double() - ref).abs().max().item()
        assert (ours.double() - ref).abs().max() <= max(2 * torch_err, 2e-3)
    with pytest.raises(ValueError, match="return_col_lse=True needs col_offset=None"):
        sk.affinity_logsumexp(q, k, col_offset=torch.zeros(33), return_col_lse=True, backend=backend)
    e = sk.affinity_logsumexp(q[:0], k, return_col_lse=True, backend=backend)
    assert e[0].shape == (0,) and bool((e[1] == -math.inf).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_tiles_cover_every_row_and_column(rng, backend, monkeypatch):
    """Force many ragged tiles so the tiling logic itself is exercised."""
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 64)
    q, k, x = randn(rng, 2, 300, 5), randn(rng, 2, 301, 5), randn(rng, 2, 301, 3)
    alpha, beta = randn(rng, 2, 300), randn(rng, 2, 301)
    for normalize in ("none", "row"):
        # both offsets at once: the torch backend folds them into the score GEMM
        y = sk.affinity_matmul(q, k, x, row_offset=alpha, col_offset=beta, normalize=normalize, backend=backend)
        assert rel_err(y, formula_matmul(q, k, x, alpha=alpha, beta=beta, normalize=normalize)) < 2e-5
    r = sk.affinity_logsumexp(q, k, backend=backend)
    assert (r.double() - torch.logsumexp(q.double() @ k.double().transpose(1, 2) / math.sqrt(5), -1)).abs().max() < 1e-5
    qs, xs = randn(rng, 2, 300, 5), randn(rng, 2, 300, 3)
    a = randn(rng, 2, 300, scale=0.2)
    # q is k: the row LSE comes from the upper-triangle tiles only
    r = sk.affinity_logsumexp(qs, qs, backend=backend)
    ref = torch.logsumexp(qs.double() @ qs.double().transpose(1, 2) / math.sqrt(5), -1)
    assert (r.double() - ref).abs().max() < 1e-5
    for kk in (qs, randn(rng, 2, 300, 5)):
        y = sk.affinity_symmetric_matmul(qs, kk, xs, offset=a, backend=backend)
        assert rel_err(y, formula_symmetric(qs, kk, xs, a)) < 2e-5


def formula_symmetric(q, k, x, a, scale=None):
    tau = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = tau * q.double() @ k.double().transpose(-1, -2) - a.double()[..., :, None] - a.double()[..., None, :]
    e = torch.exp(s)
    return 0.5 * (e + e.transpose(-1, -2)) @ x.double()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("same", [True, False])
def test_symmetric_product(rng, backend, same):
    q = randn(rng, 2, 257, 40)
    k = q if same else randn(rng, 2, 257, 40)
    x, a = randn(rng, 2, 257, 3), randn(rng, 2, 257, scale=0.5)
    y = sk.affinity_symmetric_matmul(q, k, x, offset=a, backend=backend)
    assert rel_err(y, formula_symmetric(q, k, x, a)) < 2e-5


def formula_symmetric_two_offsets(q, k, x, alpha=None, beta=None):
    """½(E + Eᵀ)·X with E_ij = exp(τ q_i·k_j − α_i − β_j): Eᵀ_ij = exp(τ k_i·q_j − β_i − α_j)."""
    return 0.5 * (formula_matmul(q, k, x, alpha=alpha, beta=beta) + formula_matmul(k, q, x, alpha=beta, beta=alpha))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 257])
def test_symmetric_product_with_separate_row_and_column_offsets(rng, backend, n, monkeypatch):
    """α ≠ β (e.g. α = row LSE: ½(P + Pᵀ)·X); q is k with α ≠ β must not take the triangle."""
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 64)  # several tiles, ragged edges
    q, k, x = randn(rng, 2, 3, n, 7), randn(rng, 2, 3, n, 7), randn(rng, 2, 3, n, 4)
    alpha, beta = randn(rng, 2, 3, n), randn(rng, 3, n)  # β broadcast over the first batch dim
    for kk in (k, q):
        for kw in (dict(row_offset=alpha), dict(col_offset=beta), dict(row_offset=alpha, col_offset=beta)):
            y = sk.affinity_symmetric_matmul(q, kk, x, backend=backend, **kw)
            ref = formula_symmetric_two_offsets(q, kk, x, kw.get("row_offset"), kw.get("col_offset"))
            assert rel_err(y, ref) < 2e-5
    # α = the row LSE: ½(P + Pᵀ)·X for P = softmax(S) by rows
    r = sk.affinity_logsumexp(q, k, backend=backend)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(7), -1)
    y = sk.affinity_symmetric_matmul(q, k, x, row_offset=r, backend=backend)
    assert rel_err(y, 0.5 * (p + p.transpose(-1, -2)) @ x.double()) < 2e-5
    # offset=a is α = β = a
    a = randn(rng, 2, 3, n)
    torch.testing.assert_close(sk.affinity_symmetric_matmul(q, k, x, offset=a, backend=backend),
                               sk.affinity_symmetric_matmul(q, k, x, row_offset=a, col_offset=a.clone(),
                                                            backend=backend), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_dims_and_shared_x_head_sum(rng, backend):
    layers, heads, n, d, m = 2, 3, 33, 8, 4
    q, k = randn(rng, layers, heads, n, d), randn(rng, layers, heads, n, d)
    x_shared, w = randn(rng, n, m), torch.rand(heads, generator=rng)
    y = sk.affinity_matmul(q, k, x_shared, head_weights=w, normalize="row", backend=backend)
    per_head = formula_matmul(q, k, x_shared.expand(layers, heads, n, m), normalize="row")
    assert y.shape == (layers, n, m)
    assert rel_err(y, torch.einsum("h,lhnm->lnm", w.double(), per_head)) < 2e-5
    # per-layer X shared by that layer's heads
    x_layer = randn(rng, layers, n, m)
    y = sk.affinity_matmul(q, k, x_layer, head_weights=w, backend=backend)
    ref = torch.einsum("h,lhnm->lnm", w.double(), formula_matmul(q, k, x_layer[:, None].expand(-1, heads, -1, -1)))
    assert rel_err(y, ref) < 2e-5
    # no weights: one result per head, X broadcast over the batch
    y = sk.affinity_matmul(q, k, x_shared, backend=backend)
    assert y.shape == (layers, heads, n, m)
    assert rel_err(y, formula_matmul(q, k, x_shared)) < 2e-5
    a = randn(rng, layers, heads, n, scale=0.3)
    y = sk.affinity_symmetric_matmul(q, k, x_shared, offset=a, head_weights=w, backend=backend)
    ref = torch.einsum("h,lhnm->lnm", w.double(), formula_symmetric(q, k, x_shared.expand(layers, heads, n, m), a))
    assert rel_err(y, ref) < 2e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(rng, backend):
    q = randn(rng, 40, 2, 30)[:, 1, ::3]            # (40, 10), strided
    k = randn(rng, 10, 57).t()                      # (57, 10), transposed
    x = randn(rng, 57, 6)[:, ::2]                   # (57, 3)
    beta = randn(rng, 114)[::2]
    assert not (q.is_contiguous() or k.is_contiguous() or x.is_contiguous())
    y = sk.affinity_matmul(q, k, x, col_offset=beta, normalize="row", backend=backend)
    assert rel_err(y, formula_matmul(q, k, x, beta=beta, normalize="row")) < 2e-5


def low_precision_reference_error(q, k, x, dtype, normalize):
    """Error of torch's own low-precision computation of the same product."""
    qd, kd, xd = q.to(dtype), k.to(dtype), x.to(dtype)
    s = (qd @ kd.t()) * (1 / math.sqrt(q.shape[-1]))
    p = torch.softmax(s.float(), -1).to(dtype) if normalize == "row" else torch.exp(s.float()).to(dtype)
    return (p @ xd).double()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["none", "row"])
def test_low_precision_inputs(rng, backend, dtype, normalize):
    """FlashAttention habit: error ≤ 2× torch's own low-precision error + small atol."""
    q, k, x = randn(rng, 129, 64), randn(rng, 300, 64), randn(rng, 300, 20)
    q, k, x = q.to(dtype), k.to(dtype), x.to(dtype)  # the inputs themselves are low precision
    exact = formula_matmul(q, k, x, normalize=normalize)
    torch_err = (low_precision_reference_error(q.float(), k.float(), x.float(), dtype, normalize) - exact).abs().max()
    y = sk.affinity_matmul(q, k, x, normalize=normalize, backend=backend)
    assert y.dtype == dtype
    ours = (y.double() - exact).abs().max()
    assert ours <= 2 * torch_err + 1e-3 * exact.abs().max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_scales_stay_finite_with_log_space_offsets(rng, backend):
    """|τ q·k| up to 1e4: the LSE offsets keep every exponent ≤ 0 (row) or ≤ log 2 (sym)."""
    n, d = 64, 16
    q = randn(rng, n, d)
    q = q / q.norm(dim=-1, keepdim=True) * 100.0
    k, x = q.clone(), randn(rng, n, 3)
    scale = 1.0  # scores up to |q|·|k| = 1e4
    # fp32 scores near 1e4 carry an absolute error ~ 1e4·eps32 ≈ 1e-3 in the exponent:
    # that, not the kernel, bounds the attainable relative accuracy.
    tol = 8 * 1e4 * torch.finfo(torch.float32).eps
    y, lse = sk.affinity_matmul(q, k, x, scale=scale, normalize="row", return_lse=True, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 5e3
    assert rel_err(y, formula_matmul(q, k, x, scale=scale, normalize="row")) < tol
    r = sk.affinity_logsumexp(q, k, scale=scale, backend=backend)
    c = sk.affinity_logsumexp(k, q, scale=scale, backend=backend)
    # the same tensor as q and k takes the triangle path, whose column sums must not underflow
    r_same = sk.affinity_logsumexp(q, q, scale=scale, backend=backend)
    exact = torch.logsumexp(scale * q.double() @ q.double().t(), -1)
    assert ((r_same.double() - exact).abs() / exact.abs()).max() < 1e-6
    a = 0.5 * (torch.logaddexp(r, c) - math.log(2))
    y = sk.affinity_symmetric_matmul(q, k, x, scale=scale, offset=a, backend=backend)
    assert torch.isfinite(y).all()
    assert rel_err(y, formula_symmetric(q, k, x, a, scale=scale)) < tol
    y = sk.affinity_matmul(q, k, x, scale=scale, row_offset=r, backend=backend)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(rng, backend):
    q, k = randn(rng, 2, 7, 3, dtype=torch.float64), randn(rng, 2, 9, 3, dtype=torch.float64)
    alpha, beta = randn(rng, 2, 7, dtype=torch.float64, scale=0.3), randn(rng, 9, dtype=torch.float64, scale=0.3)
    x = randn(rng, 2, 9, 2, dtype=torch.float64).requires_grad_()
    x_shared = randn(rng, 9, 2, dtype=torch.float64).requires_grad_()
    w = torch.rand(2, generator=rng, dtype=torch.float64)

    def call(**kw):
        return lambda x_: sk.affinity_matmul(q, k, x_, backend=backend, **kw)

    assert torch.autograd.gradcheck(call(row_offset=alpha, col_offset=beta), (x,))
    assert torch.autograd.gradcheck(call(col_offset=beta, normalize="row"), (x,))
    assert torch.autograd.gradcheck(call(row_offset=alpha, normalize="row"), (x,))
    assert torch.autograd.gradcheck(call(head_weights=w, normalize="row"), (x_shared,))
    assert torch.autograd.gradcheck(call(), (x_shared,))  # X broadcast over heads
    qs = randn(rng, 2, 9, 3, dtype=torch.float64)
    a = randn(rng, 2, 9, dtype=torch.float64, scale=0.3)
    b = randn(rng, 2, 9, dtype=torch.float64, scale=0.3)
    for kk in (qs, k):
        assert torch.autograd.gradcheck(
            lambda x_: sk.affinity_symmetric_matmul(qs, kk, x_, offset=a, head_weights=w, backend=backend), (x_shared,))
        assert torch.autograd.gradcheck(
            lambda x_: sk.affinity_symmetric_matmul(qs, kk, x_, row_offset=a, col_offset=b, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(call(col_offset=beta), (x,))


def test_torch_library_ops_pass_opcheck(rng):
    from spectral_kernels.ops.affinity import _logsumexp_op, _matmul_op
    from spectral_kernels.ops.symmetric import _symmetric_op

    q, k = randn(rng, 1, 2, 7, 4), randn(rng, 1, 2, 9, 4)
    x = randn(rng, 1, 1, 9, 3).requires_grad_()
    w = torch.rand(2, generator=rng)
    beta = randn(rng, 1, 2, 9)
    torch.library.opcheck(_matmul_op, (q, k, x, 0.5, None, beta, "row", w, "torch"))
    torch.library.opcheck(_matmul_op, (q, k, x, 0.5, None, None, "none", None, "torch"))
    torch.library.opcheck(_logsumexp_op, (q, k, 0.5, beta, "torch"))
    qs = randn(rng, 1, 2, 9, 4)
    torch.library.opcheck(_symmetric_op, (qs, k, x, 0.5, beta, beta, w, "torch"))   # α = β (NCut)
    alpha = randn(rng, 1, 2, 9)
    torch.library.opcheck(_symmetric_op, (qs, k, x, 0.5, alpha, beta, None, "torch"))
    torch.library.opcheck(_symmetric_op, (qs, k, x, 0.5, alpha, None, w, "torch"))


def test_works_under_torch_compile(rng):
    q, k, x = randn(rng, 2, 16, 8), randn(rng, 2, 16, 8), randn(rng, 16, 3).requires_grad_()
    w = torch.tensor([0.25, 0.75])

    def loss(x_):
        return sk.affinity_matmul(q, k, x_, head_weights=w, normalize="row", backend="torch").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_grad, = torch.autograd.grad(loss(x), x)
    compiled_grad, = torch.autograd.grad(compiled(x), x)
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_inputs_give_empty_results(backend):
    q, k, x = torch.zeros(0, 4), torch.zeros(5, 4), torch.zeros(5, 2)
    assert sk.affinity_matmul(q, k, x, backend=backend).shape == (0, 2)
    assert sk.affinity_logsumexp(q, k, backend=backend).shape == (0,)
    y = sk.affinity_matmul(torch.ones(3, 4), torch.zeros(0, 4), torch.zeros(0, 2), backend=backend)
    assert y.shape == (3, 2) and (y == 0).all()
    assert sk.affinity_symmetric_matmul(q, q, torch.zeros(0, 2), backend=backend).shape == (0, 2)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 4), x=torch.randn(6, 2)), ValueError, "feature dimension"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(7, 2)), ValueError, "x must have one row per key"),
        (dict(q=torch.randn(5, 3).int(), k=torch.randn(6, 3), x=torch.randn(6, 2)), TypeError, "q has unsupported dtype"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3).half(), x=torch.randn(6, 2)), TypeError, "same dtype"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2).long()), TypeError, "x has unsupported"),
        (dict(q=torch.full((5, 3), math.nan), k=torch.randn(6, 3), x=torch.randn(6, 2)), ValueError, "q contains NaN"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.full((6, 2), math.inf)), ValueError, "x contains NaN"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), row_offset=torch.randn(6)), ValueError, "row_offset must have shape"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), col_offset=torch.randn(5)), ValueError, "col_offset must have shape"),
        (dict(q=torch.randn(2, 5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), col_offset=torch.randn(3, 6)), ValueError, "col_offset has batch"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), normalize="sym"), ValueError, "normalize"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), backend="gpu"), ValueError, "backend"),
        (dict(q=torch.randn(2, 5, 3), k=torch.randn(2, 6, 3), x=torch.randn(6, 2), head_weights=torch.ones(3)), ValueError, "head_weights"),
        (dict(q=torch.randn(5), k=torch.randn(6, 3), x=torch.randn(6, 2)), ValueError, "q must have at least 2"),
        (dict(q=[[1.0]], k=torch.randn(6, 3), x=torch.randn(6, 2)), TypeError, "q must be a torch.Tensor"),
        (dict(q=torch.randn(5, 3), k=torch.randn(6, 3), x=torch.randn(6, 2), scale=math.nan), ValueError, "scale"),
        (dict(q=torch.randn(3, 5, 3), k=torch.randn(2, 6, 3), x=torch.randn(6, 2)), ValueError, "batch dimensions"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sk.affinity_matmul(**kwargs)


def test_more_bad_inputs():
    with pytest.raises(ValueError, match="same number of tokens"):
        sk.affinity_symmetric_matmul(torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 2))
    with pytest.raises(ValueError, match="^offset must have shape"):
        sk.affinity_symmetric_matmul(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2), offset=torch.randn(4))
    with pytest.raises(ValueError, match="^col_offset must have shape"):
        sk.affinity_symmetric_matmul(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2), col_offset=torch.randn(4))
    with pytest.raises(ValueError, match="either offset"):
        sk.affinity_symmetric_matmul(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2), offset=torch.randn(5),
                                     row_offset=torch.randn(5))
    with pytest.raises(ValueError, match="row_offset contains NaN"):
        sk.affinity_symmetric_matmul(torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2),
                                     row_offset=torch.tensor([0.0, 1.0, math.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="q requires grad"):
        sk.affinity_matmul(torch.randn(5, 3, requires_grad=True), torch.randn(6, 3), torch.randn(6, 2))
    with pytest.raises(ValueError, match="return_lse"):
        sk.affinity_matmul(torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 2), return_lse=True)
    with pytest.raises(ValueError, match="not available"):
        sk.affinity_matmul(torch.randn(5, 3), torch.randn(6, 3), torch.randn(6, 2), backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            sk.affinity_matmul(torch.randn(5, 3), torch.randn(6, 3, device="cuda"), torch.randn(6, 2))


def test_device_mismatch_is_reported(monkeypatch):
    """Mixed devices are caught before any backend runs (meta stands in for a GPU here)."""
    with pytest.raises(ValueError, match="one device"):
        sk.affinity_matmul(torch.randn(5, 3), torch.randn(6, 3, device="meta"), torch.randn(6, 2))


def test_available_backends_and_auto_on_cpu():
    names = sk.available_backends()
    assert names[:2] == ["dense", "torch"]
    assert set(names) <= {"dense", "torch", "triton", "cuda"}
    from spectral_kernels.ops import backends

    assert backends.resolve("auto", torch.device("cpu"), torch.float32).__name__.endswith("blockwise")


class _StandInBackend:
    """A GPU backend stand-in: every call records its name and runs the blockwise torch code."""

    def __init__(self, name, ms, calls, fail=False, hidden=()):
        self.__name__, self.ms, self.calls, self.fail, self.hidden = name, ms, calls, fail, hidden

    def __getattr__(self, fn):
        def call(*args, **kwargs):
            self.calls.append((self.__name__, fn))
            if self.fail:
                raise RuntimeError("kernel failed")
            return getattr(blockwise, fn)(*args, **kwargs)
        if fn in self.hidden or not hasattr(blockwise, fn):
            raise AttributeError(fn)
        return call


def _competing_stand_ins(monkeypatch, *, cuda_ms, triton_ms):
    """cuda and triton stand-ins that "auto" sees as available and times at the given ms;
    returns ({name: stand-in}, the list of (backend, op) calls they record)."""
    from spectral_kernels.ops import backends, cuda_backend

    calls = []
    stand_ins = {"cuda": _StandInBackend("cuda", cuda_ms, calls), "triton": _StandInBackend("triton", triton_ms, calls)}
    monkeypatch.setattr(backends, "available_backends", lambda: ["dense", "torch", "triton", "cuda"])
    monkeypatch.setattr(backends, "_load", lambda name: cuda_backend if name == "cuda" else stand_ins[name])
    monkeypatch.setattr(cuda_backend, "importlib", type("M", (), {"import_module": lambda _: stand_ins["cuda"]}))

    def fake_ms(fn):
        fn()
        return stand_ins[calls[-1][0]].ms
    monkeypatch.setattr(cuda_backend, "_median_ms", fake_ms)
    monkeypatch.setattr(cuda_backend, "_CHOICES", {})
    return stand_ins, calls


def test_auto_times_the_very_call_it_dispatches(monkeypatch, rng):
    """Where cuda and triton compete, "auto" times ``run`` — the dispatched call on its real
    inputs — on each, once per key, and keeps the faster; a failing or unsupported cuda loses."""
    from spectral_kernels.ops import backends

    last = []
    stand_ins, calls = _competing_stand_ins(monkeypatch, cuda_ms=2.0, triton_ms=1.0)
    gpu = torch.device("cuda")
    q, x = torch.randn(1, 1, 9, 4, generator=rng), torch.randn(1, 1, 9, 2, generator=rng)
    a = torch.randn(1, 1, 9, generator=rng)

    def run(module):
        last.append(module.symmetric_matmul(q, q, x, scale=0.5, row_offset=a, col_offset=None))

    key = ("symmetric_same_qk_separate_offsets", 1, 9, 9, 4, 2, torch.float32)
    assert backends._auto(gpu, torch.float32, key, run) == "triton"  # 1 ms beats 2 ms
    assert calls == [("cuda", "symmetric_matmul"), ("triton", "symmetric_matmul")]
    torch.testing.assert_close(last[0], last[1])  # the real call, on each backend
    assert backends._auto(gpu, torch.float32, key, run) == "triton" and len(calls) == 2  # cached by key
    stand_ins["cuda"].ms = 0.5
    assert backends._auto(gpu, torch.float32, key, run) == "triton"  # still the cached choice
    key_b = ("symmetric_same_qk", *key[1:])
    assert backends._auto(gpu, torch.float32, key_b, run) == "cuda"  # another op: timed anew
    d_too_large = ("symmetric_same_qk", 1, 9, 9, 512, 2, torch.float32)
    n_calls = len(calls)
    assert backends._auto(gpu, torch.float32, d_too_large, run) == "triton" and len(calls) == n_calls
    stand_ins["cuda"].fail = True
    assert backends._auto(gpu, torch.float32, ("symmetric", *key[1:]), run) == "triton"


def test_auto_times_nothing_during_a_cuda_graph_capture(monkeypatch, rng):
    """Timing synchronises, which would break the caller's capture: during one, "auto" takes
    triton untimed and uncached, and times the shape at its next eager call."""
    from spectral_kernels.ops import backends, cuda_backend

    _, calls = _competing_stand_ins(monkeypatch, cuda_ms=0.5, triton_ms=1.0)
    q, x = torch.randn(1, 1, 9, 4, generator=rng), torch.randn(1, 1, 9, 2, generator=rng)
    key = ("matmul_row", 1, 9, 9, 4, 2, torch.float32)

    def run(module):
        module.matmul(q, q, x, scale=0.5, normalize="row")

    gpu = torch.device("cuda")
    monkeypatch.setattr(cuda_backend, "_stream_capturing", lambda: True)
    assert backends._auto(gpu, torch.float32, key, run) == "triton"
    assert calls == [] and key not in cuda_backend._CHOICES
    monkeypatch.setattr(cuda_backend, "_stream_capturing", lambda: False)
    assert backends._auto(gpu, torch.float32, key, run) == "cuda"  # 0.5 ms beats 1 ms, timed now
    assert [name for name, _ in calls] == ["cuda", "triton"] and cuda_backend._CHOICES[key] is True


@pytest.mark.parametrize("case", ["matmul", "softmax", "logsumexp", "rows_cols", "symmetric", "symmetric_qq",
                                  "symmetric_separate", "pair"])
def test_each_op_hands_auto_its_own_key_and_call(monkeypatch, rng, case):
    """The key names the op (and the variants that run differently: q is k, α ≠ β), and
    ``run`` makes the op's real backend call(s), its fallbacks included."""
    from spectral_kernels.ops import backends

    seen, calls = [], []
    # without a fused pair or row+column LSE: the ops' fallbacks run
    two_pass = _StandInBackend("two_pass", 1.0, calls, hidden=("matmul_pair", "logsumexp_rows_and_cols"))

    def resolve(backend, device, dtype, shape_key=None, run=None):
        seen.append((shape_key, run))
        return blockwise

    monkeypatch.setattr(backends, "resolve", resolve)
    q, k = torch.randn(2, 7, 3, generator=rng), torch.randn(2, 7, 3, generator=rng)
    x, a = torch.randn(2, 7, 2, generator=rng), torch.randn(2, 7, generator=rng)
    op, fns = {
        "matmul": (lambda: sk.affinity_matmul(q, k, x), ("matmul_none", ["matmul"])),
        "softmax": (lambda: sk.affinity_matmul(q, k, x, normalize="row"), ("matmul_row", ["matmul"])),
        "logsumexp": (lambda: sk.affinity_logsumexp(q, k), ("logsumexp", ["logsumexp"])),
        "rows_cols": (lambda: sk.affinity_logsumexp(q, k, return_col_lse=True),
                      ("logsumexp_rows_and_cols", ["logsumexp", "logsumexp"])),
        "symmetric": (lambda: sk.affinity_symmetric_matmul(q, k, x, offset=a), ("symmetric", ["symmetric_matmul"])),
        "symmetric_qq": (lambda: sk.affinity_symmetric_matmul(q, q, x, offset=a),
                         ("symmetric_same_qk", ["symmetric_matmul"])),
        "symmetric_separate": (lambda: sk.affinity_symmetric_matmul(q, k, x, row_offset=a),
                               ("symmetric_separate_offsets", ["symmetric_matmul"])),
        "pair": (lambda: sk.affinity_matmul_pair(q, k, x, x, row_offset=a), ("pair", ["matmul", "matmul"])),
    }[case]
    expected = op()
    (key, run), = seen
    name, two_pass_calls = fns
    assert key == (name, 2, 7, 7, 3, 2 if case not in ("logsumexp", "rows_cols") else None, torch.float32)
    out = run(two_pass)
    assert [fn for _, fn in calls] == two_pass_calls
    first = expected[0] if isinstance(expected, tuple) else expected
    got = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(got.reshape(-1), first.reshape(-1))  # the op's own result


def test_import_does_not_initialise_cuda_or_import_triton():
    import subprocess
    import sys

    code = ("import sys, torch, spectral_kernels as sk; sk.available_backends(); "
            "print(torch.cuda.is_initialized(), 'triton' in sys.modules and not sk.ops.backends.triton_interpreted())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "TRITON_INTERPRET": "0"}).stdout.split()
    assert out[0] == "False"


def test_eager_calls_skip_the_custom_op_machinery():
    """Plain eager calls run the implementation directly: no torch._dynamo import (~1 s on
    the first custom-op call) and no dispatch; autograd and torch.compile use the ops."""
    import subprocess
    import sys

    code = ("import sys, torch, spectral_kernels as sk; q = torch.randn(2, 30, 8); x = torch.randn(2, 30, 3); "
            "sk.affinity_matmul(q, q, x, normalize='row'); sk.affinity_logsumexp(q, q); "
            "sk.affinity_symmetric_matmul(q, q, x); sk.affinity_matmul_pair(q, q, x, x); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "TRITON_INTERPRET": "0"}).stdout.split()
    assert out == ["False"]


@pytest.mark.slow
def test_blockwise_memory_stays_linear_at_60000_tokens():
    """N = M = 60 000, d = 8, m = 2: a dense product would need > 14 GB; we stay < 1.5 GB."""
    import subprocess
    import sys

    code = r"""
import resource, torch, spectral_kernels as sk
torch.manual_seed(0)
n = 60_000
q, k, x = torch.randn(n, 8), torch.randn(n, 8), torch.randn(n, 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = sk.affinity_matmul(q, k, x, normalize="row", backend="torch")
r = sk.affinity_logsumexp(q, k, backend="torch")
z = sk.affinity_symmetric_matmul(q, q, x, offset=0.5 * r, backend="torch")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(y).all() and torch.isfinite(z).all()
print((after - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    assert growth_mb < 1500, f"peak RSS grew by {growth_mb:.0f} MB"
