"""The one primitive (DESIGN.md §2): public dispatch plus one module per backend.

    affinity.py     validation, canonical layout, torch.library ops, public functions
    backends.py     which backends exist and what ``backend="auto"`` picks
    reference.py    dense float64-capable reference (tests only)
    blockwise.py    tiled torch backend (CPU and GPU)
    triton_backend.py / cuda_backend.py   GPU kernels (optional)
"""
from .affinity import affinity_logsumexp, affinity_matmul, affinity_matmul_pair, affinity_symmetric_matmul
from .backends import available_backends

__all__ = ["affinity_matmul", "affinity_logsumexp", "affinity_symmetric_matmul", "affinity_matmul_pair",
           "available_backends"]
