"""spectral_kernels: fused kernels for spectral clustering of attention-layer affinities.

The primitive is imported eagerly (it is light); everything above it is imported on first
use of its name, so ``import spectral_kernels`` stays fast. Importing the package never
imports triton and never initialises CUDA.
"""
from __future__ import annotations

import importlib

from .ops import (affinity_logsumexp, affinity_matmul, affinity_matmul_pair, affinity_symmetric_matmul,
                  available_backends)

# Imported eagerly because the function shares its module's name: importing the submodule
# spectral_kernels.eigsh would otherwise replace the package attribute with the module.
from .eigsh import EigshInfo, eigsh

__version__ = "0.1.0"

# public name -> submodule that defines it (loaded lazily, PEP 562)
_LAZY = {
    "GridPooling": "pooling",
    "KQAffinity": "operators",
    "VVAffinity": "operators",
    "AffinityOperator": "operators",
    "SumOperator": "operators",
    "PooledOperator": "operators",
    "layer_operator": "operators",
    "multilayer_operator": "operators",
    "SpectralSolver": "solver",
    "SolverConfig": "solver",
    "SolverResult": "solver",
    "load_model": "models",
    "list_models": "models",
    "load_image": "images",
    "analyze_dataset": "dataset",
    "ncut_loss": "objective",
    "knn_graph": "knn",
}

__all__ = ["affinity_matmul", "affinity_logsumexp", "affinity_symmetric_matmul", "affinity_matmul_pair",
           "available_backends",
           "eigsh", "EigshInfo", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
