"""The CUDA backend (csrc/ + spectral_kernels.ops.cuda_backend).

Two halves:
- compile checks that run on the CPU machine: every csrc/*.cu compiles with the installed
  nvcc for sm_80 and sm_90, and binding.cpp compiles against the installed torch headers
  (skipped only when nvcc / a C++ compiler / the headers are absent);
- GPU tests (marker ``gpu``): parity with the dense float64 reference, the torch and the
  triton backends on DESIGN.md-like shapes, gradients, extreme scales, bad inputs.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from spectral_kernels.ops import affinity_logsumexp, affinity_matmul, affinity_symmetric_matmul
from spectral_kernels.ops import backends, cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
ARCHS = ("80", "90")


# =========================================================================== compile checks
def _find_nvcc():
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if os.environ.get("CUDA_HOME"):
        candidates.insert(0, os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _nvcc_compile(source, out_dir):
    """Compile one .cu file for every architecture in ARCHS; return (returncode, log)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    cmd = [NVCC, "-std=c++17", "-O3", "-I", CSRC, *gencode, "-c", source, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled_cu(tmp_path_factory):
    """Compile every .cu file (two at a time: the CI machine has two cores)."""
    out_dir = str(tmp_path_factory.mktemp("nvcc"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {src: pool.submit(_nvcc_compile, src, out_dir) for src in CU_FILES}
        return {os.path.basename(src): fut.result() for src, fut in futures.items()}


def test_csrc_has_kernels_and_one_binding():
    names = {os.path.basename(p) for p in CU_FILES}
    assert {"affinity_rows.cu", "affinity_symmetric.cu", "affinity_simt.cu"} <= names
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "*.cpp"))) == ["binding.cpp"]


@needs_nvcc
@pytest.mark.parametrize("name", [os.path.basename(p) for p in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90(compiled_cu, name):
    returncode, log = compiled_cu[name]
    assert returncode == 0, log
    assert "warning" not in log.lower(), log


def test_kernel_files_need_no_torch_headers():
    """The .cu files and their headers compile with plain nvcc: no torch/ATen includes."""
    for path in glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cuh")) + \
            glob.glob(os.path.join(CSRC, "*.h")):
        with open(path) as f:
            text = f.read()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{os.path.basename(path)} includes {banned}"


def _find_cuda_include():
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if NVCC is not None:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for root in filter(None, roots):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return os.path.join(root, "include")
    return None


def _torch_include_dirs():
    from torch.utils.cpp_extension import include_paths
    return include_paths()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp type-checks against the installed torch headers and the CUDA runtime headers.

    The CPU torch wheel ships c10/cuda/*.h but not the CMake-generated
    c10/cuda/impl/cuda_cmake_macros.h; a stand-in with its one definition is provided.
    """
    torch_includes = _torch_include_dirs()
    if not os.path.isfile(os.path.join(torch_includes[0], "torch", "extension.h")):
        pytest.skip("torch headers are not installed")
    cuda_include = _find_cuda_include()
    if cuda_include is None:
        pytest.skip("CUDA runtime headers are not installed")
    stub_root = tmp_path / "stub"
    if not os.path.isfile(os.path.join(torch_includes[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (stub_root / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub_root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{stub_root}", *[f"-I{p}" for p in torch_includes],
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}",
           os.path.join(CSRC, "binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_unavailable_extension_is_not_an_error():
    """Without the extension or a GPU the backend says so instead of raising."""
    assert isinstance(cuda_backend.is_available(), bool)
    if not cuda_backend.is_available():
        assert "cuda" not in backends.available_backends()


# =========================================================================== GPU tests
SKIP_CUDA_BUILD = os.environ.get("SPECTRAL_KERNELS_SKIP_CUDA", "0") == "1"


@pytest.fixture
def cuda_ready():
    """On a GPU machine the extension must have been built (a silent skip would hide that)."""
    if not cuda_backend.is_available():
        if SKIP_CUDA_BUILD:
            pytest.skip("SPECTRAL_KERNELS_SKIP_CUDA=1: the extension was not built")
        pytest.fail("a CUDA device is present but spectral_kernels._cuda did not load; "
                    "run pip install -e . with nvcc available")
    return torch.device("cuda")


def _randn(rng, *shape, dtype, device, std=1.0):
    return (torch.randn(*shape, generator=rng) * std).to(device=device, dtype=dtype)


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# Relative (Frobenius) error of a product against float64 on the same rounded inputs:
# bf16/fp16 round P (and X) to 8/11 bits before the tensor-core product.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dense(fn, *args, **kwargs):
    """The dense float64 reference on the same (rounded) inputs."""
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return fn(*args, backend="dense", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_offsets_match_reference(cuda_ready, rng, dtype):
    dev, n, m_keys, d, m = cuda_ready, 4096, 3001, 64, 32
    q = _randn(rng, 2, n, d, dtype=dtype, device=dev)
    k = _randn(rng, 2, m_keys, d, dtype=dtype, device=dev)
    x = _randn(rng, 2, m_keys, m, dtype=dtype, device=dev)
    alpha = _randn(rng, 2, n, dtype=torch.float32, device=dev) + 8.0
    beta = _randn(rng, 2, m_keys, dtype=torch.float32, device=dev)
    y = affinity_matmul(q, k, x, row_offset=alpha, col_offset=beta, backend="cuda")
    ref = _dense(affinity_matmul, q, k, x, row_offset=alpha, col_offset=beta)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOLERANCE[dtype]
    y_torch = affinity_matmul(q, k, x, row_offset=alpha, col_offset=beta, backend="torch")
    assert _rel_err(y, y_torch) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_softmax_and_lse_match_reference(cuda_ready, rng, dtype):
    dev, n, d, m = cuda_ready, 4096, 64, 32
    q = _randn(rng, 3, n, d, dtype=dtype, device=dev)
    k = _randn(rng, 3, n, d, dtype=dtype, device=dev)
    x = _randn(rng, 3, n, m, dtype=dtype, device=dev)
    beta = _randn(rng, 3, n, dtype=torch.float32, device=dev)
    y, lse = affinity_matmul(q, k, x, col_offset=beta, normalize="row", return_lse=True, backend="cuda")
    ref_y, ref_lse = _dense(affinity_matmul, q, k, x, col_offset=beta, normalize="row", return_lse=True)
    assert _rel_err(y, ref_y) < TOLERANCE[dtype]
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3
    r = affinity_logsumexp(q, k, col_offset=beta, backend="cuda")
    assert (r.double() - ref_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_with_shared_x_and_weights(cuda_ready, rng, dtype):
    dev, g, h, n, d, m = cuda_ready, 2, 4, 1500, 64, 32
    q = _randn(rng, g, h, n, d, dtype=dtype, device=dev)
    k = _randn(rng, g, h, n, d, dtype=dtype, device=dev)
    x = _randn(rng, g, n, m, dtype=dtype, device=dev)  # one X per group, shared by the heads
    w = torch.rand(h, generator=rng).to(dev)
    for normalize in ("none", "row"):
        y = affinity_matmul(q, k, x, normalize=normalize, head_weights=w, backend="cuda")
        ref = _dense(affinity_matmul, q, k, x, normalize=normalize, head_weights=w)
        assert y.shape == (g, n, m)
        assert _rel_err(y, ref) < TOLERANCE[dtype], normalize
    # per-head X without weights: (G, H, N, m)
    xh = _randn(rng, g, h, n, m, dtype=dtype, device=dev)
    y = affinity_matmul(q, k, xh, normalize="row", backend="cuda")
    assert _rel_err(y, _dense(affinity_matmul, q, k, xh, normalize="row")) < TOLERANCE[dtype]


def _ncut_offset(q, k, scale):
    """a = ½·log d with d_i = (e^{r_i} + e^{c_i})/2 (float64, dense): every exponent of E stays ≤ log 2."""
    from spectral_kernels.objective import symmetric_offsets
    return symmetric_offsets(q.double(), k.double(), scale=scale, backend="dense").float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("same", [True, False], ids=["q_is_k", "q_ne_k"])
def test_symmetric_matches_reference(cuda_ready, rng, dtype, same):
    dev, n, d, m = cuda_ready, 4096, 64, 32
    q = _randn(rng, 2, n, d, dtype=dtype, device=dev)
    k = q if same else _randn(rng, 2, n, d, dtype=dtype, device=dev)
    x = _randn(rng, 2, n, m, dtype=dtype, device=dev)
    scale = 0.125
    a = _ncut_offset(q, k, scale)
    y = affinity_symmetric_matmul(q, k, x, scale=scale, offset=a, backend="cuda")
    ref = _dense(affinity_symmetric_matmul, q, k if not same else q, x, scale=scale, offset=a)
    assert torch.isfinite(y).all()
    assert _rel_err(y, ref) < TOLERANCE[dtype]
    y_torch = affinity_symmetric_matmul(q, k, x, scale=scale, offset=a, backend="torch")
    assert _rel_err(y, y_torch) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_symmetric_heads_weights(cuda_ready, rng, dtype):
    dev, h, n, d, m = cuda_ready, 3, 1000, 32, 16
    v = _randn(rng, h, n, d, dtype=dtype, device=dev)
    x = _randn(rng, n, m, dtype=dtype, device=dev)
    w = torch.rand(h, generator=rng).to(dev)
    a = _ncut_offset(v, v, 1.0)
    y = affinity_symmetric_matmul(v, v, x, scale=1.0, offset=a, head_weights=w, backend="cuda")
    ref = _dense(affinity_symmetric_matmul, v, v, x, scale=1.0, offset=a, head_weights=w)
    assert y.shape == (n, m)
    assert _rel_err(y, ref) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m_keys,d,m", [(1, 1, 1, 1), (77, 130, 40, 5), (700, 333, 200, 100), (257, 65, 256, 72)])
def test_odd_shapes(cuda_ready, rng, dtype, n, m_keys, d, m):
    """Padding of d and m, partial tiles, X wider than one CTA's slice, d = 256."""
    dev = cuda_ready
    q = _randn(rng, n, d, dtype=dtype, device=dev, std=d ** -0.25)
    k = _randn(rng, m_keys, d, dtype=dtype, device=dev, std=d ** -0.25)
    x = _randn(rng, m_keys, m, dtype=dtype, device=dev)
    for normalize in ("none", "row"):
        y = affinity_matmul(q, k, x, normalize=normalize, backend="cuda")
        assert y.shape == (n, m)
        assert _rel_err(y, _dense(affinity_matmul, q, k, x, normalize=normalize)) < TOLERANCE[dtype]
    r = affinity_logsumexp(q, k, backend="cuda")
    assert (r.double() - _dense(affinity_logsumexp, q, k)).abs().max().item() < 1e-3
    if n == m_keys or n == 1:
        ks = k[:n]
        xs = x[:n]
        y = affinity_symmetric_matmul(q, ks, xs, backend="cuda")
        assert _rel_err(y, _dense(affinity_symmetric_matmul, q, ks, xs)) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_symmetric_odd_length_both_paths(cuda_ready, rng):
    dev, n, d, m = cuda_ready, 1234, 24, 12
    for dtype in DTYPES:
        q = _randn(rng, n, d, dtype=dtype, device=dev, std=0.5)
        k = _randn(rng, n, d, dtype=dtype, device=dev, std=0.5)
        x = _randn(rng, n, m, dtype=dtype, device=dev)
        for kk in (q, k):
            a = _ncut_offset(q, kk, d ** -0.5)
            y = affinity_symmetric_matmul(q, kk, x, offset=a, backend="cuda")
            ref = _dense(affinity_symmetric_matmul, q, q if kk is q else kk, x, offset=a)
            assert _rel_err(y, ref) < TOLERANCE[dtype], (dtype, kk is q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_symmetric_with_separate_row_and_column_offsets(cuda_ready, rng, dtype):
    """α ≠ β (the solver's ½(P + Pᵀ)·Z with α = row LSE): two row products of the kernels."""
    dev, h, n, d, m = cuda_ready, 2, 1000, 64, 20
    q = _randn(rng, h, n, d, dtype=dtype, device=dev, std=0.5)
    k = _randn(rng, h, n, d, dtype=dtype, device=dev, std=0.5)
    x = _randn(rng, n, m, dtype=dtype, device=dev)
    for kk in (q, k):
        r = affinity_logsumexp(q, kk, backend="cuda")
        y = affinity_symmetric_matmul(q, kk, x, row_offset=r, backend="cuda")
        ref = _dense(affinity_symmetric_matmul, q, q if kk is q else kk, x, row_offset=r)
        assert _rel_err(y, ref) < TOLERANCE[dtype], kk is q


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_through_cuda(cuda_ready, rng, dtype):
    dev, h, n, d, m = cuda_ready, 2, 600, 64, 8
    q = _randn(rng, h, n, d, dtype=dtype, device=dev)
    k = _randn(rng, h, n, d, dtype=dtype, device=dev)
    x0 = _randn(rng, n, m, dtype=torch.float32, device=dev)
    w = torch.rand(h, generator=rng).to(dev)
    cot = _randn(rng, n, m, dtype=torch.float32, device=dev)
    grads = {}
    for backend in ("cuda", "dense"):
        x = x0.to(dtype if backend == "cuda" else torch.float64).detach().clone().requires_grad_(True)
        qb, kb = (q, k) if backend == "cuda" else (q.double(), k.double())
        y = affinity_matmul(qb, kb, x, normalize="row", head_weights=w.to(x.dtype), backend=backend)
        ys = affinity_symmetric_matmul(qb, kb, x, head_weights=w.to(x.dtype), offset=torch.full(
            (h, n), 4.0, device=dev, dtype=x.dtype), backend=backend)
        ((y.double() * cot.double()).sum() + (ys.double() * cot.double()).sum()).backward()
        grads[backend] = x.grad
    assert torch.isfinite(grads["cuda"]).all()
    assert _rel_err(grads["cuda"], grads["dense"]) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1e-4, 3.0, 40.0])
def test_extreme_scales_stay_finite(cuda_ready, rng, dtype, scale):
    """Softmax rows and log-space offsets never overflow, whatever the feature scale."""
    dev, n, d, m = cuda_ready, 1024, 64, 16
    q = _randn(rng, n, d, dtype=dtype, device=dev)
    k = _randn(rng, n, d, dtype=dtype, device=dev)
    x = _randn(rng, n, m, dtype=dtype, device=dev)
    y, lse = affinity_matmul(q, k, x, scale=scale, normalize="row", return_lse=True, backend="cuda")
    ref_y, ref_lse = _dense(affinity_matmul, q, k, x, scale=scale, normalize="row", return_lse=True)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    # exp(S) inherits S's rounding: fp32 scores of size |S| carry an absolute error of a
    # few |S|·2⁻²⁴, which is the relative error of every exponential.
    s_max = scale * (q.double().norm(dim=-1).max() ** 2).item()
    tol = TOLERANCE[dtype] + 8 * s_max * 2.0 ** -24
    assert _rel_err(y, ref_y) < tol
    assert ((lse.double() - ref_lse).abs() / ref_lse.abs().clamp_min(1.0)).max().item() < 1e-3
    # the offset form with α = row LSE is the same product
    y2 = affinity_matmul(q, k, x, scale=scale, row_offset=lse, backend="cuda")
    assert _rel_err(y2, ref_y) < 2 * tol
    a = _ncut_offset(q, q, scale)
    ys = affinity_symmetric_matmul(q, q, x, scale=scale, offset=a, backend="cuda")
    assert torch.isfinite(ys).all()
    assert _rel_err(ys, _dense(affinity_symmetric_matmul, q, q, x, scale=scale, offset=a)) < 2 * tol


@pytest.mark.gpu
def test_parity_with_triton(cuda_ready, rng):
    if "triton" not in backends.available_backends():
        pytest.skip("triton backend not available")
    dev, n, d, m = cuda_ready, 4096, 64, 32
    q = _randn(rng, 2, n, d, dtype=torch.bfloat16, device=dev)
    k = _randn(rng, 2, n, d, dtype=torch.bfloat16, device=dev)
    x = _randn(rng, 2, n, m, dtype=torch.bfloat16, device=dev)
    y_c, lse_c = affinity_matmul(q, k, x, normalize="row", return_lse=True, backend="cuda")
    y_t, lse_t = affinity_matmul(q, k, x, normalize="row", return_lse=True, backend="triton")
    assert _rel_err(y_c, y_t) < 2e-2
    assert (lse_c - lse_t).abs().max().item() < 1e-2
    ys_c = affinity_symmetric_matmul(q, q, x, offset=torch.full((2, n), 5.0, device=dev), backend="cuda")
    ys_t = affinity_symmetric_matmul(q, q, x, offset=torch.full((2, n), 5.0, device=dev), backend="triton")
    assert _rel_err(ys_c, ys_t) < 2e-2


@pytest.mark.gpu
def test_backend_listed_and_auto_choice_cached(cuda_ready, rng):
    assert "cuda" in backends.available_backends()
    q = _randn(rng, 1, 2, 512, 64, dtype=torch.bfloat16, device=cuda_ready)
    x = _randn(rng, 1, 2, 512, 32, dtype=torch.bfloat16, device=cuda_ready)

    def run(module):
        return module.matmul(q, q, x, scale=0.125, normalize="row")

    key = ("test_matmul_row", 2, 512, 512, 64, 32, torch.bfloat16)
    first = cuda_backend.choose_over_triton(key, run)
    assert isinstance(first, bool)
    assert cuda_backend.choose_over_triton(key, run) is first
    assert cuda_backend._CHOICES[key] is first
    # d > 256: never the cuda kernels
    assert cuda_backend.choose_over_triton(("test_matmul_row", 1, 64, 64, 512, 8, torch.bfloat16), run) is False
    # the public dispatch gets a real choice and the right numbers
    y = affinity_matmul(q, q, x, normalize="row")
    assert _rel_err(y, affinity_matmul(q, q, x, normalize="row", backend="triton")) < 2e-2


@pytest.mark.gpu
def test_unsupported_head_dim_is_a_value_error(cuda_ready, rng):
    q = _randn(rng, 64, 300, dtype=torch.bfloat16, device=cuda_ready)
    x = _randn(rng, 64, 8, dtype=torch.bfloat16, device=cuda_ready)
    with pytest.raises(ValueError, match="d ≤ 256"):
        affinity_matmul(q, q, x, backend="cuda")


# Each case: (name, call on (ext, q, x, dev), expected exception type, message pattern).
# They run in a child process so that a crash in an error path fails this test instead
# of killing the whole pytest run.
_BAD_INPUT_SCRIPT = r"""
import re, sys, torch
from spectral_kernels.ops import cuda_backend
ext = cuda_backend._ext()
dev = torch.device("cuda")
q = torch.randn(1, 2, 64, 32, device=dev, dtype=torch.bfloat16)
x = torch.randn(1, 2, 64, 8, device=dev, dtype=torch.bfloat16)
cases = [
    ("cpu q", lambda: ext.affinity_matmul(q.cpu(), q, x, None, None, None, 1.0, False),
     ValueError, "q must be a CUDA tensor"),
    ("strided k", lambda: ext.affinity_matmul(q, q.transpose(2, 3).contiguous().transpose(2, 3), x, None, None,
                                              None, 1.0, False), ValueError, "k must be contiguous"),
    ("x dtype", lambda: ext.affinity_matmul(q, q, x.half(), None, None, None, 1.0, False),
     TypeError, "x must have q's dtype"),
    ("x shape", lambda: ext.affinity_matmul(q, q, x[:, :, :10].contiguous(), None, None, None, 1.0, False),
     ValueError, "x must have shape"),
    ("d not multiple of 8", lambda: ext.affinity_matmul(q[..., :20].contiguous(), q[..., :20].contiguous(), x,
                                                        None, None, None, 1.0, False), ValueError, "multiple of 8"),
    ("row_offset shape", lambda: ext.affinity_matmul(q, q, x, torch.zeros(1, 2, 63, device=dev), None, None, 1.0,
                                                     False), ValueError, "row_offset must have shape"),
    ("col_offset dtype", lambda: ext.affinity_matmul(q, q, x, None, torch.zeros(1, 2, 64, device=dev,
                                                     dtype=torch.float64), None, 1.0, False),
     TypeError, "col_offset must be float32"),
    ("head_weights shape", lambda: ext.affinity_matmul(q, q, x, None, None, torch.ones(3, device=dev), 1.0, False),
     ValueError, "head_weights must have one weight per head"),
    ("symmetric lengths", lambda: ext.affinity_symmetric_matmul(q, q[:, :, :32].contiguous(), x, None, None, 1.0,
                                                                False), ValueError, "same number of tokens"),
    ("same_tensor lie", lambda: ext.affinity_symmetric_matmul(q, q.clone(), x, None, None, 1.0, True),
     ValueError, "different arrays"),
    ("q dtype", lambda: ext.affinity_logsumexp(q.double(), q.double(), None, 1.0),
     TypeError, "q must be float32, float16 or bfloat16"),
]
for name, call, expected, pattern in cases:
    print("START", name, flush=True)
    try:
        call()
        outcome = "no exception"
    except Exception as e:
        ok = isinstance(e, expected) and re.search(pattern, str(e))
        outcome = "OK" if ok else f"{type(e).__name__}: {str(e).splitlines()[0]}"
    print("DONE", name, "|", outcome, flush=True)
"""


@pytest.mark.gpu
def test_binding_rejects_bad_inputs(cuda_ready):
    """Bad inputs raise ValueError/TypeError naming the argument, from the binding itself."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    lines = proc.stdout.splitlines()
    started = [ln[len("START "):] for ln in lines if ln.startswith("START ")]
    results = dict(ln[len("DONE "):].split(" | ", 1) for ln in lines if ln.startswith("DONE "))
    assert proc.returncode == 0, (f"the child process died (return code {proc.returncode}) in case "
                                  f"{started[-1] if started else None!r}:\n{proc.stderr[-3000:]}")
    assert len(results) == len(started) == 11, proc.stdout + proc.stderr[-3000:]
    failures = {name: outcome for name, outcome in results.items() if outcome != "OK"}
    assert not failures, failures
