"""Sharded graphs over torch.distributed (NCCL on GPUs, gloo on CPU): rows split over ranks.

    shards.py     row layout, init_distributed (timeouts), the cross-rank agreement check
    ring.py       the ring pass of shards (prefetching the next one; carried accumulators)
    operators.py  ShardedKQAffinity / ShardedVVAffinity (products, degrees, gram)
    eigsh.py      distributed_eigsh: block LOBPCG on a sharded operator, per-rank checkpoints
    knn.py        sharded_knn_graph: this rank's rows of the kNN graph, by a ring of key shards
    solver.py     sharded_fit: Adam on the paper's objective over sharded graphs (exact gradients)
    checkpoints.py  per-rank checkpoints in two alternating slots, resumed consistently
    __main__.py   the torchrun entry point (python -m spectral_kernels.distributed eigsh|knn ...)
"""
from .eigsh import distributed_eigsh
from .knn import sharded_knn_graph
from .operators import ShardedKQAffinity, ShardedOperator, ShardedSumOperator, ShardedVVAffinity
from .ring import ring_pass
from .shards import ShardLayout, init_distributed, local_rows_of, row_partition
from .solver import ShardedFitResult, global_gram, sharded_fit, sharded_matmul, sharded_objective

__all__ = ["ShardedKQAffinity", "ShardedVVAffinity", "ShardedOperator", "ShardedSumOperator", "ShardLayout", "init_distributed",
           "local_rows_of", "row_partition", "ring_pass", "distributed_eigsh", "sharded_knn_graph", "sharded_fit",
           "sharded_objective", "sharded_matmul", "global_gram", "ShardedFitResult"]
