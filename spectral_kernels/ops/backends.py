"""Which backends exist here, and which one ``backend="auto"`` picks.

A backend is a module with ``matmul``, ``logsumexp`` and ``symmetric_matmul`` taking the
canonical layout of ``spectral_kernels.ops._layout`` (and optionally ``can_launch``, which
``auto`` asks before choosing it for a shape). Optional backends (triton, cuda)
are imported lazily on first use, so importing the package never imports triton and
never initialises CUDA; a backend that cannot load is simply absent.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKEND_MODULES = {
    "dense": "spectral_kernels.ops.reference",
    "torch": "spectral_kernels.ops.blockwise",
    "triton": "spectral_kernels.ops.triton_backend",
    "cuda": "spectral_kernels.ops.cuda_backend",
}
BACKEND_NAMES = tuple(BACKEND_MODULES)


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """The backend module, or None when it cannot be imported here."""
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError:
        return None
    is_available = getattr(module, "is_available", None)
    if is_available is not None and not is_available():
        return None
    return module


def available_backends() -> list[str]:
    """Backends usable in this process, in the order ``"auto"`` prefers them on a GPU."""
    names = ["dense", "torch"]
    # Only import triton where it can run: the import alone costs seconds on a CPU machine.
    if (torch.cuda.is_available() or triton_interpreted()) and _load("triton") is not None:
        names.append("triton")
    if torch.cuda.is_available() and _load("cuda") is not None:
        names.append("cuda")
    return names


def backend_supports(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    if name in ("dense", "torch"):
        return True
    if dtype == torch.float64:
        return False  # the GPU kernels accumulate in fp32 only
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return device.type == "cuda"


def resolve(backend: str, device: torch.device, dtype: torch.dtype, shape_key=None, run=None):
    """The backend module to run for these inputs; ``auto`` picks the fastest available.

    ``run(module)`` is the call being dispatched (on its real inputs) and ``shape_key`` what
    the choice is cached by (``_common._shape_key``): where two GPU backends compete, auto
    times that very call on each (once per key), fallbacks such as two passes for a fused
    product included.
    """
    if backend not in BACKEND_NAMES and backend != "auto":
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        backend = _auto(device, dtype, shape_key, run)
    if backend not in ("dense", "torch") and backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here (available: {available_backends()})")
    if not backend_supports(backend, device, dtype):
        raise ValueError(f"backend {backend!r} does not support {dtype} tensors on {device.type}")
    return _load(backend)


def _auto(device, dtype, shape_key, run):
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"  # interpreted Triton is for tests, never the fast path on CPU
    names = available_backends()
    if "cuda" in names and shape_key is not None and run is not None:
        # choose_over_triton times the call once per key (cached) and says False for shapes
        # the cuda kernels cannot run (d > 256, ...); those go to triton, or torch without it.
        if _load("cuda").choose_over_triton(shape_key, run):
            return "cuda"
    if "triton" in names and _can_launch(_load("triton"), shape_key, device):
        return "triton"
    return "torch"  # no triton, or features too wide for any of its tiles


def _can_launch(module, shape_key, device) -> bool:
    """A backend's optional ``can_launch(shape_key, device)``: False where its kernels have
    no tile for the shape (absent: it runs every shape)."""
    can_launch = getattr(module, "can_launch", None)
    return shape_key is None or can_launch is None or can_launch(shape_key, device)
