"""ncut_loss against a dense transcription of the official objective (float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from spectral_kernels.objective import ncut_loss, off_diagonal


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
