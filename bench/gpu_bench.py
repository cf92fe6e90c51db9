#!/usr/bin/env python
"""GPU benchmark of the primitive against SDPA and chunked torch; prints a markdown table.

    python bench/gpu_bench.py [--quick] [--sizes 16384,65536,262144]

Workload (DESIGN.md §5): A_ij = exp(q_i·k_j/8), d = 64, X of width m = 32, bf16 inputs,
one head unless stated. Every row is timed with CUDA events (median of several calls
after warm-up) in this run, and compared with SDPA cuDNN measured in the same run at the
same N. "TFLOP/s" counts 4·N²·d per head (per product for the two-product rows). SDPA
backends that need equal head dims get V padded to 64 (said in the row). Failing rows print
their error and the run goes on.

The pair rows time (P·X, Pᵀ·X) with P = softmax rows (α = row LSE, precomputed): the fused
one-pass kernel against the same two products as two offset-form row products, and
against two cuDNN calls (the swapped call stands in for Pᵀ·X in cost only: SDPA cannot
apply the row normalisation of the un-swapped problem to columns).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time

os.environ.setdefault("SPECTRAL_KERNELS_CHECK_FINITE", "0")  # no NaN scans (a sync each) in timings

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spectral_kernels.ops import (affinity_logsumexp, affinity_matmul, affinity_matmul_pair,  # noqa: E402
                                  affinity_symmetric_matmul, available_backends)
from spectral_kernels.ops.backends import BACKEND_MODULES  # noqa: E402

D, WIDTH, SCALE, HEADS = 64, 32, 1.0 / 8.0, 12
CHUNK = 8192
DEFAULT_SIZES = (16384, 65536, 262144)


# --------------------------------------------------------------------------- timing
def cuda_ms(fn, *, warmup=3, reps=10, budget_s=3.0):
    """Median milliseconds per fn() call by CUDA events.

    Each sample times a back-to-back run of several calls (≥ ~20 ms of GPU work) so the
    Python launch overhead of one call does not show up as idle GPU time between events;
    fewer samples are taken when one call is slow.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    single = max(time.perf_counter() - start, 1e-6)
    inner = max(1, min(50, int(0.02 / single)))
    reps = max(1, min(reps, int(budget_s / (single * inner))))
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / inner)
    return statistics.median(times)


class Table:
    """Markdown rows, printed as they are measured and again at the end."""

    HEADER = "| N | heads | method | ms | TFLOP/s | vs cuDNN (time ratio) | note |\n|---|---|---|---|---|---|---|"

    def __init__(self):
        self.rows = []
        self.cudnn = {}
        self.ms = {}  # (n, heads, method) → ms, for the goal summary
        print(self.HEADER, flush=True)

    def add(self, n, heads, method, fn, *, note="", flops_heads=None, reference=False, **timing):
        try:
            ms = fn() if timing.get("precomputed") else cuda_ms(fn, **timing)
        except Exception as exc:  # a backend that fails here must not stop the table
            torch.cuda.synchronize()
            row = f"| {n} | {heads} | {method} | error | | | {type(exc).__name__}: {str(exc)[:120]} |"
        else:
            tflops = 4 * n * n * D * (flops_heads or heads) / (ms * 1e-3) / 1e12
            self.ms[(n, heads, method)] = ms
            if reference:
                self.cudnn[(n, heads)] = ms
            base = self.cudnn.get((n, heads))
            ratio = f"{ms / base:.2f}" if base else "n/a"
            row = f"| {n} | {heads} | {method} | {ms:.3f} | {tflops:.0f} | {ratio} | {note} |"
        self.rows.append(row)
        print(row, flush=True)
        return row

    def dump(self):
        print("\n" + self.HEADER)
        print("\n".join(self.rows), flush=True)

    def goals(self, sizes, backends):
        """The DESIGN.md §5 goals as ratios measured in this run."""
        print("\nGoals (DESIGN.md §5), from this run:")
        for name in [b for b in ("triton", "cuda") if b in backends]:
            for n in sizes:
                cudnn = self.cudnn.get((n, 1))
                row = self.ms.get((n, 1, f"{name} row-normalised"))
                sym = self.ms.get((n, 1, f"{name} symmetric fused ½(E+Eᵀ)X"))
                walks = {w: self.ms.get((n, 1, f"{name} symmetric, {w} walk")) for w in ("rect", "paired")}
                pair = self.ms.get((n, 1, f"{name} pair (P·X, Pᵀ·X)"))
                two_rows = self.ms.get((n, 1, f"{name} pair as 2 row products"))
                chunked = self.ms.get((n, 1, "chunked torch bf16"))
                parts = []
                if cudnn and row:
                    parts.append(f"row-normalised {row / cudnn:.2f}× cuDNN time (goal ≤ 1.00)")
                if cudnn and sym:
                    parts.append(f"symmetric fused {sym / cudnn:.2f}× one cuDNN call (goal ≤ 1.20)")
                if cudnn and all(walks.values()):
                    parts.append("walks: " + ", ".join(f"{w} {ms / cudnn:.2f}×" for w, ms in walks.items()))
                if cudnn and pair:
                    parts.append(f"pair {pair / cudnn:.2f}× one cuDNN call")
                if two_rows and pair:
                    parts.append(f"pair {two_rows / pair:.2f}× faster than two row products")
                if chunked and sym:
                    parts.append(f"symmetric {chunked / sym:.1f}× faster than chunked torch"
                                 + (" (goal ≥ 15)" if n >= 262144 else ""))
                if chunked and row:
                    parts.append(f"row-normalised {chunked / row:.1f}× faster than chunked torch")
                print(f"- {name}, N = {n}: " + ("; ".join(parts) if parts else "no data"), flush=True)


# --------------------------------------------------------------------------- workloads
def with_symmetric_walk(walk, fn):
    """Run fn with the Triton symmetric kernel's walk forced (read at each launch)."""
    before = os.environ.get("SPECTRAL_KERNELS_SYMMETRIC_WALK")
    os.environ["SPECTRAL_KERNELS_SYMMETRIC_WALK"] = walk
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["SPECTRAL_KERNELS_SYMMETRIC_WALK"]
        else:
            os.environ["SPECTRAL_KERNELS_SYMMETRIC_WALK"] = before


def inputs(n, heads=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (heads, n, D) if heads > 1 else (n, D)
    q = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, WIDTH, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, x


def sdpa(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, scale=SCALE)


def sdpa_4d(q, k, x, pad):
    """(B, H, N, ·) views for SDPA; V zero-padded to D when the backend needs equal head dims."""
    q4 = q.reshape(1, -1, q.shape[-2], D)
    k4 = k.reshape(1, -1, k.shape[-2], D)
    v = F.pad(x, (0, D - WIDTH)) if pad else x
    v4 = v.reshape(1, 1, *v.shape[-2:]).expand(1, q4.shape[1], *v.shape[-2:]).contiguous()
    return q4, k4, v4


def chunked_torch(q, k, x, rows=None):
    """The baseline: softmax(q_blk kᵀ/8)·X per 8192-row block, bf16 torch ops."""
    n = q.shape[0] if rows is None else rows
    out = []
    for i in range(0, n, CHUNK):
        s = (q[i:i + CHUNK] @ k.T) * SCALE
        out.append(torch.softmax(s, dim=-1) @ x)
    return out


def bench_size(table, n, backends, quick):
    from torch.nn.attention import SDPBackend

    q, k, x = inputs(n)
    q4, k4, v64 = sdpa_4d(q, k, x, pad=True)
    _, _, v32 = sdpa_4d(q, k, x, pad=False)
    table.add(n, 1, "SDPA cuDNN", lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q4, k4, v64),
              note="V padded to 64", reference=True)
    table.add(n, 1, "SDPA flash", lambda: sdpa(SDPBackend.FLASH_ATTENTION, q4, k4, v64), note="V padded to 64")
    table.add(n, 1, "SDPA mem-efficient", lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION, q4, k4, v32), note="m = 32")
    lse = {}

    def row_lse(name):
        # Computed on first use, inside the timed row's error handling.
        if name not in lse:
            lse[name] = affinity_logsumexp(q, k, scale=SCALE, backend=name)
        return lse[name]

    for name in ("triton", "cuda"):
        if name in backends:
            table.add(n, 1, f"{name} row-normalised",
                      lambda b=name: affinity_matmul(q, k, x, scale=SCALE, normalize="row", backend=b))
            table.add(n, 1, f"{name} offset form (α = row LSE)",
                      lambda b=name: affinity_matmul(q, k, x, scale=SCALE, row_offset=row_lse(b), backend=b))
            table.add(n, 1, f"{name} logsumexp", lambda b=name: affinity_logsumexp(q, k, scale=SCALE, backend=b),
                      note="exp only, no P·X")
    if not quick:
        table.add(n, 1, "torch backend row-normalised",
                  lambda: affinity_matmul(q, k, x, scale=SCALE, normalize="row", backend="torch"),
                  warmup=1, reps=3, budget_s=2.0)
    # Chunked baseline: at the largest size time a few blocks and extrapolate linearly.
    blocks = math.ceil(n / CHUNK)
    timed_blocks = blocks if n * n <= 65536 * 65536 else 4
    note = "8192-row blocks" + (f"; {timed_blocks} of {blocks} blocks timed, ×{blocks / timed_blocks:g}"
                                if timed_blocks < blocks else "")
    table.add(n, 1, "chunked torch bf16",
              lambda: cuda_ms(lambda: chunked_torch(q, k, x, rows=timed_blocks * CHUNK), warmup=1, reps=3)
              * blocks / timed_blocks, precomputed=True, note=note)

    # Symmetric fused product vs two SDPA calls (P·X and Pᵀ·X).
    def two_sdpa():
        sdpa(SDPBackend.CUDNN_ATTENTION, q4, k4, v64)
        sdpa(SDPBackend.CUDNN_ATTENTION, k4, q4, v64)

    table.add(n, 1, "2 × SDPA cuDNN (P·X and Pᵀ·X)", two_sdpa, note="V padded to 64", flops_heads=2)
    for name in ("triton", "cuda"):
        if name in backends:
            table.add(n, 1, f"{name} symmetric fused ½(E+Eᵀ)X",
                      lambda b=name: affinity_symmetric_matmul(q, k, x, scale=SCALE, offset=row_lse(b), backend=b),
                      note="one pass, q ≠ k; ratio vs ONE cuDNN call", flops_heads=2)
            table.add(n, 1, f"{name} symmetric fused, q is k",
                      lambda b=name: affinity_symmetric_matmul(q, q, x, scale=SCALE, offset=row_lse(b), backend=b),
                      note="triangle tiles only; ratio vs ONE cuDNN call", flops_heads=2)
    if "triton" in backends:
        # The two walks of q ≠ k that the autotuner chooses between (row above), each forced.
        for walk, what in (("rect", "rectangle walk, column atomics per tile"),
                           ("paired", "upper triangle of pair tiles E_IJ + E_JIᵀ")):
            table.add(n, 1, f"triton symmetric, {walk} walk",
                      lambda w=walk: with_symmetric_walk(w, lambda: affinity_symmetric_matmul(
                          q, k, x, scale=SCALE, offset=row_lse("triton"), backend="triton")),
                      note=f"{what}; ratio vs ONE cuDNN call", flops_heads=2)
        table.add(n, 1, "triton ½(P+Pᵀ)X (α = row LSE, β = 0)",
                  lambda: affinity_symmetric_matmul(q, k, x, scale=SCALE, row_offset=row_lse("triton"),
                                                    backend="triton"),
                  note="the solver's random-walk product; ratio vs ONE cuDNN call", flops_heads=2)
    # Pair (P·X, Pᵀ·X), α = row LSE: fused one pass vs two row products (vs the 2 × cuDNN row above).
    for name in ("triton", "cuda"):
        if name in backends:
            fused = hasattr(importlib.import_module(BACKEND_MODULES[name]), "matmul_pair")
            table.add(n, 1, f"{name} pair (P·X, Pᵀ·X)",
                      lambda b=name: affinity_matmul_pair(q, k, x, x, scale=SCALE, row_offset=row_lse(b), backend=b),
                      note=("fused, one pass" if fused else "no fused kernel: two products inside the backend")
                      + "; ratio vs ONE cuDNN call", flops_heads=2)

            def two_row_products(b=name):
                r = row_lse(b)
                affinity_matmul(q, k, x, scale=SCALE, row_offset=r, backend=b)
                affinity_matmul(k, q, x, scale=SCALE, col_offset=r, backend=b)

            table.add(n, 1, f"{name} pair as 2 row products", two_row_products,
                      note="offset form, α/β = row LSE; ratio vs ONE cuDNN call", flops_heads=2)
    del q, k, x, q4, k4, v64, v32
    torch.cuda.empty_cache()


def bench_heads(table, n, backends):
    from torch.nn.attention import SDPBackend

    q, k, x = inputs(n, heads=HEADS)
    w = torch.full((HEADS,), 1.0 / HEADS, device=q.device)
    q4, k4, v64 = sdpa_4d(q, k, x, pad=True)

    def cudnn_heads():
        y = sdpa(SDPBackend.CUDNN_ATTENTION, q4, k4, v64)
        return torch.einsum("h,hnm->nm", w.to(y.dtype), y[0, :, :, :WIDTH])

    table.add(n, HEADS, "SDPA cuDNN, heads summed", cudnn_heads, note="V padded to 64; + weighted sum",
              reference=True)
    for name in ("triton", "cuda"):
        if name in backends:
            table.add(n, HEADS, f"{name} row-normalised, heads summed in-kernel",
                      lambda b=name: affinity_matmul(q, k, x, scale=SCALE, normalize="row", head_weights=w,
                                                     backend=b), note="shared X")
    del q, k, x, q4, k4, v64
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- correctness
def spot_check(backends, n=4096):
    """Relative max error vs the dense fp32 result at N = 4096 (bf16 inputs)."""
    q, k, x = inputs(n, seed=1)
    qf, kf, xf = q.float(), k.float(), x.float()
    s = (qf @ kf.T) * SCALE
    dense_row = torch.softmax(s, dim=-1) @ xf
    r = torch.logsumexp(s, dim=-1)
    c = torch.logsumexp(s, dim=0)
    a = 0.5 * (torch.logaddexp(r, c) - math.log(2.0))
    e = torch.exp(s - a[:, None] - a[None, :])
    dense_sym = 0.5 * (e + e.T) @ xf
    e_vv = torch.exp((qf @ qf.T) * SCALE - r[:, None] - r[None, :])
    dense_vv = e_vv @ xf
    p = torch.softmax(s, dim=-1)
    dense_pt = p.T @ xf
    del s, e, e_vv, p

    def rel(y, ref):
        return ((y.float() - ref).abs().max() / ref.abs().max()).item()

    print(f"\nCorrectness spot check, N = {n}, bf16 inputs, vs dense fp32 (max error / max |ref|):")
    for name in [b for b in ("triton", "cuda", "torch") if b in backends]:
        try:
            y = affinity_matmul(q, k, x, scale=SCALE, normalize="row", backend=name)
            y_sym = affinity_symmetric_matmul(q, k, x, scale=SCALE, offset=a, backend=name)
            y_vv = affinity_symmetric_matmul(q, q, x, scale=SCALE, offset=r, backend=name)
            r_b = affinity_logsumexp(q, k, scale=SCALE, backend=name)
            y_p, yt_p = affinity_matmul_pair(q, k, x, x, scale=SCALE, row_offset=r, backend=name)
            print(f"- {name}: row-normalised {rel(y, dense_row):.2e}, symmetric {rel(y_sym, dense_sym):.2e}, "
                  f"symmetric q is k {rel(y_vv, dense_vv):.2e}, pair P·X {rel(y_p, dense_row):.2e} "
                  f"Pᵀ·X {rel(yt_p, dense_pt):.2e}, logsumexp max abs "
                  f"{(r_b.float() - r).abs().max().item():.2e}", flush=True)
        except Exception as exc:
            print(f"- {name}: error {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="sizes 16384 and 65536, skip the torch backend rows")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated N values")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    sizes = DEFAULT_SIZES[:2] if args.quick else DEFAULT_SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    backends = available_backends()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton_version}, "
          f"backends {backends}")
    print(f"A_ij = exp(q_i·k_j/8), d = {D}, m = {WIDTH}, bf16; ms = median of CUDA-event timings after "
          f"warm-up; first calls of each shape autotune (not timed)\n", flush=True)
    started = time.perf_counter()
    spot_check(backends)
    print(flush=True)
    table = Table()
    for n in sizes:
        try:
            bench_size(table, n, backends, args.quick)
            if n == 65536:
                bench_heads(table, n, backends)
        except Exception as exc:  # e.g. out of memory building inputs: report, go on
            print(f"N = {n}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            torch.cuda.empty_cache()
    table.dump()
    table.goals(sizes, backends)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
