"""Atomic checkpoint files and the random-number states a resumed run must restore."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

__all__ = ["save_atomic", "load", "capture_rng_states", "restore_rng_states"]


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, then os.replace onto ``path``.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike, device=None) -> dict:
    """Read a checkpoint written by ``save_atomic`` (tensors mapped to ``device``)."""
    return torch.load(os.fspath(path), map_location=device, weights_only=False)


def capture_rng_states(generator: torch.Generator | None = None) -> dict:
    """Global torch (CPU and CUDA), numpy and python states, plus the solver's own generator."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": None if generator is None else generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if generator is not None and states.get("generator") is not None:
        generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
