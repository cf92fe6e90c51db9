"""CUDA backend: the hand-written kernels of csrc/, loaded from ``spectral_kernels._cuda``.

The extension is optional (setup.py builds it only where torch has CUDA and nvcc exists),
so it is imported lazily and its absence is never an error: ``is_available()`` is then
False and the backend registry leaves "cuda" out.

The functions take the canonical layout of ``spectral_kernels.ops._layout`` and adapt it
to what the kernels need: contiguous tensors, X cast to q's dtype and kept un-expanded
when it is shared by the heads, float32 offsets and weights, and for 16-bit inputs the
feature dimension and X's width zero-padded to multiples of 8 (16-byte rows; zero
features leave q·k unchanged, zero columns are sliced off the result).
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from ._layout import same_tensor, symmetric_offsets_args

__all__ = ["is_available", "matmul", "logsumexp", "symmetric_matmul", "choose_over_triton", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256  # the kernels are templated on d padded to 32, 64, 128 or 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_VECTOR_ELEMENTS = 8  # 16 bytes of fp16/bf16: the unit of the kernels' shared-memory loads


@functools.lru_cache(maxsize=None)
def _extension():
    """The compiled module, or None when it was not built or cannot load here."""
    try:
        return importlib.import_module("spectral_kernels._cuda")
    except (ImportError, OSError):
        return None


def is_available() -> bool:
    """True when the extension loaded and a CUDA device is present (never raises)."""
    try:
        return _extension() is not None and torch.cuda.is_available()
    except Exception:  # a broken driver must not break `import spectral_kernels`
        return False


def _ext():
    ext = _extension()
    if ext is None:
        raise RuntimeError("the CUDA extension spectral_kernels._cuda is not built; "
                           "reinstall with CUDA torch and nvcc present (pip install -e .)")
    return ext


# --------------------------------------------------------------------------- input adaptation
def _check_features(q):
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the cuda backend supports q/k of dtype {SUPPORTED_DTYPES}, got {q.dtype}")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the cuda backend supports a feature dimension d ≤ {MAX_HEAD_DIM}, got d = {d}; "
                         f'use backend="triton" or "torch"')


def _pad_last(t, multiple):
    extra = (-t.shape[-1]) % multiple
    return F.pad(t, (0, extra)) if extra else t


def _aligned(t):
    """Contiguous with a 16-byte aligned start (a view may begin mid-vector)."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def _features(t):
    """q or k as the kernels read it: contiguous, d padded to 8 for 16-bit types."""
    if t.dtype != torch.float32:
        t = _pad_last(t, _VECTOR_ELEMENTS)
    return _aligned(t)


def _right_hand_side(x, dtype):
    """X in q's dtype, (G, 1, M, m) when shared by the heads, width padded for 16-bit."""
    if x.shape[1] == 1 or x.stride(1) == 0:
        x = x[:, :1]
    x = x.to(dtype)
    if dtype != torch.float32:
        x = _pad_last(x, _VECTOR_ELEMENTS)
    return _aligned(x)


def _float32(t):
    return None if t is None else t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- backend contract
def matmul(q, k, x, *, scale, row_offset=None, col_offset=None, normalize="none", head_weights=None):
    """Y = Σ_j exp(S_ij − α_i − β_j) X_j or the row softmax form; returns (Y fp32, LSE or None)."""
    _check_features(q)
    width = x.shape[-1]
    y, lse = _ext().affinity_matmul(_features(q), _features(k), _right_hand_side(x, q.dtype),
                                    _float32(row_offset), _float32(col_offset), _float32(head_weights),
                                    float(scale), normalize == "row")
    return y[..., :width], (lse if normalize == "row" else None)


def logsumexp(q, k, *, scale, col_offset=None):
    """r_i = log Σ_j exp(S_ij − β_j), (G, H, N) fp32."""
    _check_features(q)
    return _ext().affinity_logsumexp(_features(q), _features(k), _float32(col_offset), float(scale))


def symmetric_matmul(q, k, x, *, scale, offset=None, row_offset=None, col_offset=None, head_weights=None):
    """½(E + Eᵀ)·X with E_ij = exp(S_ij − α_i − β_j); one pass (half the tiles when q is k)
    for α = β, the two row products ½(E·X + Eᵀ·X) otherwise (the kernels read one offset)."""
    _check_features(q)
    alpha, beta = symmetric_offsets_args(offset, row_offset, col_offset)
    if not same_tensor(alpha, beta):
        y, _ = matmul(q, k, x, scale=scale, row_offset=alpha, col_offset=beta, head_weights=head_weights)
        y_t, _ = matmul(k, q, x, scale=scale, row_offset=beta, col_offset=alpha, head_weights=head_weights)
        return 0.5 * (y + y_t)
    same = same_tensor(q, k)
    qc = _features(q)
    kc = qc if same else _features(k)
    width = x.shape[-1]
    y = _ext().affinity_symmetric_matmul(qc, kc, _right_hand_side(x, q.dtype), _float32(alpha),
                                         _float32(head_weights), float(scale), same)
    return y[..., :width]


# --------------------------------------------------------------------------- auto selection
_CHOICES: dict = {}
_TIMED_RUNS = 3


def _median_ms(fn, runs=_TIMED_RUNS):
    fn()  # warm-up: compilation, autotuning, allocator
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def _stream_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose_over_triton(shape_key, run) -> bool:
    """True when this backend beats triton on the call ``run(module)`` (timed once per key, cached).

    shape_key is ``(op, G·H, N, M, d, m or None, dtype)`` as built by ``ops._common``; ``run``
    is the call being dispatched, on its real inputs, so what is timed is exactly what would
    run — e.g. the symmetric product with α ≠ β, which these kernels take in two passes.
    Timed with CUDA events; a backend that fails on the call loses. During a CUDA graph
    capture nothing is timed (nor cached): triton runs.
    """
    if shape_key in _CHOICES:
        return _CHOICES[shape_key]
    if _stream_capturing():
        # Timing synchronises, which would invalidate the caller's CUDA graph capture: take
        # the untimed default (triton, else torch) and time at the next eager call. Capturing
        # callers warm up eagerly first (as GraphedStep does), so the choice is usually cached.
        return False
    from . import backends

    triton_backend = backends._load("triton")
    choice = True
    try:
        *_, d, _, dtype = shape_key
        if dtype not in SUPPORTED_DTYPES or d > MAX_HEAD_DIM:
            choice = False
        elif triton_backend is not None:
            cuda_ms = _median_ms(lambda: run(importlib.import_module(__name__)))
            try:
                triton_ms = _median_ms(lambda: run(triton_backend))
            except Exception:
                triton_ms = float("inf")
            choice = cuda_ms <= triton_ms
    except Exception:
        choice = False  # the cuda kernels failed on this shape: let triton have it
    _CHOICES[shape_key] = choice
    return choice
