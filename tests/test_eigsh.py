"""eigsh against dense float64 eigendecompositions (scipy/numpy), and its errors."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectral_kernels.eigsh import eigsh
from spectral_kernels.operators import CallableOperator, KQAffinity, VVAffinity, multilayer_operator


# ----------------------------------------------------------------------------- references
def ncut_dense(q, k, scale, weights=None):
    """Σ_h w_h·D^-½ W_h D^-½ with W_h = (exp(τ q kᵀ) + its transpose)/2, float64 (DESIGN.md §2)."""
    q, k = q.double(), k.double()
    if q.dim() == 2:
        q, k = q[None], k[None]
    heads = q.shape[0]
    w = torch.full((heads,), 1.0 / heads, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    total = 0
    for h in range(heads):
        a = torch.exp(scale * q[h] @ k[h].T)
        sym = 0.5 * (a + a.T)
        d = sym.sum(1)
        total = total + w[h] * sym / torch.sqrt(d[:, None] * d[None, :])
    return total


def top_eigh(matrix, k, skip=0):
    """Top-k eigenpairs (descending) of a dense symmetric float64 matrix, after the top ``skip``.

    numpy.linalg.eigh, the full dense decomposition (O(N³): the reason N stays ≤ 3000).
    """
    vals, vecs = np.linalg.eigh(matrix.numpy())
    stop = vals.shape[0] - skip
    return (torch.from_numpy(vals[stop - k:stop][::-1].copy()),
            torch.from_numpy(vecs[:, stop - k:stop][:, ::-1].copy()))


def min_principal_cosine(v_ref, v):
    q_ref = torch.linalg.qr(v_ref.double())[0]
    q = torch.linalg.qr(v.double())[0]
    return float(torch.linalg.svdvals(q_ref.T @ q).min())


def assert_matches(vals, vecs, ref_vals, ref_vecs, cos=0.999, rel=1e-5):
    assert vals.shape == ref_vals.shape and vecs.shape == ref_vecs.shape
    assert bool((vals[:-1] >= vals[1:]).all()), "eigenvalues must be descending"
    c = min_principal_cosine(ref_vecs, vecs)
    err = float(((vals.double() - ref_vals) / ref_vals.abs()).abs().max())
    assert c >= cos, f"min principal cosine {c:.6f} < {cos}"
    assert err <= rel, f"eigenvalue relative error {err:.2e} > {rel}"


def clustered(rng, n, d=32, clusters=12, spread=0.9):
    centers = torch.randn(clusters, d, generator=rng)
    labels = torch.randint(0, clusters, (n,), generator=rng)
    return centers[labels] + spread * torch.randn(n, d, generator=rng)


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("n", [700, pytest.param(3000, marks=pytest.mark.slow)])
def test_vv_ncut_on_clustered_features(rng, n, monkeypatch):
    import spectral_kernels.operators.affinity as affinity_module

    def separate_degree_pass(*args, **kwargs):
        raise AssertionError("a separate degree (LSE) pass ran")

    # single-head VV: eigsh's first product also yields the degrees (KQAffinity.fused_start)
    monkeypatch.setattr(affinity_module, "affinity_logsumexp", separate_degree_pass)
    x = clustered(rng, n)
    t = 0.2
    op = VVAffinity(x, temperature=t)
    u = F.normalize(x.double(), dim=-1)
    ref_vals, ref_vecs = top_eigh(ncut_dense(u, u, 1 / t), 10)
    vals, vecs, info = eigsh(op, 10, return_info=True)
    assert_matches(vals, vecs, ref_vals, ref_vecs)
    assert info.converged and info.n_calls == info.n_iter  # one product per iteration, degrees included
    assert float((op.row_lse()[0].double() - torch.logsumexp(u @ u.T / t, -1)).abs().max()) < 1e-5
    assert len(info.history) == info.n_iter and float(info.history[-1].max()) <= 1e-6
    assert vals.dtype == torch.float32 and vecs.dtype == torch.float32


def test_fused_start_product_matches_the_dense_operator(rng):
    x = clustered(rng, 300, d=8)
    op = VVAffinity(x, temperature=0.2)
    z = torch.randn(300, 5, generator=rng)
    x0, image = op.fused_start(z)
    u = F.normalize(x.double(), dim=-1)
    m = ncut_dense(u, u, 5.0)
    assert float((image.double() - m @ x0.double()).abs().max() / (m @ x0.double()).abs().max()) < 1e-5
    assert op.fused_start(z) is None  # degrees known now: nothing left to fuse


def test_spread_norms_take_the_separate_degree_pass(rng):
    """Norms spread too far for one safe offset: fused_start declines, eigsh takes the usual path."""
    x = F.normalize(clustered(rng, 300, d=4, clusters=5, spread=0.5), dim=-1)
    x = x * torch.linspace(1.0, 3.0, 300)[torch.randperm(300, generator=rng)][:, None]
    op = KQAffinity(x, x, scale=6.0)  # τ|q_i|² spans 6..54: beyond the fused bound
    assert op.fused_start(torch.randn(300, 4, generator=rng)) is None
    vals, vecs = eigsh(op, 6)
    # residuals against the dense float64 matrix (this graph's top eigenvalues cluster at 1,
    # so the individual vectors are not well defined, but the pairs must be eigenpairs)
    m = ncut_dense(x, x, 6.0)
    v = vecs.double()
    assert float((m @ v - v * vals.double()).abs().max()) < 1e-4
    assert float((v.T @ v - torch.eye(6, dtype=torch.float64)).abs().max()) < 1e-5
    ref_vals, _ = top_eigh(m, 6)
    assert float((vals.double() - ref_vals).abs().max()) < 1e-5


def nystrom_everywhere(monkeypatch, sample=300):
    """Nyström starts at test sizes: a small sample, and "auto" choosing it from 1 000 tokens."""
    import importlib
    eigsh_module = importlib.import_module("spectral_kernels.eigsh")  # the package attribute is the function
    monkeypatch.setattr(eigsh_module, "nystrom_sample_size", lambda n: min(sample, n - 1))
    monkeypatch.setattr(eigsh_module, "NYSTROM_MIN_N", 1000)


def test_nystrom_start_is_exact_and_reproducible(rng, monkeypatch):
    nystrom_everywhere(monkeypatch)
    x = clustered(rng, 1500, d=16)
    t = 0.25
    u = F.normalize(x.double(), dim=-1)
    ref_vals, ref_vecs = top_eigh(ncut_dense(u, u, 1 / t), 10)
    runs = []
    for _ in range(2):
        vals, vecs, info = eigsh(VVAffinity(x, temperature=t), 10, return_info=True,
                                 generator=torch.Generator().manual_seed(5))
        assert info.init == "nystrom" and info.converged
        assert_matches(vals, vecs, ref_vals, ref_vecs)
        runs.append((vals, vecs))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # the random start reaches the same pairs; "auto" below N_MIN and other graphs stay random
    vals, vecs, info = eigsh(VVAffinity(x, temperature=t), 10, init="random", return_info=True)
    assert info.init == "random"
    assert_matches(vals, vecs, ref_vals, ref_vecs)
    assert eigsh(VVAffinity(x[:900], temperature=t), 4, return_info=True)[2].init == "random"
    q = clustered(rng, 1200, d=8)
    assert eigsh(KQAffinity(q, q + 0.1) + KQAffinity(q, q - 0.1), 4, return_info=True)[2].init == "random"
    assert eigsh(VVAffinity(x, temperature=t), 4, x0=torch.randn(1500, 2), return_info=True)[2].init == "x0"


def test_nystrom_start_on_duplicated_tokens_and_cached_degrees(rng, monkeypatch):
    """Three distinct tokens repeated (an extension of rank 3 < k: the start may fall back to
    random) still give eigenpairs, with or without the degrees cached beforehand (then there
    is no fused first pass, and the extension is the start itself)."""
    nystrom_everywhere(monkeypatch)
    x = torch.randn(3, 6, generator=rng)[torch.randint(0, 3, (1200,), generator=rng)]
    u = F.normalize(x.double(), dim=-1)
    m = ncut_dense(u, u, 2.0)
    for cached in (False, True):
        op = VVAffinity(x, temperature=0.5)
        if cached:
            op.row_lse()
        vals, vecs, info = eigsh(op, 5, tol=1e-5, return_info=True)
        v = vecs.double()
        assert float((m @ v - v * vals.double()).abs().max()) < 1e-4
        assert float((v.T @ v - torch.eye(5, dtype=torch.float64)).abs().max()) < 1e-5


@pytest.mark.parametrize("exclude_trivial", [False, True])
def test_a_vanishing_fused_start_column_is_dropped(rng, monkeypatch, exclude_trivial):
    """A start column that is exactly zero (what a rank-deficient Nyström extension of
    duplicated tokens can give) must not reach the Gram matrix as 0/0 = NaN: it is dropped
    and the block refilled, and the pairs are still exact."""
    import importlib
    eigsh_module = importlib.import_module("spectral_kernels.eigsh")
    draw = eigsh_module._random_rows

    def with_zero_column(problem, columns, generator):
        z = draw(problem, columns, generator)
        z[:, 1] = 0
        return z

    monkeypatch.setattr(eigsh_module, "_random_rows", with_zero_column)
    x = clustered(rng, 400, d=8)
    u = F.normalize(x.double(), dim=-1)
    skip = 1 if exclude_trivial else 0
    ref_vals, ref_vecs = top_eigh(ncut_dense(u, u, 4.0), 4, skip=skip)
    op = VVAffinity(x, temperature=0.25)
    assert op._fusable()  # the fused start is the path under test
    vals, vecs = eigsh(op, 4, init="random", exclude_trivial=exclude_trivial)
    assert_matches(vals, vecs, ref_vals, ref_vecs)


def test_nystrom_start_of_a_multihead_kq_graph(rng, monkeypatch):
    """q ≠ k, three weighted heads: the extension is M[:, sample]·u_s with the full degrees."""
    nystrom_everywhere(monkeypatch)
    n, heads, d = 1200, 3, 16
    q = clustered(rng, heads * n, d).reshape(heads, n, d)
    k = q + 0.5 * torch.randn(heads, n, d, generator=rng)
    weights = torch.rand(heads, generator=rng) + 0.2
    op = KQAffinity(q, k, head_weights=weights)
    m = ncut_dense(q, k, 1 / math.sqrt(d), weights)
    index = torch.randperm(n, generator=rng)[:50]
    v = torch.randn(50, 4, generator=rng)
    ext = op.extend_from_sample(index, op.subsample(index), v)
    ref = m[:, index] @ v.double()
    assert float((ext.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    ref_vals, ref_vecs = top_eigh(m, 10)
    vals, vecs, info = eigsh(op, 10, return_info=True)
    assert info.init == "nystrom"
    assert_matches(vals, vecs, ref_vals, ref_vecs)


def test_nystrom_start_argument_errors(rng):
    x = clustered(rng, 400, d=8)
    with pytest.raises(ValueError, match="init must be one of"):
        eigsh(VVAffinity(x), 3, init="landmarks")
    with pytest.raises(ValueError, match="init='nystrom' needs"):
        eigsh(KQAffinity(x, x + 0.1) + VVAffinity(x), 3, init="nystrom")
    with pytest.raises(ValueError, match="init='nystrom' needs"):
        eigsh(VVAffinity(x, normalize="none"), 3, init="nystrom")
    with pytest.raises(ValueError, match="init='nystrom' needs"):
        eigsh(VVAffinity(x), 3, init="nystrom", exclude_trivial=True)
    with pytest.raises(ValueError, match="init='nystrom' and x0"):
        eigsh(VVAffinity(x), 3, init="nystrom", x0=torch.randn(400, 1))


def test_kq_heads_with_weights(rng):
    n, heads, d = 600, 3, 16
    q = clustered(rng, heads * n, d).reshape(heads, n, d)
    k = q + 0.5 * torch.randn(heads, n, d, generator=rng)
    weights = torch.rand(heads, generator=rng) + 0.2
    op = KQAffinity(q, k, head_weights=weights)
    ref_vals, ref_vecs = top_eigh(ncut_dense(q, k, 1 / math.sqrt(d), weights), 10)
    vals, vecs = eigsh(op, 10)
    assert_matches(vals, vecs, ref_vals, ref_vecs)


def test_exclude_trivial_returns_the_next_pairs(rng):
    x = clustered(rng, 600, d=16)
    op = VVAffinity(x, temperature=0.25)
    u = F.normalize(x.double(), dim=-1)
    ref_vals, ref_vecs = top_eigh(ncut_dense(u, u, 4.0), 10, skip=1)
    vals, vecs = eigsh(op, 10, exclude_trivial=True)
    assert_matches(vals, vecs, ref_vals, ref_vecs)
    trivial = op.trivial_eigenvector().double()
    assert float((trivial @ vecs.double()).abs().max()) < 1e-5


def test_warm_start_converges_at_once(rng):
    x = clustered(rng, 500, d=16)
    op = VVAffinity(x, temperature=0.3)
    vals, vecs, cold = eigsh(op, 6, return_info=True)
    vals2, vecs2, warm = eigsh(op, 6, x0=vecs, return_info=True)
    assert warm.n_iter <= 2 < cold.n_iter
    assert min_principal_cosine(vecs, vecs2) >= 0.99999
    torch.testing.assert_close(vals2, vals, rtol=1e-6, atol=0)


def test_dense_tensor_and_callable(rng):
    n = 300
    basis = torch.linalg.qr(torch.randn(n, n, generator=rng, dtype=torch.float64))[0]
    spectrum = 1.0 / (1.0 + torch.arange(n, dtype=torch.float64)) ** 0.7  # decaying, like a kernel
    sym = (basis * spectrum) @ basis.T
    sym = 0.5 * (sym + sym.T)
    ref_vals, ref_vecs = top_eigh(sym, 5)
    vals, vecs = eigsh(sym, 5)
    assert vals.dtype == torch.float64
    assert_matches(vals, vecs, ref_vals, ref_vecs, rel=1e-5)
    vals, vecs = eigsh(lambda x: (sym @ x.double()).float(), 5, n=n)
    assert_matches(vals, vecs, ref_vals, ref_vecs, cos=0.999, rel=1e-5)


def test_small_operator_fills_the_space(rng):
    """Block wider than N − k: the search space becomes all of R^N and must still be right."""
    x = torch.randn(12, 3, generator=rng)
    op = VVAffinity(x, temperature=0.5)
    u = F.normalize(x.double(), dim=-1)
    ref_vals, ref_vecs = top_eigh(ncut_dense(u, u, 2.0), 4)
    # tol 1e-5: with 12 tokens fp32 products sometimes stall just above 1e-6 (a warning)
    vals, vecs = eigsh(op, 4, tol=1e-5)
    assert_matches(vals, vecs, ref_vals, ref_vecs)


def test_multilayer_pooled_operator(rng):
    from spectral_kernels.models.capture import LayerCapture

    def capture(name, grid, heads=2, d=8):
        n = 1 + grid[0] * grid[1]
        q = clustered(rng, heads * n, d, clusters=5).reshape(1, heads, n, d)
        k = q + 0.3 * torch.randn(1, heads, n, d, generator=rng)
        return LayerCapture(name, q, k, q.clone(), grid, 1)

    caps = [capture("a", (20, 24)), capture("b", (10, 12)), capture("c", (7, 9))]
    op = multilayer_operator(caps)
    dense = op.to_dense().double()  # checked against the formulas in test_operators.py
    dense = 0.5 * (dense + dense.T)
    ref_vals, ref_vecs = top_eigh(dense, 10)
    vals, vecs = eigsh(op, 10)
    assert_matches(vals, vecs, ref_vals, ref_vecs)


def test_progress_bar_and_history(rng, capsys):
    op = VVAffinity(clustered(rng, 200, d=8), temperature=0.3)
    _, _, info = eigsh(op, 3, progress=True, return_info=True)
    assert info.history and all(h.shape == (3,) for h in info.history)
    assert float(info.history[-1].max()) < float(info.history[0].max())


def test_max_iter_warns(rng):
    op = VVAffinity(clustered(rng, 400, d=8), temperature=0.2)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, _, info = eigsh(op, 8, max_iter=1, tol=1e-12, return_info=True)
    assert not info.converged and info.n_iter == 1


def test_noise_floor_stalls_with_a_warning(rng):
    """Products noisier than tol: stop after the residuals stall instead of running max_iter."""
    n = 200
    basis = torch.linalg.qr(torch.randn(n, n, generator=rng, dtype=torch.float64))[0]
    sym = (basis / (1.0 + torch.arange(n, dtype=torch.float64))) @ basis.T
    sym = 0.5 * (sym + sym.T)

    def noisy(x):
        return sym @ x.double() + 1e-7 * torch.randn(x.shape, generator=rng, dtype=torch.float64)

    with pytest.warns(RuntimeWarning, match="stalled"):
        _, _, info = eigsh(CallableOperator(noisy, n, dtype=torch.float64), 4, tol=1e-12, return_info=True)
    assert not info.converged and info.n_iter < 200


@pytest.mark.parametrize("tol, stops", [(1e-5, "converged"), (1e-12, "stalled")])
def test_saved_state_resumes_bit_for_bit(rng, tol, stops):
    """The solver state handed to the per-iteration callback restarts the run exactly (the
    mechanism behind distributed_eigsh's checkpoints), stall detection included."""
    import dataclasses

    from spectral_kernels.eigsh import LobpcgState, LocalRows, _initial_block, _setup, _solve
    op = VVAffinity(clustered(rng, 300, d=8), temperature=0.3)
    problem = _setup(op, LocalRows(300), 4, tol=tol, max_iter=300, block_size=None, exclude_trivial=False,
                     name="eigsh")
    saved = {}

    def keep(state):
        if state.iteration == 3:
            saved["state"] = dataclasses.replace(state, history=list(state.history))

    start = _initial_block(problem, None, rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = _solve(problem, start, callback=keep, return_info=True)
        resumed = _solve(problem, saved["state"], return_info=True)
    assert isinstance(saved["state"], LobpcgState) and saved["state"].iteration == 3
    assert whole[2].converged == (stops == "converged") and resumed[2].converged == whole[2].converged
    if stops == "stalled":
        assert sum("stalled" in str(w.message) for w in caught) == 2
    torch.testing.assert_close(resumed[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(resumed[1], whole[1], rtol=0, atol=0)
    for field in ("n_iter", "n_calls", "n_columns"):
        assert getattr(resumed[2], field) == getattr(whole[2], field), field
    assert whole[2].n_iter > 3 and len(resumed[2].history) == whole[2].n_iter
    torch.testing.assert_close(torch.stack(resumed[2].history), torch.stack(whole[2].history), rtol=0, atol=0)


# ----------------------------------------------------------------------------- real features
@pytest.mark.slow
def test_dinov2_multilayer_kq(rng):
    """Exact top-10 of the 12-layer DINOv2 ViT-S/14 attention NCut operator of a skimage image."""
    models = pytest.importorskip("spectral_kernels.models")
    if not hasattr(models, "load_model"):
        pytest.skip("spectral_kernels.models.load_model is not available yet")
    skimage_data = pytest.importorskip("skimage.data")
    try:
        model = models.load_model("dinov2")
    except (FileNotFoundError, RuntimeError, ImportError) as exc:
        pytest.skip(f"DINOv2 ONNX weights not available: {exc}")
    captures = model.capture(skimage_data.astronaut(), size=336)
    op = multilayer_operator(captures, graph="kq")
    n = op.shape[0]
    assert n == 24 * 24
    # Float64 reference straight from the formulas: per layer, the mean of its heads' NCut matrices.
    ref = sum(ncut_dense(c.q[0, :, 1:], c.k[0, :, 1:], c.scale) for c in captures) / len(captures)
    ref_vals, ref_vecs = top_eigh(ref, 10)
    vals, vecs = eigsh(op, 10)
    assert_matches(vals, vecs, ref_vals, ref_vecs)


@pytest.mark.gpu
def test_kq_heads_on_cuda(rng):
    n, heads, d = 2000, 3, 32
    q = clustered(rng, heads * n, d).reshape(heads, n, d)
    k = q + 0.5 * torch.randn(heads, n, d, generator=rng)
    ref_vals, ref_vecs = top_eigh(ncut_dense(q, k, 1 / math.sqrt(d)), 10)
    vals, vecs = eigsh(KQAffinity(q.cuda(), k.cuda()), 10)
    assert vecs.device.type == "cuda"
    assert_matches(vals.cpu(), vecs.cpu(), ref_vals, ref_vecs)


# ----------------------------------------------------------------------------- errors
def test_argument_errors(rng):
    op = VVAffinity(torch.randn(20, 3, generator=rng))
    with pytest.raises(ValueError, match="k must be smaller"):
        eigsh(op, 20)
    with pytest.raises(ValueError, match="k must be at least 1"):
        eigsh(op, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        eigsh(op, 2.0)
    with pytest.raises(ValueError, match="after excluding"):
        eigsh(op, 19, exclude_trivial=True)
    with pytest.raises(ValueError, match="x0 must be"):
        eigsh(op, 2, x0=torch.randn(19, 2))
    with pytest.raises(ValueError, match="x0 has 30 columns"):
        eigsh(op, 2, x0=torch.randn(20, 30))
    with pytest.raises(ValueError, match="tol"):
        eigsh(op, 2, tol=-1.0)
    with pytest.raises(ValueError, match="needs n"):
        eigsh(lambda x: x, 2)
    with pytest.raises(TypeError, match="op must be"):
        eigsh("matrix", 2)


def test_non_symmetric_operators_are_rejected(rng):
    q, k = torch.randn(30, 4, generator=rng), torch.randn(30, 4, generator=rng)
    with pytest.raises(ValueError, match="symmetric"):
        eigsh(KQAffinity(q, k, normalize="row"), 3)
    with pytest.raises(ValueError, match="symmetric"):
        eigsh(torch.randn(30, 30, generator=rng), 3)
    a = torch.randn(30, 30, generator=rng)
    with pytest.raises(ValueError, match="not symmetric"):  # the random probe catches a callable
        eigsh(lambda x: a @ x, 3, n=30)
    with pytest.raises(ValueError, match="known trivial eigenvector"):
        eigsh(KQAffinity(q.expand(2, 30, 4), k.expand(2, 30, 4)), 3, exclude_trivial=True)


def test_nan_and_overflow_are_reported(rng):
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigsh(CallableOperator(lambda x: x * float("nan"), 25), 2)
    q = 40.0 * torch.randn(25, 4, generator=rng)  # exp(τ q·q) overflows fp32 without normalisation
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigsh(KQAffinity(q, q, normalize="none"), 2)
