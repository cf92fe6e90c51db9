"""Input checks shared by every public entry point: clear errors that name the argument."""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_FINITE_CHECKS = contextvars.ContextVar("spectral_kernels_finite_checks", default=True)


def finite_checks_enabled() -> bool:
    """NaN/Inf scans cost one pass and (on a GPU) one sync; SPECTRAL_KERNELS_CHECK_FINITE=0 skips them."""
    if torch.compiler.is_compiling():
        return False  # checked first: Dynamo cannot trace ContextVar.get
    return _FINITE_CHECKS.get() and os.environ.get("SPECTRAL_KERNELS_CHECK_FINITE", "1") != "0"


@contextlib.contextmanager
def finite_checks(enabled: bool):
    """Turn the per-call NaN/Inf scans on or off inside a block (e.g. a solver's hot loop
    whose inputs were scanned once up front); thread- and task-local."""
    token = _FINITE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _FINITE_CHECKS.reset(token)


def check_tensor(name: str, t, *, min_dim: int = 0, dim: int | None = None,
                 dtypes=FLOAT_DTYPES, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of {names}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")
    if finite:
        check_finite(name, t)
    return t


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Raise if t holds NaN/Inf (skipped for meta tensors and when checks are disabled)."""
    if t.numel() and t.is_floating_point() and t.device.type != "meta" and finite_checks_enabled():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    return t


def check_same_device(**tensors) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return next(iter(devices))


def check_positive(name: str, value, *, allow_zero: bool = False):
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return value
