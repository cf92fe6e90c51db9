"""affinity_matmul_pair: (E·X, Eᵀ·W) from one pass, against float64 formulas."""
import math

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.ops import blockwise

BACKENDS = ["dense", "torch"]


def randn(rng, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


def formula_pair(q, k, x, w, alpha=None, beta=None, scale=None):
    tau = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    s = tau * q.double() @ k.double().transpose(-1, -2)
    if alpha is not None:
        s = s - alpha.double()[..., :, None]
    if beta is not None:
        s = s - beta.double()[..., None, :]
    e = torch.exp(s)
    return e @ x.double(), e.transpose(-1, -2) @ w.double()


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m_tokens,d,m", [(1, 1, 1, 1), (7, 257, 40, 3), (257, 33, 5, 20)])
def test_pair_matches_formula(rng, backend, n, m_tokens, d, m):
    q, k = randn(rng, 2, n, d), randn(rng, 2, m_tokens, d)
    x, w = randn(rng, m_tokens, m), randn(rng, 2, n, m)        # x shared by the batch, w per entry
    alpha, beta = randn(rng, 2, n, scale=0.3), randn(rng, m_tokens, scale=0.3)
    y, yt = sk.affinity_matmul_pair(q, k, x, w, row_offset=alpha, col_offset=beta, backend=backend)
    ry, ryt = formula_pair(q, k, x.expand(2, -1, -1), w, alpha, beta.expand(2, -1))
    assert y.shape == (2, n, m) and yt.shape == (2, m_tokens, m)
    assert rel(y, ry) < 2e-5 and rel(yt, ryt) < 2e-5


def test_pair_tiles_cover_everything(rng, monkeypatch):
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 64)
    q, k = randn(rng, 3, 300, 6), randn(rng, 3, 301, 6)
    x, w = randn(rng, 3, 301, 4), randn(rng, 3, 300, 4)
    lse = sk.affinity_logsumexp(q, k)
    y, yt = sk.affinity_matmul_pair(q, k, x, w, row_offset=lse, backend="torch")
    ry, ryt = formula_pair(q, k, x, w, alpha=lse)
    assert rel(y, ry) < 2e-5 and rel(yt, ryt) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_gradcheck(rng, backend):
    q, k = randn(rng, 2, 3, 7, 4, dtype=torch.float64), randn(rng, 2, 3, 9, 4, dtype=torch.float64)
    x = randn(rng, 9, 2, dtype=torch.float64).requires_grad_()          # shared by all heads
    w = randn(rng, 2, 3, 7, 2, dtype=torch.float64).requires_grad_()    # per head
    a = randn(rng, 2, 3, 7, dtype=torch.float64, scale=0.3)
    assert torch.autograd.gradcheck(
        lambda x_, w_: sk.affinity_matmul_pair(q, k, x_, w_, row_offset=a, backend=backend), (x, w))


def test_pair_quadratic_form_gradient_is_one_pass(rng):
    """zᵀPz per head and its gradient (P + Pᵀ)z both come from the pair."""
    q, k = randn(rng, 3, 50, 8), randn(rng, 3, 50, 8)
    z = randn(rng, 50, 4, dtype=torch.float64)
    lse = sk.affinity_logsumexp(q.double(), k.double())
    pz, ptz = sk.affinity_matmul_pair(q.double(), k.double(), z, z, row_offset=lse)
    p = torch.softmax(q.double() @ k.double().transpose(1, 2) / math.sqrt(8), -1)
    zz = z.clone().requires_grad_()
    torch.einsum("nk,hnm,mk->", zz, p, zz).backward()
    assert torch.allclose((pz + ptz).sum(0), zz.grad, atol=1e-8)


def test_pair_torch_library_opcheck(rng):
    from spectral_kernels.ops.pair import _pair_op

    q, k = randn(rng, 1, 2, 7, 4), randn(rng, 1, 2, 9, 4)
    x, w = randn(rng, 1, 1, 9, 3).requires_grad_(), randn(rng, 1, 2, 7, 3).requires_grad_()
    torch.library.opcheck(_pair_op, (q, k, x, w, 0.5, None, randn(rng, 1, 2, 9), "torch"))


def test_pair_on_triton_backend_matches(rng):
    """The Triton backend (interpreted on CPU) serves the pair, fused or by two products."""
    if "triton" not in sk.available_backends():
        pytest.skip("triton backend not available")
    q, k = randn(rng, 2, 9, 5), randn(rng, 2, 11, 5)
    x, w = randn(rng, 11, 3), randn(rng, 2, 9, 3)
    a = randn(rng, 2, 9, scale=0.3)
    y, yt = sk.affinity_matmul_pair(q, k, x, w, row_offset=a, backend="triton")
    ry, ryt = formula_pair(q, k, x.expand(2, -1, -1), w, alpha=a)
    assert rel(y, ry) < 1e-4 and rel(yt, ryt) < 1e-4


def test_pair_errors():
    q, k = torch.randn(5, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="w must have one row per query"):
        sk.affinity_matmul_pair(q, k, torch.randn(6, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="same width"):
        sk.affinity_matmul_pair(q, k, torch.randn(6, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="x must have one row per key"):
        sk.affinity_matmul_pair(q, k, torch.randn(5, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="w contains NaN"):
        sk.affinity_matmul_pair(q, k, torch.randn(6, 2), torch.full((5, 2), math.nan))
    with pytest.raises(TypeError, match="w has unsupported dtype"):
        sk.affinity_matmul_pair(q, k, torch.randn(6, 2), torch.ones(5, 2, dtype=torch.long))
