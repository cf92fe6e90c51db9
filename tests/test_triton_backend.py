"""The Triton kernels themselves against the dense float64 reference.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py) with one small tile
configuration (16×16 for the row product, 32 rows × 16 columns for the symmetric one, X
sliced into 16-column launches), so shapes of 1, 7 and 33 tokens cover single partial
tiles, several tiles and a ragged last tile, 32 the unmasked (even) paths, m = 20 two
slices of X, and the symmetric q-is-k walk a diagonal band of two tiles. The pair kernel
runs 32-row × 16-column tiles, so N ≠ M and a swapped tile size would show. Tests marked
``gpu`` run larger shapes with the compiled, autotuned kernels on a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch

from spectral_kernels.ops import (affinity_logsumexp, affinity_matmul, affinity_matmul_pair,
                                  affinity_symmetric_matmul, available_backends)
from spectral_kernels.ops import reference

tb = pytest.importorskip("spectral_kernels.ops.triton_backend")

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="triton backend unavailable (no GPU and no TRITON_INTERPRET)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 7, 33)
# (d, m) pairs. d and m are compile-time constants, so on a GPU every pair is a compile
# (slow for fp32 ieee dots): there, two pairs cover the masked and the narrow cases.
FEATURE_WIDTHS = ([(d, m) for d in (1, 40) for m in (1, 3, 20)] if DEVICE == "cpu"
                  else [(1, 3), (40, 20)])


def _randn(rng, *shape, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * std).to(device=DEVICE, dtype=dtype)


def _err(y, y_ref):
    """Max error relative to the reference's largest entry."""
    y_ref = y_ref.double().cpu()
    return ((y.double().cpu() - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-30)).item()


def _f64(*tensors):
    return [None if t is None else t.double().cpu() for t in tensors]


# --------------------------------------------------------------------------- fp32, direct backend calls
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("m_tokens", SIZES)
@pytest.mark.parametrize("d,width", FEATURE_WIDTHS)
def test_matmul_and_logsumexp_match_reference(rng, n, m_tokens, d, width):
    q, k = _randn(rng, 1, 2, n, d), _randn(rng, 1, 2, m_tokens, d)
    x = _randn(rng, 1, 2, m_tokens, width)
    alpha, beta = _randn(rng, 1, 2, n), _randn(rng, 1, 2, m_tokens)
    scale = 1.0 / math.sqrt(d)
    for normalize in ("none", "row"):
        y, lse = tb.matmul(q, k, x, scale=scale, row_offset=alpha, col_offset=beta, normalize=normalize)
        y_ref, lse_ref = reference.matmul(*_f64(q, k, x), scale=scale, row_offset=alpha.double().cpu(),
                                          col_offset=beta.double().cpu(), normalize=normalize)
        assert y.dtype == torch.float32 and y.shape == (1, 2, n, width)
        assert _err(y, y_ref) < 1e-5, normalize
        if normalize == "row":
            torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=1e-5, atol=1e-5)
        else:
            assert lse is None
    r = tb.logsumexp(q, k, scale=scale, col_offset=beta)
    r_ref = reference.logsumexp(*_f64(q, k), scale=scale, col_offset=beta.double().cpu())
    torch.testing.assert_close(r.double().cpu(), r_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES + (32,))
@pytest.mark.parametrize("shared", (True, False), ids=("q_is_k", "q_ne_k"))
@pytest.mark.parametrize("width", (1, 20))
def test_symmetric_matches_reference(rng, n, shared, width):
    d = 40
    q = _randn(rng, 2, 3, n, d)
    k = q if shared else _randn(rng, 2, 3, n, d)
    x = _randn(rng, 2, 3, n, width)
    offset = _randn(rng, 2, 3, n)
    y = tb.symmetric_matmul(q, k, x, scale=0.2, offset=offset)
    y_ref = reference.symmetric_matmul(*_f64(q, k, x), scale=0.2, offset=offset.double().cpu())
    assert y.shape == (2, 3, n, width)
    assert _err(y, y_ref) < 1e-5


def test_symmetric_same_tensor_uses_triangle(rng, monkeypatch):
    """q is k → the kernel's SAME_QK variant; an equal copy of q → the full walk; same result."""
    q, x = _randn(rng, 1, 1, 33, 8), _randn(rng, 1, 1, 33, 3)
    seen = []
    kernel = tb._kernels()[2]["auto"]
    launch = kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs["SAME_QK"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    y_tri = tb.symmetric_matmul(q, q, x, scale=0.5)
    y_full = tb.symmetric_matmul(q, q.clone(), x, scale=0.5)
    assert seen[0] is True and seen[-1] is False
    # Two fp32 summation orders of signed terms: each within (n − 1)·u·Σ_j |E_ij x_j| of the
    # exact sum (u = 2⁻²⁴), whatever the cancellation (a fixed rtol failed ~1 run in 500).
    magnitude = reference.symmetric_matmul(*_f64(q, q, x.abs()), scale=0.5)
    bound = 2 * (q.shape[-2] - 1) * 2.0 ** -24 * magnitude
    assert bool(((y_tri.double().cpu() - y_full.double().cpu()).abs() <= bound).all())
    # q is k but α ≠ β: E is not symmetric, no triangle
    a = _randn(rng, 1, 1, 33)
    y = tb.symmetric_matmul(q, q, x, scale=0.5, row_offset=a)
    assert seen[-1] is False
    assert _err(y, reference.symmetric_matmul(*_f64(q, q, x), scale=0.5, row_offset=_f64(a)[0])) < 1e-5


def _symmetric_ref(q, k, x, scale, alpha=None, beta=None, **kw):
    return reference.symmetric_matmul(*_f64(q, k, x), scale=scale, row_offset=_f64(alpha)[0],
                                      col_offset=_f64(beta)[0], **kw)


@pytest.mark.parametrize("walk", ("rect", "paired"))
@pytest.mark.parametrize("n", SIZES + (32, 64))
def test_symmetric_walks_with_row_and_column_offsets(rng, monkeypatch, walk, n):
    """Both walks of q ≠ k (and of q is k with α ≠ β), every offset combination: the paired
    walk's band (64 = two row blocks of 32) and ragged tiles, the rectangle's atomics."""
    monkeypatch.setenv("SPECTRAL_KERNELS_SYMMETRIC_WALK", walk)
    q, k, x = _randn(rng, 2, 2, n, 12), _randn(rng, 2, 2, n, 12), _randn(rng, 2, 2, n, 5)
    alpha, beta = _randn(rng, 2, 2, n), _randn(rng, 2, 2, n)
    for kk in (k, q):
        for a, b in ((None, None), (alpha, None), (None, beta), (alpha, beta)):
            if kk is q and a is None and b is None:
                continue  # the SAME_QK walk (its own tests)
            y = tb.symmetric_matmul(q, kk, x, scale=0.3, row_offset=a, col_offset=b)
            assert y.shape == (2, 2, n, 5)
            assert _err(y, _symmetric_ref(q, kk, x, 0.3, a, b)) < 1e-5
    y = tb.symmetric_matmul(q, k, x, scale=0.3, offset=alpha)  # α = β, q ≠ k
    assert _err(y, _symmetric_ref(q, k, x, 0.3, alpha, alpha)) < 1e-5


@pytest.mark.parametrize("walk", ("rect", "paired"))
def test_symmetric_walks_head_sum_strided_and_low_precision(rng, monkeypatch, walk):
    monkeypatch.setenv("SPECTRAL_KERNELS_SYMMETRIC_WALK", walk)
    heads, n = 3, 45
    q = _randn(rng, 1, heads, n, 24)[..., ::2]                       # strided features
    k = _randn(rng, 1, heads, n, 12)
    x = _randn(rng, 1, 1, n, 2).expand(1, heads, n, 2)               # shared by the heads
    alpha = _randn(rng, 1, heads, n)
    w = torch.rand(heads, generator=rng, dtype=torch.float64).to(DEVICE, torch.float32)
    y = tb.symmetric_matmul(q, k, x, scale=0.4, row_offset=alpha, head_weights=w)
    assert y.shape == (1, n, 2)
    assert _err(y, _symmetric_ref(q, k, x, 0.4, alpha, None, head_weights=w.double().cpu())) < 1e-5
    for dtype in (torch.float16, torch.bfloat16):
        ql, kl, xl = q.to(dtype), k.to(dtype), x.to(dtype)
        y = tb.symmetric_matmul(ql, kl, xl, scale=0.4, row_offset=alpha)
        y_low = reference.symmetric_matmul(ql.cpu(), kl.cpu(), xl.cpu(), scale=0.4, row_offset=alpha.cpu(),
                                           dtype=dtype)
        _lowp_tolerance_check(y, _symmetric_ref(ql, kl, xl, 0.4, alpha), y_low)


def test_kernel_settings_are_checked(rng, monkeypatch):
    q, x = _randn(rng, 1, 1, 7, 4), _randn(rng, 1, 1, 7, 2)
    monkeypatch.setenv("SPECTRAL_KERNELS_SYMMETRIC_WALK", "diagonal")
    with pytest.raises(ValueError, match="SPECTRAL_KERNELS_SYMMETRIC_WALK"):
        tb.symmetric_matmul(q, q.clone(), x, scale=0.5)
    monkeypatch.delenv("SPECTRAL_KERNELS_SYMMETRIC_WALK")
    monkeypatch.setenv("SPECTRAL_KERNELS_FP32_DOT", "tf32")  # plain tf32 is not fp32 accuracy
    with pytest.raises(ValueError, match="SPECTRAL_KERNELS_FP32_DOT"):
        tb.matmul(q, q, x, scale=0.5)
    monkeypatch.setenv("SPECTRAL_KERNELS_FP32_DOT", "ieee")
    y, _ = tb.matmul(q, q, x, scale=0.5)
    assert _err(y, reference.matmul(*_f64(q, q, x), scale=0.5)[0]) < 1e-5


def test_symmetric_head_sum(rng):
    heads = 3
    v = _randn(rng, heads, 33, 6)
    x = _randn(rng, 33, 2)
    w = torch.rand(heads, generator=rng, dtype=torch.float64).to(DEVICE, torch.float32)
    offset = _randn(rng, heads, 33)
    for k in (v, _randn(rng, heads, 33, 6)):
        y = affinity_symmetric_matmul(v, k, x, offset=offset, head_weights=w, backend="triton")
        y_ref = reference.symmetric_matmul(*_f64(v[None], k[None], x.expand(1, heads, 33, 2)), scale=6 ** -0.5,
                                           offset=offset.double().cpu()[None], head_weights=w.double().cpu())
        assert y.shape == (33, 2)
        assert _err(y, y_ref[0]) < 1e-5


def test_non_contiguous_inputs(rng):
    """Transposed, sliced and stride-0 views are read by strides, not copied."""
    base_q = _randn(rng, 3, 20, 2, 9)  # (H, d', G, N) storage order
    q = base_q.permute(2, 0, 3, 1)[..., ::2]  # (G=2, H=3, N=9, d=10), strided in every dim
    k = _randn(rng, 2, 3, 12, 33).transpose(-1, -2)[..., :10]  # (2, 3, 33, 10), column-major slice
    x = _randn(rng, 2, 1, 33, 6)[..., ::2].expand(2, 3, 33, 3)  # stride 0 over heads
    beta = _randn(rng, 33).expand(2, 3, 33)
    assert not q.is_contiguous() and not k.is_contiguous() and x.stride(1) == 0
    for normalize in ("none", "row"):
        y, _ = tb.matmul(q, k, x, scale=0.3, col_offset=beta, normalize=normalize)
        y_ref, _ = reference.matmul(*_f64(q, k, x), scale=0.3, col_offset=beta.double().cpu(),
                                    normalize=normalize)
        assert _err(y, y_ref) < 1e-5
    ks = _randn(rng, 2, 3, 9, 20)[..., ::2]
    xs = _randn(rng, 2, 9, 3).unsqueeze(1).expand(2, 3, 9, 3)
    y = tb.symmetric_matmul(q, ks, xs, scale=0.3)
    assert _err(y, reference.symmetric_matmul(*_f64(q, ks, xs), scale=0.3)) < 1e-5


# --------------------------------------------------------------------------- low precision
def _lowp_tolerance_check(y, y_ref, y_torch_lowp, atol=1e-3):
    """FlashAttention-style: error ≤ 2× torch's own error at that precision, plus atol."""
    err, torch_err = _err(y, y_ref), _err(y_torch_lowp, y_ref)
    assert math.isfinite(err) and err <= 2 * torch_err + atol, (err, torch_err)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("normalize", ("none", "row"))
def test_low_precision_matmul(rng, dtype, normalize):
    q, k, x = (_randn(rng, 1, 2, 33, 40, dtype=dtype), _randn(rng, 1, 2, 33, 40, dtype=dtype),
               _randn(rng, 1, 2, 33, 20, dtype=dtype))
    y, lse = tb.matmul(q, k, x, scale=40 ** -0.5, normalize=normalize)
    y_ref, _ = reference.matmul(*_f64(q, k, x), scale=40 ** -0.5, normalize=normalize)
    y_low, _ = reference.matmul(q.cpu(), k.cpu(), x.cpu(), scale=40 ** -0.5, normalize=normalize, dtype=dtype)
    _lowp_tolerance_check(y, y_ref, y_low)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("shared", (True, False), ids=("q_is_k", "q_ne_k"))
def test_low_precision_symmetric(rng, dtype, shared):
    q = _randn(rng, 1, 2, 33, 40, dtype=dtype)
    k = q if shared else _randn(rng, 1, 2, 33, 40, dtype=dtype)
    x = _randn(rng, 1, 2, 33, 20, dtype=dtype)
    y = tb.symmetric_matmul(q, k, x, scale=40 ** -0.5)
    y_ref = reference.symmetric_matmul(*_f64(q, k, x), scale=40 ** -0.5)
    y_low = reference.symmetric_matmul(q.cpu(), k.cpu(), x.cpu(), scale=40 ** -0.5, dtype=dtype)
    _lowp_tolerance_check(y, y_ref, y_low)


def test_fp16_without_offsets_does_not_overflow(rng):
    """exp(s) > 65504 must not become inf (then inf·0 = NaN) in the fp16 P·X dot."""
    q = torch.nn.functional.normalize(_randn(rng, 1, 1, 7, 4), dim=-1).to(torch.float16)
    x = _randn(rng, 1, 1, 7, 3, dtype=torch.float16)
    x[..., 0] = 0.0
    y, _ = tb.matmul(q, q, x, scale=30.0)  # scores up to 30: exp(30) ≈ 1e13, fine in fp32
    y_ref, _ = reference.matmul(*_f64(q, q, x), scale=30.0)
    assert y_ref.abs().max() > 1e6
    assert torch.isfinite(y).all()
    assert _err(y, y_ref) < 5e-3


def test_mixed_dtypes_bf16_scores_fp32_x(rng):
    q, k = _randn(rng, 1, 1, 33, 8, dtype=torch.bfloat16), _randn(rng, 1, 1, 7, 8, dtype=torch.bfloat16)
    x = _randn(rng, 1, 1, 7, 3)
    y, _ = tb.matmul(q, k, x, scale=0.5, normalize="row")
    y_ref, _ = reference.matmul(*_f64(q, k, x), scale=0.5, normalize="row")
    assert _err(y, y_ref) < 1e-5  # scores exact from bf16 inputs, fp32 everything else


# --------------------------------------------------------------------------- extreme scales
def test_extreme_scales_with_log_space_offsets(rng):
    """|τ q·k| up to ~1e4: LSE-based offsets keep every exponent ≤ log 2 → finite, correct."""
    n, d = 33, 16
    q = _randn(rng, 1, 1, n, d)
    q = q / q.norm(dim=-1, keepdim=True)
    k = q[:, :, torch.randperm(n, generator=rng)]
    scale = 1e4
    x = _randn(rng, 1, 1, n, 3)
    q64, k64, x64 = _f64(q, k, x)
    r = tb.logsumexp(q, k, scale=scale)
    c = tb.logsumexp(k, q, scale=scale)
    r_ref = reference.logsumexp(q64, k64, scale=scale)
    assert r.abs().max() > 5e3
    torch.testing.assert_close(r.double().cpu(), r_ref, rtol=1e-6, atol=0)

    y, lse = tb.matmul(q, k, x, scale=scale, normalize="row")
    y_off, _ = tb.matmul(q, k, x, scale=scale, row_offset=r)
    y_ref, _ = reference.matmul(q64, k64, x64, scale=scale, normalize="row")
    for out in (y, y_off):
        assert torch.isfinite(out).all()
        assert _err(out, y_ref) < 5e-3  # fp32 scores of size 1e4 carry ~1e-3 absolute error

    log_degree = torch.logaddexp(r, c) - math.log(2.0)
    a = 0.5 * log_degree
    y_sym = tb.symmetric_matmul(q, k, x, scale=scale, offset=a)
    y_sym_ref = reference.symmetric_matmul(q64, k64, x64, scale=scale, offset=a.double().cpu())
    assert torch.isfinite(y_sym).all()
    assert _err(y_sym, y_sym_ref) < 5e-3


# --------------------------------------------------------------------------- gradients, errors
def test_gradient_matches_dense_backend(rng):
    q, k = _randn(rng, 3, 7, 5), _randn(rng, 3, 33, 5)
    w = torch.rand(3, generator=rng, dtype=torch.float64).to(DEVICE, torch.float32)
    beta = _randn(rng, 3, 33)
    cot = _randn(rng, 7, 4)
    cot_sym = _randn(rng, 33, 4)
    x0 = _randn(rng, 33, 4)
    grads = {}
    for backend in ("triton", "dense"):
        x = x0.clone().requires_grad_(True)
        y = affinity_matmul(q, k, x, col_offset=beta, normalize="row", head_weights=w, backend=backend)
        y_sym = affinity_symmetric_matmul(k, k, x, head_weights=w, backend=backend)
        ((y * cot).sum() + (y_sym * cot_sym).sum()).backward()
        grads[backend] = x.grad
    torch.testing.assert_close(grads["triton"], grads["dense"].to(grads["triton"].dtype), rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_argument(rng):
    q, k, x = _randn(rng, 1, 1, 7, 4), _randn(rng, 1, 1, 5, 4), _randn(rng, 1, 1, 5, 2)
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        tb.matmul(q.double(), k, x, scale=1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        tb.matmul(q, k, x[:, :, :4], scale=1.0)
    with pytest.raises(ValueError, match="k must have shape"):
        tb.logsumexp(q, k[..., :3], scale=1.0)
    with pytest.raises(ValueError, match="row_offset must have shape"):
        tb.matmul(q, k, x, scale=1.0, row_offset=_randn(rng, 1, 1, 5))
    with pytest.raises(ValueError, match="head_weights must have 1 entries"):
        tb.matmul(q, k, x, scale=1.0, head_weights=torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="same number of tokens"):
        tb.symmetric_matmul(q, k, x, scale=1.0)
    with pytest.raises(ValueError, match="normalize"):
        tb.matmul(q, k, x, scale=1.0, normalize="col")


def test_empty_rows(rng):
    q, k, x = _randn(rng, 1, 1, 0, 4), _randn(rng, 1, 1, 5, 4), _randn(rng, 1, 1, 5, 2)
    y, lse = tb.matmul(q, k, x, scale=1.0, normalize="row")
    assert y.shape == (1, 1, 0, 2) and lse.shape == (1, 1, 0)


# --------------------------------------------------------------------------- pair product (E·X, Eᵀ·W)
def _pair_ref(q, k, x, w, scale, alpha=None, beta=None):
    return reference.matmul_pair(*_f64(q, k, x, w), scale=scale, row_offset=_f64(alpha)[0],
                                 col_offset=_f64(beta)[0])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("m_tokens", SIZES)
@pytest.mark.parametrize("d,width", FEATURE_WIDTHS)
def test_pair_matches_reference(rng, n, m_tokens, d, width):
    """No offsets and both offsets; 32-row × 16-column tiles over N ≠ M, ragged on both sides."""
    _check_pair_offsets(rng, n, m_tokens, d, width, ((False, False), (True, True)))


@pytest.mark.parametrize("n,m_tokens", [(33, 7), (7, 33)])
def test_pair_one_sided_offsets(rng, n, m_tokens):
    _check_pair_offsets(rng, n, m_tokens, 40, 20, ((True, False), (False, True)))


def _check_pair_offsets(rng, n, m_tokens, d, width, offset_flags):
    q, k = _randn(rng, 2, 2, n, d), _randn(rng, 2, 2, m_tokens, d)
    x, w = _randn(rng, 2, 2, m_tokens, width), _randn(rng, 2, 2, n, width)
    alpha, beta = _randn(rng, 2, 2, n), _randn(rng, 2, 2, m_tokens)
    scale = 1.0 / math.sqrt(d)
    for has_alpha, has_beta in offset_flags:
        a, b = (alpha if has_alpha else None), (beta if has_beta else None)
        y, yt = tb.matmul_pair(q, k, x, w, scale=scale, row_offset=a, col_offset=b)
        y_ref, yt_ref = _pair_ref(q, k, x, w, scale, a, b)
        assert y.dtype == yt.dtype == torch.float32
        assert y.shape == (2, 2, n, width) and yt.shape == (2, 2, m_tokens, width)
        # 3e-5: signed x/w make these sums cancel (errors relative to the largest entry);
        # 1e-5 failed about once in a thousand random cases at d = 1
        assert _err(y, y_ref) < 3e-5 and _err(yt, yt_ref) < 3e-5, (a is not None, b is not None)


@pytest.mark.parametrize("n,m_tokens", [(32, 64), (64, 32)])
def test_pair_even_tiles(rng, n, m_tokens):
    """N and M multiples of both tile sizes, d and m equal to their padded widths: unmasked paths."""
    q, k = _randn(rng, 1, 1, n, 16), _randn(rng, 1, 1, m_tokens, 16)
    x, w = _randn(rng, 1, 1, m_tokens, 16), _randn(rng, 1, 1, n, 16)
    alpha, beta = _randn(rng, 1, 1, n), _randn(rng, 1, 1, m_tokens)
    y, yt = tb.matmul_pair(q, k, x, w, scale=0.25, row_offset=alpha, col_offset=beta)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.25, alpha, beta)
    assert _err(y, y_ref) < 1e-5 and _err(yt, yt_ref) < 1e-5


def test_pair_strided_and_head_shared_operands(rng):
    """x and w as stride-0 views over the heads, strided q/k, broadcast offsets: read by strides."""
    q = _randn(rng, 2, 3, 33, 20)[..., ::2]                     # (2, 3, 33, 10), strided features
    k = _randn(rng, 2, 3, 12, 7).transpose(-1, -2)[..., :10]    # (2, 3, 7, 10), column-major slice
    x = _randn(rng, 2, 1, 7, 6)[..., ::2].expand(2, 3, 7, 3)    # stride 0 over heads, strided lanes
    w = _randn(rng, 2, 33, 3).unsqueeze(1).expand(2, 3, 33, 3)
    beta = _randn(rng, 7).expand(2, 3, 7)
    alpha = _randn(rng, 2, 3, 33)
    assert x.stride(1) == 0 and w.stride(1) == 0 and not q.is_contiguous()
    y, yt = tb.matmul_pair(q, k, x, w, scale=0.3, row_offset=alpha, col_offset=beta)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.3, alpha, beta)
    assert _err(y, y_ref) < 1e-5 and _err(yt, yt_ref) < 1e-5
    # The head dim of 1 (not yet expanded) is accepted too.
    y1, yt1 = tb.matmul_pair(q, k, x[:, :1], w[:, :1], scale=0.3, row_offset=alpha, col_offset=beta)
    torch.testing.assert_close(y1, y)
    torch.testing.assert_close(yt1, yt)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
def test_pair_low_precision(rng, dtype):
    q, k = _randn(rng, 1, 2, 33, 40, dtype=dtype), _randn(rng, 1, 2, 7, 40, dtype=dtype)
    x, w = _randn(rng, 1, 2, 7, 20, dtype=dtype), _randn(rng, 1, 2, 33, 20, dtype=dtype)
    alpha = _randn(rng, 1, 2, 33, dtype=torch.float32)
    y, yt = tb.matmul_pair(q, k, x, w, scale=40 ** -0.5, row_offset=alpha)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 40 ** -0.5, alpha)
    y_low, yt_low = reference.matmul_pair(q, k, x, w, scale=40 ** -0.5, row_offset=alpha.to(dtype), dtype=dtype)
    _lowp_tolerance_check(y, y_ref, y_low)
    _lowp_tolerance_check(yt, yt_ref, yt_low)


def test_pair_mixed_dtypes(rng):
    """bf16 scores, fp32 x (ieee P·X), fp16 w (tf32 Pᵀ·W): each dot follows its own operand."""
    q, k = _randn(rng, 1, 1, 33, 8, dtype=torch.bfloat16), _randn(rng, 1, 1, 7, 8, dtype=torch.bfloat16)
    x, w = _randn(rng, 1, 1, 7, 3), _randn(rng, 1, 1, 33, 3, dtype=torch.float16)
    beta = _randn(rng, 1, 1, 7)
    y, yt = tb.matmul_pair(q, k, x, w, scale=0.5, col_offset=beta)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.5, None, beta)
    assert _err(y, y_ref) < 1e-5   # scores exact from bf16 inputs, fp32 everything else
    assert _err(yt, yt_ref) < 2e-3  # p rounded to tf32 (10-bit mantissa) for the fp16 w dot


def test_pair_fp16_without_offsets_does_not_overflow(rng):
    """exp(s) > 65504 must stay finite in both fp16 dots (then inf·0 would be NaN)."""
    q = torch.nn.functional.normalize(_randn(rng, 1, 1, 7, 4), dim=-1).to(torch.float16)
    x = _randn(rng, 1, 1, 7, 3, dtype=torch.float16)
    x[..., 0] = 0.0
    y, yt = tb.matmul_pair(q, q, x, x, scale=30.0)
    y_ref, yt_ref = _pair_ref(q, q, x, x, 30.0)
    assert y_ref.abs().max() > 1e6
    assert torch.isfinite(y).all() and torch.isfinite(yt).all()
    assert _err(y, y_ref) < 5e-3 and _err(yt, yt_ref) < 5e-3


def test_pair_extreme_scale_with_row_lse(rng):
    """|τ q·k| up to ~1e4 with α = row LSE: E = P is row-stochastic, every exponent ≤ 0."""
    q = torch.nn.functional.normalize(_randn(rng, 1, 1, 33, 16), dim=-1)
    k = torch.nn.functional.normalize(_randn(rng, 1, 1, 7, 16), dim=-1)
    x, w = _randn(rng, 1, 1, 7, 3), _randn(rng, 1, 1, 33, 3)
    r = tb.logsumexp(q, k, scale=1e4)
    assert r.abs().max() > 1e3
    y, yt = tb.matmul_pair(q, k, x, w, scale=1e4, row_offset=r)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 1e4, r)
    assert torch.isfinite(y).all() and torch.isfinite(yt).all()
    assert _err(y, y_ref) < 5e-3 and _err(yt, yt_ref) < 5e-3  # fp32 scores of 1e4 carry ~1e-3 error


@pytest.mark.parametrize("n,m_tokens", [(33, 7), (32, 7), (7, 32)], ids=("ragged", "even_rows", "even_cols"))
def test_pair_large_opposite_offsets_stay_finite(rng, n, m_tokens):
    """α ≈ +200, β ≈ −200: real entries are moderate, but a padded row (α read as 0) would
    give exp(200) = inf and inf·0 = NaN in Eᵀ·W unless padding is masked to −inf."""
    q, k = _randn(rng, 1, 1, n, 6), _randn(rng, 1, 1, m_tokens, 6)
    x, w = _randn(rng, 1, 1, m_tokens, 3), _randn(rng, 1, 1, n, 3)
    alpha, beta = 200.0 + _randn(rng, 1, 1, n), -200.0 + _randn(rng, 1, 1, m_tokens)
    y, yt = tb.matmul_pair(q, k, x, w, scale=0.4, row_offset=alpha, col_offset=beta)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.4, alpha, beta)
    assert torch.isfinite(y).all() and torch.isfinite(yt).all()
    assert _err(y, y_ref) < 1e-4 and _err(yt, yt_ref) < 1e-4  # fp32 offsets of 200: ~2e-5 in the exponent
    # The other way round: padded columns (β read as 0) against α ≈ −200.
    y, yt = tb.matmul_pair(q, k, x, w, scale=0.4, row_offset=alpha - 400.0, col_offset=beta + 400.0)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.4, alpha - 400.0, beta + 400.0)
    assert torch.isfinite(y).all() and torch.isfinite(yt).all()
    assert _err(y, y_ref) < 1e-4 and _err(yt, yt_ref) < 1e-4


def test_pair_public_api_uses_the_fused_kernel(rng, monkeypatch):
    """backend="triton" reaches the pair kernel (not two row products); values and the gradient
    w.r.t. both x and w match the dense backend."""
    kernel = tb._kernels()[3]
    launch = kernel.run
    launches = []

    def spy(*args, **kwargs):
        launches.append(kwargs["W"])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    q, k = _randn(rng, 2, 3, 9, 5), _randn(rng, 2, 3, 33, 5)
    alpha = _randn(rng, 2, 3, 9)
    x0, w0 = _randn(rng, 33, 4), _randn(rng, 2, 3, 9, 4)   # x shared by groups and heads
    cot_y, cot_yt = _randn(rng, 2, 3, 9, 4), _randn(rng, 2, 3, 33, 4)
    out = {}
    for backend in ("triton", "dense"):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y, yt = affinity_matmul_pair(q, k, x, w, row_offset=alpha, backend=backend)
        ((y * cot_y).sum() + (yt * cot_yt).sum()).backward()
        out[backend] = (y, yt, x.grad, w.grad)
    assert len(launches) == 2  # forward and backward, one launch each (m = 4 is one slice)
    for got, want in zip(out["triton"], out["dense"]):
        assert got.shape == want.shape
        assert _err(got, want) < 1e-5


def test_pair_bad_inputs_name_the_argument(rng):
    q, k = _randn(rng, 1, 1, 7, 4), _randn(rng, 1, 1, 5, 4)
    x, w = _randn(rng, 1, 1, 5, 2), _randn(rng, 1, 1, 7, 2)
    with pytest.raises(ValueError, match="w must have shape"):
        tb.matmul_pair(q, k, x, x, scale=1.0)
    with pytest.raises(ValueError, match="w must have the same width as x"):
        tb.matmul_pair(q, k, x, _randn(rng, 1, 1, 7, 3), scale=1.0)
    with pytest.raises(TypeError, match="w has dtype torch.float64"):
        tb.matmul_pair(q, k, x, w.double(), scale=1.0)
    with pytest.raises(ValueError, match="w must have 4 dimensions"):
        tb.matmul_pair(q, k, x, w[0], scale=1.0)
    with pytest.raises(ValueError, match="col_offset must have shape"):
        tb.matmul_pair(q, k, x, w, scale=1.0, col_offset=_randn(rng, 1, 1, 7))


def test_pair_empty_sides(rng):
    q, k = _randn(rng, 1, 1, 0, 4), _randn(rng, 1, 1, 5, 4)
    y, yt = tb.matmul_pair(q, k, _randn(rng, 1, 1, 5, 2), _randn(rng, 1, 1, 0, 2), scale=1.0)
    assert y.shape == (1, 1, 0, 2) and yt.shape == (1, 1, 5, 2) and (yt == 0).all()
    y, yt = tb.matmul_pair(k, q, _randn(rng, 1, 1, 0, 2), _randn(rng, 1, 1, 5, 2), scale=1.0)
    assert y.shape == (1, 1, 5, 2) and (y == 0).all() and yt.shape == (1, 1, 0, 2)


# --------------------------------------------------------------------------- int32 slice offsets
def test_views_whose_slices_overflow_int32_offsets_are_copied(monkeypatch, rng):
    """The kernels address one (group, head) slice in int32: a view spanning more (q cut out
    of a fused qkv projection of 10⁶ tokens) is copied first, once per distinct tensor, and
    one whose contiguous copy still would not fit is refused, naming the argument. The
    limit is lowered here so that small views cross it."""
    monkeypatch.setattr(tb, "_INT32_MAX", 200)
    qkv = _randn(rng, 1, 2, 7, 3 * 40)  # row stride 120: (7 − 1)·120 + 3 > 200
    q, k = qkv[..., :4], qkv[..., 40:44]
    x = _randn(rng, 1, 2, 7, 3)
    small = _randn(rng, 1, 2, 7, 4)
    out = tb._int32_addressable(q=q, k=k, again=qkv[..., :4], small=small, none=None)
    assert all(t.is_contiguous() for t in out[:3]) and torch.equal(out[0], q) and torch.equal(out[1], k)
    assert out[2] is out[0]  # q seen twice: one copy, so "q is k" survives
    assert out[3] is small and out[4] is None
    with pytest.raises(ValueError, match=r"x has 204 elements in one \(group, head\) slice.*backend='torch'"):
        tb._int32_addressable(x=_randn(rng, 1, 1, 68, 3))
    # Every launcher takes the copies: results as for contiguous inputs.
    q64, k64, x64 = _f64(q, k, x)
    y, _ = tb.matmul(q, k, x, scale=0.5, normalize="row")
    assert _err(y, reference.matmul(q64, k64, x64, scale=0.5, normalize="row")[0]) < 1e-5
    torch.testing.assert_close(tb.logsumexp(q, k, scale=0.5).double(), reference.logsumexp(q64, k64, scale=0.5))
    y = tb.symmetric_matmul(q, q, x, scale=0.5)
    assert _err(y, reference.symmetric_matmul(q64, q64, x64, scale=0.5)) < 1e-5
    y, yt = tb.matmul_pair(q, k, x, x, scale=0.5)
    y_ref, yt_ref = _pair_ref(q, k, x, x, 0.5)
    assert _err(y, y_ref) < 1e-5 and _err(yt, yt_ref) < 1e-5


# --------------------------------------------------------------------------- compiled for Hopper, no GPU needed
_HOPPER_COMPILE_SCRIPT = r"""
from hopper_compile import has_column_atomics, hopper_ptx
from spectral_kernels.ops import triton_kernels as K

common = dict(D=64, W=32, BLOCK_D=64, BLOCK_W=32, QK_FP32=False, DOT_FP32="tf32x3", PX_MODE=K.PX_BF16,
              UPCAST_BF16=False)
hopper_ptx(K._row_product_kernel, dict(common, HAS_ROW_OFFSET=False, HAS_COL_OFFSET=False, NORMALIZE=True,
               HEAD_SUM=False, RAW_MAX=True, BLOCK_ROWS=128, BLOCK_COLS=64, EVEN_ROWS=True, EVEN_COLS=True), 4, 3)
hopper_ptx(K._row_product_kernel, dict(common, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=True, NORMALIZE=False,
               HEAD_SUM=True, RAW_MAX=False, BLOCK_ROWS=128, BLOCK_COLS=128, EVEN_ROWS=False, EVEN_COLS=False), 8, 3)
hopper_ptx(K._logsumexp_kernel, dict(D=64, HAS_COL_OFFSET=True, QK_FP32=False, DOT_FP32="tf32x3", UPCAST_BF16=False,
               BLOCK_ROWS=128, BLOCK_COLS=64, BLOCK_D=64, EVEN_ROWS=False, EVEN_COLS=False), 4, 3)
for same, paired in ((True, False), (False, False), (False, True)):
    ptx = hopper_ptx(K._symmetric_kernel, dict(common, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=same or paired,
                         HEAD_SUM=not same, SAME_QK=same, PAIRED=paired, BLOCK_ROWS=256 if not paired else 128,
                         BLOCK_COLS=64, EVEN_N=same), 8, 2)
    assert has_column_atomics(ptx)
    ptx = hopper_ptx(K._symmetric_kernel, dict(common, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=same or paired,
                         HEAD_SUM=not same, SAME_QK=same, PAIRED=paired, BLOCK_ROWS=256 if not paired else 128,
                         BLOCK_COLS=64, EVEN_N=True), 8, 2, aligned=True)
    assert has_column_atomics(ptx, ".v4"), (same, paired)
for even in (True, False):
    ptx = hopper_ptx(K._pair_kernel, dict(common, PW_MODE=K.PX_BF16, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=not even,
                         BLOCK_ROWS=128, BLOCK_COLS=64, EVEN_ROWS=even, EVEN_COLS=even), 8, 2, aligned=even)
    assert has_column_atomics(ptx, ".v4" if even else "")  # of Eᵀ·W
# fp32 operands: the default tf32x3 dots run on tensor cores (tf32 wgmma), ieee on FMAs
# (the paired walk's fp32 tile: 128-row blocks need more than Hopper's shared memory there)
fp32 = dict(common, QK_FP32=True, PX_MODE=K.PX_FP32, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=False, HEAD_SUM=False,
            SAME_QK=False, PAIRED=True, BLOCK_ROWS=64, BLOCK_COLS=64, EVEN_N=False)
ptx = hopper_ptx(K._symmetric_kernel, fp32, 4, 2, operands="fp32")
assert ".tf32" in ptx
ptx = hopper_ptx(K._row_product_kernel, dict(common, QK_FP32=True, PX_MODE=K.PX_FP32, HAS_ROW_OFFSET=False,
                 HAS_COL_OFFSET=False, NORMALIZE=True, HEAD_SUM=False, RAW_MAX=True, BLOCK_ROWS=128,
                 BLOCK_COLS=64, EVEN_ROWS=False, EVEN_COLS=False), 4, 3, operands="fp32")
assert ".tf32" in ptx
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never compiles: build the main kernel variants (the pair kernel too) for sm_90 (ptxas ships
    with Triton) in a process without TRITON_INTERPRET, so GPU-only compile errors show on CPU."""
    pytest.importorskip("triton.backends.nvidia")
    from hopper_compile import run_script

    done = run_script(_HOPPER_COMPILE_SCRIPT)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# --------------------------------------------------------------------------- GPU, autotuned kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n", [(torch.float32, 1000), (torch.bfloat16, 4096)], ids=("fp32", "bf16"))
def test_gpu_against_reference(rng, monkeypatch, dtype, n):
    """bf16 at N = 4096 (the benchmark's kernels, autotuned: several configs, whole tiles);
    fp32 at N = 1000 (ragged tiles) with the default tile only, to keep compile time down
    (fp32 ieee kernels compile slowly)."""
    if dtype == torch.float32:
        monkeypatch.setenv("SPECTRAL_KERNELS_TRITON_AUTOTUNE", "0")
    d, width, heads = 64, 32, 2
    q, k = _randn(rng, 1, heads, n, d, dtype=dtype), _randn(rng, 1, heads, n, d, dtype=dtype)
    x = _randn(rng, 1, heads, n, width, dtype=dtype)
    w = torch.rand(heads, generator=rng, dtype=torch.float64).to(DEVICE, torch.float32)
    q64, k64, x64 = _f64(q, k, x)
    if dtype == torch.float32:
        # Both fp32 dot precisions (tf32x3 is the default) reach fp32-level error (plain tf32: ~2e-3).
        for mode in ("ieee", "tf32x3"):
            monkeypatch.setenv("SPECTRAL_KERNELS_FP32_DOT", mode)
            y, _ = tb.matmul(q, k, x, scale=0.125, normalize="row")
            y_ref, _ = reference.matmul(q64, k64, x64, scale=0.125, normalize="row")
            assert _err(y, y_ref) < 1e-4, mode
            r = tb.logsumexp(q, k, scale=0.125)
            y = tb.symmetric_matmul(q, k, x, scale=0.125, row_offset=r)
            assert _err(y, reference.symmetric_matmul(q64, k64, x64, scale=0.125, row_offset=_f64(r)[0])) < 1e-4
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp32: 1000-term sums; tf32 would give ~2e-3
    for hw in (None, w):
        y, _ = tb.matmul(q, k, x, scale=0.125, normalize="row", head_weights=hw)
        y_ref, _ = reference.matmul(q64, k64, x64, scale=0.125, normalize="row",
                                    head_weights=None if hw is None else hw.double().cpu())
        assert _err(y, y_ref) < tol
    r = tb.logsumexp(q, k, scale=0.125)
    torch.testing.assert_close(r.double().cpu(), reference.logsumexp(q64, k64, scale=0.125), rtol=1e-4, atol=1e-3)
    for kk in (q, k):
        # Twice: the first call of a shape autotunes, the second uses the cached config.
        for _ in range(2):
            y = tb.symmetric_matmul(q, kk, x, scale=0.125, offset=r)
            y_ref = reference.symmetric_matmul(q64, _f64(kk)[0], x64, scale=0.125, offset=r.double().cpu())
            assert _err(y, y_ref) < tol
    # q ≠ k and α ≠ β (the solver's ½(P + Pᵀ)·Z): each walk forced, then the autotuned choice
    y_ref = reference.symmetric_matmul(q64, k64, x64, scale=0.125, row_offset=r.double().cpu())
    for walk in ("rect", "paired", "auto"):
        monkeypatch.setenv("SPECTRAL_KERNELS_SYMMETRIC_WALK", walk)
        for _ in range(2):
            assert _err(tb.symmetric_matmul(q, k, x, scale=0.125, row_offset=r), y_ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,n,m_tokens", [(torch.float32, 1000, 777), (torch.bfloat16, 4096, 3000)],
                         ids=("fp32", "bf16"))
def test_gpu_pair_against_reference(rng, monkeypatch, dtype, n, m_tokens):
    """The compiled pair kernel at N ≠ M: bf16 autotuned (the trials add into YT, so a second
    call with the cached config must agree with the first), fp32 with the default tile only."""
    if dtype == torch.float32:
        monkeypatch.setenv("SPECTRAL_KERNELS_TRITON_AUTOTUNE", "0")
    d, width, heads = 64, 32, 2
    q, k = _randn(rng, 1, heads, n, d, dtype=dtype), _randn(rng, 1, heads, m_tokens, d, dtype=dtype)
    x, w = _randn(rng, 1, heads, m_tokens, width, dtype=dtype), _randn(rng, 1, heads, n, width, dtype=dtype)
    r = tb.logsumexp(q, k, scale=0.125)
    y_ref, yt_ref = _pair_ref(q, k, x, w, 0.125, r)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for _ in range(2):
        y, yt = tb.matmul_pair(q, k, x, w, scale=0.125, row_offset=r)
        assert _err(y, y_ref) < tol and _err(yt, yt_ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("d", [160, 384])
def test_gpu_wide_features_launch_tiles_that_fit(rng, monkeypatch, d):
    """d = 160 (Stable Diffusion's deepest heads) and 384 (whole ViT-S features): the tile
    pruning (ops.triton_tiles) must launch shapes that fit the GPU's shared memory — before
    it, d > 256 and the forced paired walk at d = 160 failed with OutOfResources."""
    monkeypatch.setenv("SPECTRAL_KERNELS_TRITON_AUTOTUNE", "0")
    n, width, scale = 300, 16, 1.0 / math.sqrt(d)
    q, k = _randn(rng, 1, 2, n, d, dtype=torch.bfloat16), _randn(rng, 1, 2, n, d, dtype=torch.bfloat16)
    x = _randn(rng, 1, 2, n, width, dtype=torch.bfloat16)
    q64, k64, x64 = _f64(q, k, x)
    y, _ = tb.matmul(q, k, x, scale=scale, normalize="row")
    assert _err(y, reference.matmul(q64, k64, x64, scale=scale, normalize="row")[0]) < 2e-2
    r = tb.logsumexp(q, k, scale=scale)
    torch.testing.assert_close(r.double().cpu(), reference.logsumexp(q64, k64, scale=scale), rtol=1e-3, atol=1e-2)
    y_ref = reference.symmetric_matmul(q64, k64, x64, scale=scale, row_offset=r.double().cpu())
    for walk in ("rect", "paired"):
        monkeypatch.setenv("SPECTRAL_KERNELS_SYMMETRIC_WALK", walk)
        assert _err(tb.symmetric_matmul(q, k, x, scale=scale, row_offset=r), y_ref) < 2e-2, walk
    y, yt = tb.matmul_pair(q, k, x, x, scale=scale, row_offset=r)
    y_ref, yt_ref = _pair_ref(q, k, x, x, scale, r)
    assert _err(y, y_ref) < 2e-2 and _err(yt, yt_ref) < 2e-2


@pytest.mark.gpu
def test_gpu_large_extreme_scale(rng, monkeypatch):
    monkeypatch.setenv("SPECTRAL_KERNELS_TRITON_AUTOTUNE", "0")
    n, d = 4096, 64
    v = torch.nn.functional.normalize(_randn(rng, n, d, dtype=torch.float32), dim=-1)
    x = _randn(rng, n, 16)
    r = affinity_logsumexp(v, v, scale=1e4, backend="triton")  # q is k: degrees e^r, a = r/2
    y = affinity_symmetric_matmul(v, v, x, scale=1e4, offset=0.5 * r, backend="triton")
    y_ref = affinity_symmetric_matmul(v, v, x, scale=1e4, offset=0.5 * r, backend="torch")
    assert torch.isfinite(y).all() and y_ref.abs().max() > 0.1
    assert _err(y, y_ref) < 1e-2


def test_eigsh_nystrom_start_through_the_kernels(rng, monkeypatch):
    """eigsh's fused degree pass and Nyström extension run on the Triton kernels (symmetric
    product with a constant offset; row softmax of all tokens against a sample)."""
    import importlib

    import torch.nn.functional as F

    from spectral_kernels.eigsh import eigsh
    from spectral_kernels.operators import VVAffinity

    eigsh_module = importlib.import_module("spectral_kernels.eigsh")
    monkeypatch.setattr(eigsh_module, "nystrom_sample_size", lambda n: 40)
    centers = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    x = (centers[torch.randint(0, 4, (120,), generator=rng)]
         + 0.3 * torch.randn(120, 6, generator=rng, dtype=torch.float64)).float().to(DEVICE)
    vals, vecs, info = eigsh(VVAffinity(x, temperature=0.3, backend="triton"), 3, tol=1e-5,
                             init="nystrom", return_info=True)
    assert info.init == "nystrom"
    u = F.normalize(x.double().cpu(), dim=-1)
    a = torch.exp(u @ u.T / 0.3)
    d = a.sum(1)
    ref_vals, ref_vecs = torch.linalg.eigh(a / torch.sqrt(d[:, None] * d[None, :]))
    ref_vals, ref_vecs = ref_vals.flip(0)[:3], ref_vecs.flip(1)[:, :3]
    assert float(((vals.double().cpu() - ref_vals) / ref_vals).abs().max()) < 1e-5
    cosines = torch.linalg.svdvals(torch.linalg.qr(ref_vecs)[0].T @ torch.linalg.qr(vecs.double().cpu())[0])
    assert float(cosines.min()) > 0.999
