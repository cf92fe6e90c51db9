"""Operators against dense float64 matrices built from the DESIGN.md §2 formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from spectral_kernels.models.capture import LayerCapture
from spectral_kernels.operators import (AffinityOperator, DenseOperator, KQAffinity, PooledOperator, SumOperator,
                                        VVAffinity, layer_operator, multilayer_operator)
from spectral_kernels.pooling import GridPooling

RTOL = 2e-5  # fp32 products against float64 references


# ----------------------------------------------------------------------------- references
def normalise(a, mode):
    """One head's dense graph from its affinity A (float64)."""
    if mode == "none":
        return a
    if mode == "row":
        return a / a.sum(1, keepdim=True)
    w = 0.5 * (a + a.T)
    d = w.sum(1)
    return w / torch.sqrt(d[:, None] * d[None, :])


def dense_graph(q, k, scale, mode, weights=None):
    """Σ_h w_h·normalise(exp(τ q_h k_hᵀ)) with w normalised to sum 1 (uniform by default)."""
    q, k = q.double(), k.double()
    if q.dim() == 2:
        q, k = q[None], k[None]
    heads = q.shape[0]
    w = torch.full((heads,), 1.0 / heads, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    return sum(w[h] * normalise(torch.exp(scale * q[h] @ k[h].T), mode) for h in range(heads))


def dense_vv(v, t, mode, weights=None):
    u = F.normalize(v.double(), dim=-1)
    return dense_graph(u, u, 1.0 / t, mode, weights)


def pool_matrix(base_grid, grid, n_extra=0, extra_tokens="drop"):
    """G (n_tokens, n_base) from torch's adaptive_avg_pool2d applied to the base-grid basis."""
    n_base = base_grid[0] * base_grid[1]
    basis = torch.eye(n_base, dtype=torch.float64).reshape(n_base, 1, *base_grid)
    g = F.adaptive_avg_pool2d(basis, grid).reshape(n_base, -1).T
    if extra_tokens == "mean" and n_extra:
        g = torch.cat([torch.full((n_extra, n_base), 1.0 / n_base, dtype=torch.float64), g])
    return g


def close(actual, expected, rtol=RTOL):
    expected = expected.to(actual.dtype) if actual.dtype == torch.float64 else expected
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rtol * expected.double().abs().max().item() + 1e-12
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def randn(rng, *shape, scale=1.0):
    return torch.randn(*shape, generator=rng) * scale


# ----------------------------------------------------------------------------- KQ / VV
@pytest.mark.parametrize("mode", ["sym", "row", "none"])
@pytest.mark.parametrize("heads", [None, 3])
def test_kq_matches_dense(rng, mode, heads):
    n, d, m = 37, 5, 4
    shape = (n, d) if heads is None else (heads, n, d)
    q, k = randn(rng, *shape), randn(rng, *shape)
    weights = None if heads is None else torch.rand(heads, generator=rng) + 0.1
    op = KQAffinity(q, k, normalize=mode, head_weights=weights)
    ref = dense_graph(q, k, 1 / math.sqrt(d), mode, weights)
    x = randn(rng, n, m)
    assert op.shape == (n, n) and op.dtype == torch.float32 and op.device == q.device
    close(op @ x, ref @ x.double())
    close(op.matmul(x[:, 0]), ref @ x[:, 0].double())  # vectors too
    close(op.adjoint_matmul(x), ref.T @ x.double())
    close(op.T @ x, ref.T @ x.double())
    assert op.is_symmetric == (mode == "sym")


def test_kq_accepts_single_image_batch_and_custom_scale(rng):
    q, k = randn(rng, 1, 2, 20, 6), randn(rng, 1, 2, 20, 6)
    op = KQAffinity(q, k, normalize="row", scale=0.3)
    close(op.to_dense(), dense_graph(q[0], k[0], 0.3, "row"))


@pytest.mark.parametrize("mode", ["sym", "row", "none"])
def test_vv_matches_dense(rng, mode):
    v = randn(rng, 2, 29, 7, scale=3.0)  # unnormalised: the operator must normalise
    t = 0.25
    op = VVAffinity(v, temperature=t, normalize=mode)
    ref = dense_vv(v, t, mode)
    x = randn(rng, 29, 3)
    close(op @ x, ref @ x.double())
    close(op.adjoint_matmul(x), ref.T @ x.double())
    assert op.is_symmetric == (mode != "row")
    assert op.scores_symmetric  # q and k are one tensor: backends skip half the tiles


def test_fp64_inputs_give_fp64_products(rng):
    q, k = randn(rng, 15, 3).double(), randn(rng, 15, 3).double()
    op = KQAffinity(q, k)
    assert op.dtype == torch.float64
    torch.testing.assert_close(op.to_dense(), dense_graph(q, k, 1 / math.sqrt(3), "sym"), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory", ["kq", "vv", "pooled", "sum"])
def test_symmetric_operators_are_self_adjoint(rng, factory):
    n = 24
    if factory == "kq":
        op = KQAffinity(randn(rng, 2, n, 4), randn(rng, 2, n, 4))
    elif factory == "vv":
        op = VVAffinity(randn(rng, n, 4), temperature=0.3)
    elif factory == "pooled":
        op = PooledOperator(KQAffinity(randn(rng, 12, 4), randn(rng, 12, 4)), GridPooling((4, 6), (3, 4)))
    else:
        op = KQAffinity(randn(rng, n, 4), randn(rng, n, 4)) + 0.5 * VVAffinity(randn(rng, n, 4), normalize="none")
    assert op.is_symmetric
    x, y = randn(rng, n, 3).double(), randn(rng, n, 3).double()
    lhs = x.T @ (op @ y).double()
    rhs = (op @ x).double().T @ y
    assert (lhs - rhs).abs().max() <= 1e-5 * lhs.abs().max()


def test_sym_stays_finite_for_huge_scores(rng):
    """Log-space degrees: exp(τ q·k) would overflow fp32 (and fp64) here; M must not."""
    q, k = randn(rng, 40, 8, scale=60.0), randn(rng, 40, 8, scale=60.0)
    op = KQAffinity(q, k)
    dense = op.to_dense()
    assert torch.isfinite(dense).all()
    u = op.trivial_eigenvector()
    # M·sqrt(d) = sqrt(d) even when every d_i is astronomically large. An fp32 exponent of
    # size ~1e4 is resolved to ulp(8192) ≈ 1e-3 — that is fp32's precision here, not an
    # error of the method — and each entry carries a few such roundings (scores, offsets,
    # LSE), hence a bound of a few ulp: far below anything an overflow or a lost offset gives.
    close(op @ u, u, rtol=4e-3)


def test_trivial_eigenvector_of_ncut_operator(rng):
    op = VVAffinity(randn(rng, 33, 5), temperature=0.2)
    u = op.trivial_eigenvector()
    assert u.shape == (33,) and abs(float(torch.linalg.vector_norm(u)) - 1) < 1e-6
    close(op @ u, u)
    assert KQAffinity(randn(rng, 2, 33, 5), randn(rng, 2, 33, 5)).trivial_eigenvector() is None
    assert VVAffinity(randn(rng, 33, 5), normalize="row").trivial_eigenvector() is None


def test_statistics_are_cached(rng, monkeypatch):
    import spectral_kernels.operators.affinity as module
    calls = []
    real = module.affinity_logsumexp
    monkeypatch.setattr(module, "affinity_logsumexp", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    op = KQAffinity(randn(rng, 20, 4), randn(rng, 20, 4))
    x = randn(rng, 20, 2)
    op @ x, op @ x, op.adjoint_matmul(x)
    assert len(calls) == 1  # row and column LSE, once, from one pass
    r = torch.logsumexp(op.q[0].double() @ op.k[0].double().T * op.scale, -1)
    c = torch.logsumexp(op.q[0].double() @ op.k[0].double().T * op.scale, 0)
    close(op.row_lse()[0], r, rtol=1e-6)
    close(op.col_lse()[0], c, rtol=1e-6)
    vv = VVAffinity(randn(rng, 20, 4))
    vv @ x, vv @ x
    assert len(calls) == 2  # S symmetric: column LSE = row LSE


def test_gradient_flows_to_x(rng):
    op = KQAffinity(randn(rng, 2, 9, 3).double(), randn(rng, 2, 9, 3).double(), normalize="row")
    x = randn(rng, 9, 2).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: op @ t, (x,))


# ----------------------------------------------------------------------------- algebra
def test_operator_algebra(rng):
    n = 21
    a = KQAffinity(randn(rng, n, 3), randn(rng, n, 3), normalize="row")
    b = VVAffinity(randn(rng, n, 3), temperature=0.5)
    c = KQAffinity(randn(rng, n, 3), randn(rng, n, 3))
    da, db, dc = (op.to_dense().double() for op in (a, b, c))
    x = randn(rng, n, 2)
    close((a + 0.5 * b) @ x, (da + 0.5 * db) @ x.double())
    close((a - b / 4) @ x, (da - db / 4) @ x.double())
    close((2 * (a + b) + c * 3) @ x, (2 * da + 2 * db + 3 * dc) @ x.double())
    close(sum([a, b, c]) @ x, (da + db + dc) @ x.double())
    close((-a).T @ x, -da.T @ x.double())
    total = 0.5 * (a + b) + c
    assert isinstance(total, SumOperator) and len(total.terms) == 3  # nested sums flatten
    assert not (a + b).is_symmetric and (b + c).is_symmetric
    assert (0.5 * c).trivial_eigenvector() is not None and (b + c).trivial_eigenvector() is None
    dense = DenseOperator(db)
    close(dense @ x.double(), db @ x.double())
    assert dense.is_symmetric and not DenseOperator(da).is_symmetric


def test_algebra_errors(rng):
    a = KQAffinity(randn(rng, 10, 3), randn(rng, 10, 3))
    b = KQAffinity(randn(rng, 11, 3), randn(rng, 11, 3))
    with pytest.raises(ValueError, match="one shape"):
        a + b
    with pytest.raises(TypeError):
        a + torch.ones(10, 10)
    with pytest.raises(TypeError):
        a * "2"


# ----------------------------------------------------------------------------- pooled / captures
def make_capture(rng, name, grid, heads=2, d=4, n_extra=1, scale=None):
    n = n_extra + grid[0] * grid[1]
    q, k, v = (randn(rng, 1, heads, n, d) for _ in range(3))
    return LayerCapture(name, q, k, v, grid, n_extra, scale)


def layer_reference(cap, graph, mode, base_grid, extra_tokens, t=0.1):
    start = cap.n_extra if extra_tokens == "drop" else 0
    if graph == "kq":
        m = dense_graph(cap.q[0, :, start:], cap.k[0, :, start:], cap.scale, mode)
    else:
        m = dense_vv(cap.v[0, :, start:], t, mode)
    g = pool_matrix(base_grid, cap.grid, cap.n_extra, extra_tokens)
    return g.T @ m @ g


@pytest.mark.parametrize("extra_tokens", ["drop", "mean"])
@pytest.mark.parametrize("graph", ["kq", "vv"])
def test_multilayer_pooled_sum_matches_dense(rng, graph, extra_tokens):
    base = (6, 7)
    caps = [make_capture(rng, "l0", base), make_capture(rng, "l1", (4, 5)),
            make_capture(rng, "l2", (4, 5)), make_capture(rng, "l3", (3, 2), heads=3, n_extra=0, scale=0.7)]
    weights = [0.4, 0.1, 0.3, 0.2]
    op = multilayer_operator(caps, graph=graph, layer_weights=weights, extra_tokens=extra_tokens, temperature=0.3)
    ref = sum(w * layer_reference(c, graph, "sym", base, extra_tokens, 0.3) for c, w in zip(caps, weights))
    assert op.shape == (42, 42) and op.is_symmetric
    x = randn(rng, 42, 3)
    close(op @ x, ref @ x.double())
    # Layers l1 and l2 share grid and scale: fused into one operator (three terms, not four).
    assert isinstance(op, SumOperator) and len(op.terms) == 3


def test_multilayer_head_weights(rng):
    caps = [make_capture(rng, "a", (4, 5), heads=3), make_capture(rng, "b", (4, 5), heads=3)]
    hw = torch.tensor([0.2, 0.0, 0.8])
    op = multilayer_operator(caps, graph="vv", head_weights=hw, layer_weights=[1.0, 3.0], temperature=0.5)
    refs = [dense_vv(c.v[0, :, 1:], 0.5, "sym", hw) for c in caps]
    x = randn(rng, 20, 2)
    close(op @ x, (refs[0] + 3 * refs[1]) @ x.double())
    with pytest.raises(ValueError, match="head_weights"):
        multilayer_operator(caps, head_weights=torch.ones(2))


def test_layer_operator_row_mode_and_adjoint(rng):
    cap = make_capture(rng, "l", (3, 4), n_extra=2)
    op = layer_operator(cap, graph="kq", normalize="row", base_grid=(5, 5), extra_tokens="mean")
    ref = layer_reference(cap, "kq", "row", (5, 5), "mean")
    x = randn(rng, 25, 2)
    close(op @ x, ref @ x.double())
    close(op.adjoint_matmul(x), ref.T @ x.double())
    same_grid = layer_operator(cap, graph="vv")
    assert isinstance(same_grid, VVAffinity) and same_grid.shape == (12, 12)  # CLS dropped, no pooling


def test_pooled_errors(rng):
    cap = make_capture(rng, "l", (3, 4))
    with pytest.raises(ValueError, match="graph"):
        layer_operator(cap, graph="qq")
    with pytest.raises(ValueError, match="image"):
        layer_operator(cap, image=1)
    with pytest.raises(ValueError, match="extra_tokens"):
        layer_operator(cap, extra_tokens="keep")
    with pytest.raises(ValueError, match="pooling produces"):
        PooledOperator(KQAffinity(randn(rng, 13, 2), randn(rng, 13, 2)), GridPooling((4, 4), (3, 4)))
    with pytest.raises(ValueError, match="layer_weights"):
        multilayer_operator([cap, cap], layer_weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        multilayer_operator([])


# ----------------------------------------------------------------------------- input errors
def test_constructor_errors(rng):
    q = randn(rng, 2, 10, 3)
    with pytest.raises(ValueError, match="normalize"):
        KQAffinity(q, q, normalize="softmax")
    with pytest.raises(ValueError, match="same"):
        KQAffinity(q, randn(rng, 2, 11, 3))
    with pytest.raises(ValueError, match="q must be"):
        KQAffinity(randn(rng, 2, 2, 10, 3), randn(rng, 2, 2, 10, 3))
    with pytest.raises(ValueError, match="head_weights"):
        KQAffinity(q, q, head_weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        KQAffinity(q, q, head_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="temperature"):
        VVAffinity(q, temperature=0.0)
    with pytest.raises(ValueError, match="NaN"):
        KQAffinity(torch.full((4, 2), float("nan")), randn(rng, 4, 2))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        KQAffinity([[1.0]], q)


def test_product_errors(rng):
    op = KQAffinity(randn(rng, 10, 3), randn(rng, 10, 3))
    with pytest.raises(ValueError, match="10 rows"):
        op @ randn(rng, 9, 2)
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, m\)"):
        op @ randn(rng, 10, 2, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op @ [1.0]
    with pytest.raises(ValueError, match="NaN"):
        op @ torch.full((10, 1), float("inf"))


def test_base_class_is_abstract():
    class Empty(AffinityOperator):
        shape, device, dtype = (3, 3), torch.device("cpu"), torch.float32
    with pytest.raises(NotImplementedError):
        Empty() @ torch.ones(3)


def test_knn_graph_is_an_operator_for_eigsh(rng):
    """A sparse kNN graph goes straight into eigsh; symmetry is detected per normalisation."""
    from spectral_kernels import eigsh, knn_graph
    from spectral_kernels.operators import SparseOperator, as_operator

    feats = torch.randn(120, 6, generator=rng).abs()  # non-negative cosines: edges above threshold 0
    ids = torch.arange(120) // 40
    sym = knn_graph(feats, feats, n_intra=8, n_inter=4, image_ids=ids, threshold=0.0, normalize="sym")
    op = as_operator(sym)
    assert isinstance(op, SparseOperator) and op.is_symmetric
    dense = sym.to_dense().double()
    x = torch.randn(120, 3, generator=rng)
    assert torch.allclose(op @ x, (dense @ x.double()).float(), atol=1e-5)
    vals, vecs = eigsh(op, 4, tol=1e-7)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:4]
    assert torch.allclose(vals.double(), ref, rtol=1e-4, atol=1e-5)
    walk = as_operator(knn_graph(feats, feats, n_intra=8, n_inter=4, image_ids=ids, threshold=0.0, normalize="row"))
    assert not walk.is_symmetric
    dense_walk = walk.to_dense().double()
    assert torch.allclose(walk.adjoint_matmul(x).double(), dense_walk.T @ x.double(), atol=1e-5)
    with pytest.raises(TypeError, match="sparse"):
        SparseOperator(torch.eye(3))
