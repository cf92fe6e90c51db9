"""Dataset run cost at 32 × 32 tokens per image: per-step time, extrapolated to a whole dataset.

    python bench/bench_dataset.py --device cpu --batch-images 8 --layers 2 --heads 2     # this machine
    python bench/bench_dataset.py --device cuda                                         # GPU: 40 images,
                                                                                        # DINOv2-S 12 × 6

Synthetic features (no model, no images): every layer is a 32 × 32 grid with ``--heads``
heads of width ``--dim`` (unit-norm random vectors for VV graphs, as the cache holds). One
outer step of a dataset run = build the batch's graph (kNN: one ``knn_graph`` per layer and
head over batch_images·1024 tokens; dense: move q/k to the device) + ``--inner-steps``
optimiser steps (loss, backward, row-wise AdamW) + the EMA update. The per-step time does
not depend on the dataset size (the table update touches the batch's rows only), so a run
over ``--images`` images costs steps × per-step, with steps = epochs · ⌊images / batch⌋.
Printed: graph build and inner-step times, peak memory (CUDA: max allocated; CPU: peak RSS
growth of this process), and the extrapolation for one epoch and for ``--epochs`` epochs.

Also a tiny pytest-benchmark case: ``pytest bench/bench_dataset.py``.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from spectral_kernels._validation import finite_checks
from spectral_kernels.dataset.features import LayerFeatures
from spectral_kernels.dataset.graphs import DenseBatchGraph, KnnBatchGraph
from spectral_kernels.dataset.table import LogitTableState

GRID = (32, 32)


def synthetic_layers(batch, layers, heads, dim, seed=0):
    """VV features of one batch: per layer (batch, heads, 1024, dim) unit vectors with some
    structure (a few shared directions per image), float16 as in the feature cache."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    out = []
    for layer in range(layers):
        centres = torch.randn(batch, heads, 8, dim, generator=gen)
        assign = torch.randint(0, 8, (batch, heads, n), generator=gen)
        v = centres.gather(2, assign[..., None].expand(-1, -1, -1, dim)) + 0.7 * torch.randn(batch, heads, n, dim,
                                                                                             generator=gen)
        out.append(LayerFeatures(f"layer{layer}", GRID, dim ** -0.5, F.normalize(v, dim=-1).half()))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(layers, table, index, device, *, mode, n_intra, n_inter, inner_steps, step=0):
    """One outer step; returns (graph build seconds, inner steps seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    local = torch.arange(len(index))
    if mode == "knn":
        graph = KnnBatchGraph(layers, local, GRID, n_intra=n_intra, n_inter=n_inter, threshold=0.1, device=device)
    else:
        graph = DenseBatchGraph(layers, local, GRID, graph="vv", temperature=0.1, device=device)
    _sync(device)
    t1 = time.perf_counter()
    dev_index = index.to(device)
    table.ema_sync(dev_index, step)
    for _ in range(inner_steps):
        logits = table.rows(dev_index)
        loss = graph.loss(logits.softmax(1).flatten(2).transpose(1, 2))
        loss.backward()
        table.adam_step(dev_index, logits.grad)
    table.ema_update(dev_index, step)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default="knn,dense", help="comma-separated: knn, dense")
    parser.add_argument("--images", type=int, default=1000, help="dataset size to extrapolate to")
    parser.add_argument("--batch-images", type=int, default=40)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-eig", type=int, default=20)
    parser.add_argument("--n-intra", type=int, default=50)
    parser.add_argument("--n-inter", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed outer steps (after one warm-up step)")
    parser.add_argument("--epochs", type=int, default=190, help="official schedule: 190 epochs")
    args = parser.parse_args()
    device = torch.device(args.device)

    layers = synthetic_layers(args.batch_images, args.layers, args.heads, args.dim)
    tokens = args.batch_images * GRID[0] * GRID[1]
    print(f"device {device}; batch {args.batch_images} images × 32×32 = {tokens} tokens per graph; "
          f"{args.layers} layers × {args.heads} heads, d = {args.dim}, K = {args.n_eig}, "
          f"{args.inner_steps} inner steps; kNN {args.n_intra} + {args.n_inter}")
    for mode in args.mode.split(","):
        init = torch.randn(args.images, args.n_eig, *GRID, generator=torch.Generator().manual_seed(0))
        table = LogitTableState(init.to(device), lr=1e-2, ema=0.99)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        builds, inners = [], []
        with finite_checks(False):
            for step in range(args.steps + 1):
                index = torch.randperm(args.images)[:args.batch_images].sort().values
                build, inner = one_step(layers, table, index, device, mode=mode, n_intra=args.n_intra,
                                        n_inter=args.n_inter, inner_steps=args.inner_steps, step=step)
                if step:  # the first step warms up caches and kernels
                    builds.append(build)
                    inners.append(inner)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
        build, inner = sorted(builds)[len(builds) // 2], sorted(inners)[len(inners) // 2]
        per_step = build + inner
        per_epoch = args.images // args.batch_images
        print(f"{mode:5s}: graph {build:8.3f} s + {args.inner_steps} inner steps {inner:8.3f} s = "
              f"{per_step:8.3f} s/step (median of {args.steps}); peak memory {peak / 2 ** 30:6.2f} GiB"
              f"{' (RSS growth)' if device.type == 'cpu' else ''}")
        print(f"       {args.images} images: {per_epoch} steps/epoch → {per_epoch * per_step / 60:8.1f} min/epoch, "
              f"{args.epochs} epochs {args.epochs * per_epoch * per_step / 3600:8.2f} h")


def test_bench_dataset_step_small(benchmark):
    """pytest-benchmark smoke case: 4 images × 32×32 tokens, 2 layers × 2 heads, kNN 10 + 10."""
    layers = synthetic_layers(4, 2, 2, 32)
    table = LogitTableState(torch.randn(16, 8, *GRID), lr=1e-2, ema=0.99)
    index = torch.tensor([1, 5, 6, 11])
    with finite_checks(False):
        benchmark(lambda: one_step(layers, table, index, torch.device("cpu"), mode="knn", n_intra=10, n_inter=10,
                                   inner_steps=2))


if __name__ == "__main__":
    main()
