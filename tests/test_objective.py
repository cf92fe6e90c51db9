"""ncut_loss against a dense transcription of the official objective (float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from spectral_kernels.objective import (eigen_terms, ncut_loss, ncut_quadratic_form, off_diagonal,
                                        softmax_quadratic_form, symmetric_offsets)
from spectral_kernels.ops import affinity_logsumexp, affinity_matmul, affinity_symmetric_matmul


# tiny problems: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------- dense reference
def official_dense(matrix_input, feat, symmetric):
    """The official single-image ncut_loss written out densely (DESIGN.md §3, official code).

    matrix_input (H, N, N) is the softmax attention for symmetric=0 and the matrix whose exp
    is A for symmetric=1; feat (1, K, h, w) already on the affinity's grid.
    """
    z = feat.reshape(feat.shape[0], feat.shape[1], -1)            # (1, K, N)
    if symmetric:
        a = matrix_input.exp()
        w = 0.5 * (a + a.transpose(1, 2))
        d = w.sum(-1)                                              # (H, N)
        lap = (torch.diag_embed(d) - w) / torch.sqrt(d[:, :, None] * d[:, None, :])
        z = F.normalize(z * d.sqrt()[:, None, :], dim=-1)          # (H, K, N)
        # eig[h, g, k] = z_h,k · L_g z_g,k
        eig = torch.einsum("hkn,gnm,gkm->hgk", z, lap, z)
    else:
        z = F.normalize(z, dim=-1)
        eig = torch.einsum("bkn,hnm,bkm->bhk", z, matrix_input, z)
    gram = z @ z.transpose(1, 2)
    ortho = torch.stack([gram[b][~torch.eye(gram.shape[1], dtype=torch.bool)] for b in range(gram.shape[0])])
    return eig, ortho.reshape(-1)


def dense_layer(q, k, feat, symmetric, n_extra=0, extra_tokens="drop"):
    """Reference for one q/k layer: scores, CLS handling and pooling written out densely."""
    n = q.shape[1]
    side = math.isqrt(n - n_extra)
    s = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    pooled = F.adaptive_avg_pool2d(feat, side)
    if n_extra and extra_tokens == "drop":
        s = s[:, n_extra:, n_extra:]
        z = pooled
    elif n_extra:
        grid_rows = pooled.flatten(2)
        cls = feat.flatten(2).mean(-1, keepdim=True).expand(-1, -1, n_extra)
        z = torch.cat([cls, grid_rows], -1)[..., None]
    else:
        z = pooled
    return official_dense(s if symmetric else s.softmax(-1), z, symmetric)


def total_loss(terms, symmetric, w_eig=2.0, w_orth=2.0):
    eig = torch.cat([e.reshape(-1) for e, _ in terms])
    ortho = torch.cat([o.reshape(-1) for _, o in terms])
    return w_eig * (eig - (1 - symmetric)).abs().mean() + w_orth * ortho.pow(2).mean()


def random_layers(rng, specs, d=16):
    layers = []
    for heads, side, n_extra in specs:
        n = side * side + n_extra
        q = torch.randn(heads, n, d, generator=rng, dtype=torch.float64) * 1.5
        k = torch.randn(heads, n, d, generator=rng, dtype=torch.float64) * 1.5
        layers.append((q, k, n_extra))
    return layers


def rel_err(a, b):
    return float((a - b).detach().abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("symmetric", [0, 1])
@pytest.mark.parametrize("extra_tokens", ["drop", "mean"])
def test_loss_and_gradient_match_dense_official(rng, symmetric, extra_tokens):
    layers = random_layers(rng, [(3, 8, 0), (2, 4, 0), (3, 4, 1), (2, 8, 1)])
    logits64 = torch.randn(1, 5, 8, 8, generator=rng, dtype=torch.float64)

    ref_logits = logits64.clone().requires_grad_(True)
    feat = ref_logits.softmax(1)
    ref = total_loss([dense_layer(q, k, feat, symmetric, e, extra_tokens) for q, k, e in layers], symmetric)
    ref.backward()

    logits = logits64.float().requires_grad_(True)
    feat = logits.softmax(1)
    ours = total_loss([ncut_loss(q.float(), k.float(), feat, symmetric=symmetric, n_extra=e,
                                 extra_tokens=extra_tokens) for q, k, e in layers], symmetric)
    ours.backward()
    assert rel_err(ours.double(), ref.detach()) < 1e-5
    assert rel_err(logits.grad.double(), ref_logits.grad) < 1e-5


@pytest.mark.parametrize("symmetric", [0, 1])
def test_output_shapes_follow_official_layout(rng, symmetric):
    q = torch.randn(4, 16, 8, generator=rng)
    feat = torch.rand(1, 3, 8, 8, generator=rng)
    eig, ortho = ncut_loss(q, q.clone(), feat, symmetric=symmetric)
    assert eig.shape == ((4, 4, 3) if symmetric else (1, 4, 3))
    assert ortho.shape == ((4 * 3 * 2,) if symmetric else (3 * 2,))
    eig_b, _ = ncut_loss(q[None].expand(2, -1, -1, -1), q[None].expand(2, -1, -1, -1).clone(),
                         feat.expand(2, -1, -1, -1), symmetric=symmetric)
    assert eig_b.shape == ((2, 4, 4, 3) if symmetric else (2, 4, 3))
    torch.testing.assert_close(eig_b[0], eig.reshape(eig_b.shape[1:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [0, 1])
def test_dense_input_is_the_official_function(rng, symmetric):
    q, k, _ = random_layers(rng, [(3, 4, 0)])[0]
    q, k = q.float(), k.float()
    feat = torch.randn(1, 4, 8, 8, generator=rng).softmax(1)
    s = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    affinity = s if symmetric else s.softmax(-1)
    ref = official_dense(affinity.double(), F.adaptive_avg_pool2d(feat, 4).double(), symmetric)
    for out in (ncut_loss(affinity, feat, symmetric), ncut_loss(affinity, None, feat, symmetric=symmetric)):
        assert rel_err(out[0].double(), ref[0]) < 1e-5
        assert rel_err(out[1].double(), ref[1]) < 1e-5
    # The q/k form computes the same numbers as the dense form.
    ours = ncut_loss(q, k, feat, symmetric=symmetric)
    assert rel_err(ours[0].double(), ref[0]) < 1e-5


def test_symmetric_offsets_survive_large_scores(rng):
    # exp(τ q·k) overflows fp32 here; the log-space degrees keep every term finite.
    q = torch.randn(2, 16, 8, generator=rng) * 40
    feat = torch.rand(1, 3, 4, 4, generator=rng)
    eig, ortho = ncut_loss(q, q, feat, symmetric=1)
    assert torch.isfinite(eig).all() and torch.isfinite(ortho).all()
    assert (eig.diagonal(dim1=0, dim2=1) > -1e-4).all()  # L is positive semi-definite


def test_off_diagonal_order():
    g = torch.arange(9.0).reshape(3, 3)
    assert off_diagonal(g).tolist() == [1, 2, 3, 5, 6, 7]


def test_errors_name_the_argument(rng):
    q = torch.randn(2, 16, 8, generator=rng)
    feat = torch.rand(1, 3, 4, 4, generator=rng)
    with pytest.raises(ValueError, match="symmetric"):
        ncut_loss(q, q, feat, symmetric=2)
    with pytest.raises(ValueError, match="K ≥ 2"):
        ncut_loss(q, q, feat[:, :1])
    with pytest.raises(ValueError, match="feat has batch"):
        ncut_loss(q, q, feat.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="grid"):
        ncut_loss(q[:, :15], q[:, :15], feat)
    with pytest.raises(ValueError, match="feat"):
        ncut_loss(q, q, feat.flatten(2))
    bad = feat.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="feat contains NaN"):
        ncut_loss(q, q, bad)
    with pytest.raises(ValueError, match="n_extra"):
        ncut_loss(q, q, feat, n_extra=-1)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ncut_loss([1.0], q, feat)


# --------------------------------------------------------------------------- one-pass quadratic form
def two_pass_eigen_terms(q, k, x, backend):
    """The former symmetric=0 path: online-softmax P·Z, gradient by the transposed product."""
    z = F.normalize(x, dim=-2)
    pz = affinity_matmul(q, k, z.unsqueeze(-3), normalize="row", backend=backend)
    return (pz * z.unsqueeze(-3)).sum(-2), off_diagonal(z.transpose(-1, -2) @ z)


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_one_pass_terms_equal_the_two_pass_path(rng, backend, shared_qk):
    # Layer-group layout: q, k (L, B, H, N, d), one x (1, B, N, K) for all layers; odd sizes.
    q = 1.5 * torch.randn(3, 2, 5, 37, 7, generator=rng)
    k = q if shared_qk else 1.5 * torch.randn(3, 2, 5, 37, 7, generator=rng)
    x0 = torch.rand(1, 2, 37, 6, generator=rng)
    upstream = torch.randn(3, 2, 5, 6, generator=rng)        # a generic cotangent for eigval

    results = []
    for terms in (lambda x: two_pass_eigen_terms(q, k, x, backend),
                  lambda x: eigen_terms(q, k, x, symmetric=0, backend=backend)):
        x = x0.clone().requires_grad_(True)
        eig, ortho = terms(x)
        ((eig * upstream).sum() + ortho.pow(2).sum()).backward()
        results.append((eig.detach(), ortho.detach(), x.grad))
    (eig_old, ortho_old, grad_old), (eig_new, ortho_new, grad_new) = results
    assert eig_new.shape == (3, 2, 5, 6) and grad_new.shape == x0.shape
    assert rel_err(eig_new, eig_old) < 1e-5
    assert rel_err(ortho_new, ortho_old) < 1e-6
    assert rel_err(grad_new, grad_old) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_softmax_quadratic_form_matches_dense_formula_and_gradcheck(rng, backend):
    q = 2.0 * torch.randn(2, 3, 11, 4, generator=rng, dtype=torch.float64)
    k = 2.0 * torch.randn(2, 3, 11, 4, generator=rng, dtype=torch.float64)
    z = torch.randn(11, 5, generator=rng, dtype=torch.float64, requires_grad=True)  # shared by batch and heads
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    ours = softmax_quadratic_form(q, k, z, backend=backend)
    torch.testing.assert_close(ours, torch.einsum("nk,bhnm,mk->bhk", z, p, z), rtol=1e-10, atol=1e-12)
    row_lse = affinity_logsumexp(q, k, backend=backend)
    assert torch.autograd.gradcheck(
        lambda z_: softmax_quadratic_form(q, k, z_, row_lse=row_lse, backend=backend), (z,))


def test_cached_row_lse_gives_the_same_terms(rng):
    q, k = torch.randn(2, 4, 25, 8, generator=rng), torch.randn(2, 4, 25, 8, generator=rng)
    x = torch.rand(2, 25, 3, generator=rng)
    lse = affinity_logsumexp(q, k)
    fresh = eigen_terms(q, k, x, symmetric=0)
    cached = eigen_terms(q, k, x, symmetric=0, row_lse=lse)
    torch.testing.assert_close(cached[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(cached[1], fresh[1], rtol=0, atol=0)


def test_softmax_quadratic_form_errors_and_no_second_order(rng):
    q = torch.randn(2, 9, 4, generator=rng)
    z = torch.rand(9, 3, generator=rng)
    with pytest.raises(ValueError, match="z must have one row per token"):
        softmax_quadratic_form(q, q, z[:8])
    with pytest.raises(ValueError, match="k must have as many tokens as q"):
        softmax_quadratic_form(q, q[:, :8], z)
    with pytest.raises(ValueError, match="row_lse must have shape"):
        softmax_quadratic_form(q, q, z, row_lse=torch.zeros(2, 8))
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN"):
        softmax_quadratic_form(q, q, bad)
    with pytest.raises(ValueError, match="q requires grad"):
        softmax_quadratic_form(q.clone().requires_grad_(), q, z, row_lse=torch.zeros(2, 9))
    # The saved (P + Pᵀ)z is data: a second derivative must fail loudly, not come out wrong.
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(softmax_quadratic_form(q, q, zz).sum(), zz, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_ncut_quadratic_form_equals_the_two_pass_path(rng, backend, weighted, shared_qk):
    q = 1.5 * torch.randn(3, 2, 4, 29, 5, generator=rng)
    k = q if shared_qk else 1.5 * torch.randn(3, 2, 4, 29, 5, generator=rng)
    offset = symmetric_offsets(q, k, backend=backend)
    weights = torch.rand(4, generator=rng) if weighted else None
    x0 = torch.randn(1, 2, 29, 6, generator=rng)
    upstream = torch.randn((3, 2, 6) if weighted else (3, 2, 4, 6), generator=rng)

    def two_pass(x):  # the product's own backward: a second symmetric pass
        mz = affinity_symmetric_matmul(q, k, x.unsqueeze(-3), offset=offset, head_weights=weights, backend=backend)
        return (mz * (x if weighted else x.unsqueeze(-3))).sum(-2)

    results = []
    for form in (two_pass, lambda x: ncut_quadratic_form(q, k, x, offset=offset, head_weights=weights,
                                                         backend=backend)):
        x = x0.clone().requires_grad_(True)
        values = form(x)
        (values * upstream).sum().backward()
        results.append((values.detach(), x.grad))
    (old, grad_old), (new, grad_new) = results
    assert new.shape == upstream.shape
    assert rel_err(new, old) < 1e-6
    assert rel_err(grad_new, grad_old) < 1e-5


def test_ncut_quadratic_form_matches_dense_formula_and_gradcheck(rng):
    q = torch.randn(2, 13, 4, generator=rng, dtype=torch.float64)
    k = torch.randn(2, 13, 4, generator=rng, dtype=torch.float64)
    z = torch.randn(13, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    a = torch.exp(q @ k.transpose(1, 2) / 2.0)
    w = 0.5 * (a + a.transpose(1, 2))
    d = w.sum(-1)
    m = w / torch.sqrt(d[:, :, None] * d[:, None, :])
    torch.testing.assert_close(ncut_quadratic_form(q, k, z), torch.einsum("nk,hnm,mk->hk", z, m, z),
                               rtol=1e-10, atol=1e-12)
    offset = symmetric_offsets(q, k)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z_: ncut_quadratic_form(q, k, z_, offset=offset), (z,))
    assert torch.autograd.gradcheck(
        lambda z_: ncut_quadratic_form(q, k, z_, offset=offset, head_weights=weights), (z,))
    with pytest.raises(ValueError, match="z must have one row per token"):
        ncut_quadratic_form(q, k, z.detach()[:12])
