"""The one primitive (DESIGN.md §2): public dispatch plus one module per backend.

    _common.py      validation and the canonical layout shared by the ops
    affinity.py     affinity_matmul and affinity_logsumexp (custom ops + public functions)
    symmetric.py    affinity_symmetric_matmul (one pass, self-adjoint)
    pair.py         affinity_matmul_pair: (E·X, Eᵀ·W) from one pass
    backends.py     which backends exist and what ``backend="auto"`` picks
    reference.py    dense float64-capable reference (tests only)
    blockwise.py    tiled torch backend (CPU and GPU)
    triton_backend.py / cuda_backend.py   GPU kernels (optional)
"""
from .affinity import affinity_logsumexp, affinity_matmul
from .pair import affinity_matmul_pair
from .symmetric import affinity_symmetric_matmul
from .backends import available_backends

__all__ = ["affinity_matmul", "affinity_logsumexp", "affinity_symmetric_matmul", "affinity_matmul_pair",
           "available_backends"]
