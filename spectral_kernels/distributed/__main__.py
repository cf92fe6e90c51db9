"""Launch entry point: sharded eigenvectors or kNN graph of a token-feature file, under torchrun.

    torchrun --nproc-per-node 8 -m spectral_kernels.distributed eigsh \\
        --features feats.npy --graph vv --n-eig 20 --out run/ --checkpoint run/ckpt --resume

Each rank memory-maps the .npy file(s) and reads only its rows (an even split), so no rank
loads all tokens. Results are written per rank, atomically, as ``OUT/<task>.rank{r}-of-{P}.pt``
holding this rank's global row range and rows of the result.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .eigsh import distributed_eigsh
from .knn import sharded_knn_graph
from .operators import ShardedKQAffinity, ShardedVVAffinity
from .shards import init_distributed, row_partition


def _parser():
    p = argparse.ArgumentParser(prog="python -m spectral_kernels.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--features", required=True, help=".npy of (N, d) or (H, N, d) features (q, or v for VV)")
    common.add_argument("--keys", help=".npy of keys k for KQ graphs (same shape as --features)")
    common.add_argument("--out", required=True, help="output directory")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    e = sub.add_parser("eigsh", parents=[common], help="top eigenvectors of the sym-normalised graph")
    e.add_argument("--graph", choices=("kq", "vv"), default="vv")
    e.add_argument("--n-eig", type=int, default=20)
    e.add_argument("--temperature", type=float, default=0.1, help="VV temperature")
    e.add_argument("--tol", type=float, default=1e-5)
    e.add_argument("--max-iter", type=int, default=1000)
    e.add_argument("--checkpoint", help="per-rank checkpoint path prefix")
    e.add_argument("--checkpoint-every", type=int, default=10)
    e.add_argument("--resume", action="store_true")
    k = sub.add_parser("knn", parents=[common], help="this rank's rows of the kNN graph")
    k.add_argument("--image-ids", required=True, help=".npy of (N,) integer image ids")
    k.add_argument("--n-intra", type=int, default=50)
    k.add_argument("--n-inter", type=int, default=50)
    k.add_argument("--threshold", type=float, default=0.1)
    k.add_argument("--normalize", choices=("row", "sym", "none"), default="row")
    return p


def _local_rows(path, counts, rank, device, token_dim):
    array = np.load(path, mmap_mode="r")
    start = sum(counts[:rank])
    index = [slice(None)] * array.ndim
    index[token_dim] = slice(start, start + counts[rank])
    return torch.from_numpy(np.array(array[tuple(index)], copy=True)).to(device)


def main(argv=None):
    args = _parser().parse_args(argv)
    init_distributed(timeout_s=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = np.load(args.features, mmap_mode="r").shape
    n = shape[-2]
    counts = row_partition(n, world)
    os.makedirs(args.out, exist_ok=True)
    start = sum(counts[:rank])
    result = {"rows": (start, start + counts[rank]), "world_size": world, "n": n}
    if args.task == "eigsh":
        q = _local_rows(args.features, counts, rank, args.device, token_dim=-2)
        if args.graph == "vv":
            op = ShardedVVAffinity(q, temperature=args.temperature)
        else:
            k = _local_rows(args.keys or args.features, counts, rank, args.device, token_dim=-2)
            op = ShardedKQAffinity(q, k)
        vals, vecs = distributed_eigsh(op, args.n_eig, tol=args.tol, max_iter=args.max_iter,
                                       checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                                       resume=args.resume)
        result.update(eigenvalues=vals.cpu(), eigenvectors=vecs.cpu())
    else:
        q = _local_rows(args.features, counts, rank, args.device, token_dim=0)
        k = _local_rows(args.keys, counts, rank, args.device, token_dim=0) if args.keys else q
        ids = _local_rows(args.image_ids, counts, rank, args.device, token_dim=0)
        graph = sharded_knn_graph(q, k, n_intra=args.n_intra, n_inter=args.n_inter, image_ids_local=ids,
                                  threshold=args.threshold, normalize=args.normalize)
        result.update(crow_indices=graph.crow_indices().cpu(), col_indices=graph.col_indices().cpu(),
                      values=graph.values().cpu(), shape=tuple(graph.shape))
    ckpt.save_atomic(result, os.path.join(args.out, f"{args.task}.rank{rank}-of-{world}.pt"))
    dist.barrier()
    if rank == 0:
        print(f"wrote {world} shards of {args.task} for N = {n} to {args.out}", file=sys.stderr)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
