"""Graphs as matrix-free operators (DESIGN.md §2–3), built on the primitive in ``ops``.

    base.py      the operator interface, weighted sums, adjoints, dense/callable wrappers
    affinity.py  KQAffinity (attention) and VVAffinity (value cosine), one layer, heads averaged
    pooled.py    Gᵀ M G on a base grid, and layer_operator / multilayer_operator from captures
    sparse.py    a sparse graph (knn_graph's CSR) as an operator
"""
from .affinity import KQAffinity, VVAffinity
from .base import AffinityOperator, CallableOperator, DenseOperator, SumOperator, as_operator
from .pooled import PooledOperator, layer_operator, multilayer_operator
from .sparse import SparseOperator

__all__ = ["AffinityOperator", "KQAffinity", "VVAffinity", "SumOperator", "DenseOperator", "CallableOperator",
           "PooledOperator", "SparseOperator", "as_operator", "layer_operator", "multilayer_operator"]
