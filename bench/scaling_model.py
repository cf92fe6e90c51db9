"""Predicted time of one sharded product (and one eigensolver iteration) on P GPUs.

The ring pass (spectral_kernels/distributed/ring.py) runs P steps per product; at step t
rank p multiplies its rows by the visiting shard (an N/P × N/P block of the primitive)
while the next shard is in flight, so a step costs max(compute, transfer):

    block compute   t_c = flops(block) / throughput          flops = 4·(N/P)²·d per head
                                                              (DESIGN.md §5 convention)
    ring transfer   t_x = bytes(step) / link bandwidth + latency
    bytes(step)     = N/P · (H·d·bytes(k) + m·bytes(x) + H·4 [offsets] (+ m·4 carried, "sym"))
    product         = (P−1)·max(t_c, t_x) + t_c  (+ one carry hop for "sym")
                      + per-product collectives (width agreement: one tiny all-gather)

"row" (softmax P·X) makes one primitive call per step; "vv" (q = k) is the half ring of
``ShardedVVAffinity``: ⌊P/2⌋ steps, each pair of shards computed once. "sym" (½(E+Eᵀ)X) makes one fused
symmetric call on the diagonal block (``--sym-diag-factor`` × a row call; 1.75 measured
for a first Triton kernel, DESIGN.md §5) and two calls per off-diagonal block (row part
and the carried transposed part). Degrees (once per operator, cached) cost one LSE ring
pass per direction (``--lse-factor`` × a product each). One LOBPCG iteration applies the
operator to ≈ b columns (padded to m per call here) and does ~``--gram-calls`` small
all-reduces (latency-bound).

Defaults are DESIGN.md §5 figures (H200, bf16, d = 64, m = 32): 480 TFLOP/s (cuDNN-class;
substitute the measured Triton figure), NVLink 4 at 450 GB/s per direction.

    python bench/scaling_model.py                      # the table for N = 10⁷
    python bench/scaling_model.py --tflops 300 --link-gbs 25   # e.g. slower kernel, InfiniBand
    python bench/scaling_model.py --measure --measure-n 65536  # time the block product here
"""
from __future__ import annotations

import argparse
import math
import time

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=1e7, help="tokens N (default 1e7)")
    p.add_argument("--d", type=int, default=64, help="feature dim d")
    p.add_argument("--m", type=int, default=32, help="columns of X per product")
    p.add_argument("--heads", type=int, default=1, help="heads H summed inside one call")
    p.add_argument("--dtype", choices=sorted(BYTES), default="bf16", help="dtype of q/k")
    p.add_argument("--x-bytes", type=int, default=4,
                   help="bytes per X entry on the wire (4: the sharded operators circulate X in fp32)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tflops", type=float, default=480.0,
                   help="row-product throughput of one GPU on an N/P block, TFLOP/s counting 4·n²·d (default 480)")
    p.add_argument("--sym-diag-factor", type=float, default=1.75,
                   help="cost of the fused symmetric call on the diagonal block, in row calls")
    p.add_argument("--vv-diag-factor", type=float, default=1.0,
                   help="cost of the diagonal block when q = k (one-pass kernel, upper-triangle tiles), in row calls")
    p.add_argument("--offdiag-factor", type=float, default=1.0,
                   help="cost of one offset-form call (off-diagonal row or column part), in row calls")
    p.add_argument("--lse-factor", type=float, default=0.6, help="cost of an LSE pass, in row products")
    p.add_argument("--link-gbs", type=float, default=450.0, help="ring link bandwidth per direction, GB/s")
    p.add_argument("--latency-us", type=float, default=15.0, help="latency of one ring step's send/recv, µs")
    p.add_argument("--allreduce-us", type=float, default=30.0, help="latency of one small all-reduce/gather, µs")
    p.add_argument("--block", type=int, default=28, help="eigensolver block width b (k + 8)")
    p.add_argument("--gram-calls", type=int, default=12, help="small all-reduces per eigensolver iteration")
    p.add_argument("--gpu-mem-gib", type=float, default=139.0, help="memory of one GPU, GiB (H200)")
    p.add_argument("--measure", action="store_true", help="time the block product with the package's primitive")
    p.add_argument("--measure-n", type=int, default=65536, help="block size for --measure")
    p.add_argument("--backend", default="auto", help="primitive backend for --measure")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the model

def block_seconds(rows: float, cols: float, args) -> float:
    return 4.0 * rows * cols * args.d * args.heads / (args.tflops * 1e12)


def step_bytes(rows: float, args, mode: str) -> float:
    qk = BYTES[args.dtype]
    per_row = args.heads * args.d * qk + args.m * args.x_bytes + (args.heads * 4 if mode == "sym" else 0)
    if mode == "sym":
        per_row += args.m * 4  # the carried transposed half, fp32
    return rows * per_row


def transfer_seconds(nbytes: float, args) -> float:
    return nbytes / (args.link_gbs * 1e9) + args.latency_us * 1e-6


def product_seconds(p: int, args, mode: str) -> dict:
    if mode == "vv":
        return _half_ring_seconds(p, args)
    rows = args.n / p
    row_call = block_seconds(rows, rows, args)
    if mode == "row":
        diag, offdiag = row_call, row_call
    else:
        diag, offdiag = args.sym_diag_factor * row_call, 2.0 * args.offdiag_factor * row_call
    comm = transfer_seconds(step_bytes(rows, args, mode), args) if p > 1 else 0.0
    # step 0 (diagonal) overlaps the first transfer; steps 1..P-2 overlap the next; step P-1 does not
    total = (max(diag, comm) if p > 1 else diag) + max(p - 2, 0) * max(offdiag, comm) + (offdiag if p > 1 else 0.0)
    if mode == "sym" and p > 1:
        total += transfer_seconds(rows * args.m * 4, args)   # the last carry hop home
    total += args.allreduce_us * 1e-6 if p > 1 else 0.0     # width agreement
    return {"rows": rows, "compute": offdiag if p > 1 else diag, "comm": comm, "total": total,
            "bound": "compute" if p == 1 or offdiag >= comm else "comm"}


def _half_ring_seconds(p: int, args) -> dict:
    """q = k (VV): each pair of shards once — ⌊P/2⌋ steps of two offset-form calls, the pair at
    distance P/2 (P even) split between its ranks, carried column parts sent home directly."""
    rows = args.n / p
    row_call = block_seconds(rows, rows, args)
    diag = args.vv_diag_factor * row_call
    off = 2.0 * args.offdiag_factor * row_call
    if p == 1:
        return {"rows": rows, "compute": diag, "comm": 0.0, "total": diag, "bound": "compute"}
    comm = transfer_seconds(step_bytes(rows, args, "sym"), args)
    half = p // 2
    total = max(diag, comm)                      # step 0 overlaps the first transfer
    for step in range(1, half + 1):
        work = off / 2 if (p % 2 == 0 and step == half) else off
        total += max(work, comm) if step < half else work
    total += transfer_seconds(rows * args.m * 4, args) + args.allreduce_us * 1e-6
    return {"rows": rows, "compute": off, "comm": comm, "total": total, "bound": "compute" if off >= comm else "comm"}


def memory_gib(p: int, args) -> float:
    rows = args.n / p
    qk = BYTES[args.dtype]
    shard = rows * args.heads * args.d * qk          # one of q, k
    # own q, k + visiting and in-flight k (+ x shards, y, offsets, carry) + the solver's 3b-wide float64 basis
    vectors = rows * (4 * args.m * 4 + 2 * args.heads * 4)
    solver = rows * (6 * args.block * 8)
    return (4 * shard + vectors + solver) / 2**30


def crossover_rows(args, mode: str) -> float:
    """Rows per shard below which a ring step is transfer-bound (latency ignored)."""
    per_row_bytes = step_bytes(1.0, args, mode)
    per_row_compute = 4.0 * args.d * args.heads / (args.tflops * 1e12)   # × rows² → per row × rows
    # rows·c = rows_bytes / bw  →  rows = bytes_per_row / (bw · c)
    return per_row_bytes / (args.link_gbs * 1e9 * per_row_compute)


def print_model(args):
    print("Assumptions")
    print(f"  N = {args.n:.3g} tokens, d = {args.d}, m = {args.m}, heads = {args.heads}, {args.dtype} q/k, "
          f"X on the wire {args.x_bytes} bytes/entry, fp32 offsets and carried accumulators")
    print(f"  block product throughput {args.tflops:g} TFLOP/s (4·n²·d·H per N/P × N/P block); "
          f"symmetric diagonal call {args.sym_diag_factor:g}×, off-diagonal {2 * args.offdiag_factor:g}× a row call")
    print(f"  ring link {args.link_gbs:g} GB/s per direction + {args.latency_us:g} µs per step; "
          f"small all-reduce {args.allreduce_us:g} µs; steps overlap compute and transfer: max(compute, comm)")
    print(f"  transfer-bound only below {crossover_rows(args, 'row'):,.0f} rows per shard (row), "
          f"{crossover_rows(args, 'sym'):,.0f} (sym)")
    print()
    header = (f"{'P':>3} {'rows/GPU':>12} {'mode':>4} {'step compute':>13} {'step comm':>10} {'bound':>8} "
              f"{'product':>10} {'speedup':>8} {'eff.':>6} {'degrees':>9} {'LOBPCG it.':>11} {'mem GiB':>8}")
    print(header)
    print("-" * len(header))
    for mode in ("row", "sym", "vv"):
        base = product_seconds(1, args, mode)["total"]
        for p in args.gpus:
            r = product_seconds(p, args, mode)
            lse_dirs = 2 if mode == "sym" else 1
            degrees = lse_dirs * args.lse_factor * product_seconds(p, args, "row")["total"]
            # one iteration applies the operator to ≤ b columns: ⌈b/m⌉ products of width m
            calls = math.ceil(args.block / args.m)
            iteration = calls * r["total"] + args.gram_calls * (args.allreduce_us * 1e-6 if p > 1 else 0.0)
            mem = memory_gib(p, args)
            flag = "" if mem <= args.gpu_mem_gib else " (!)"
            print(f"{p:>3} {r['rows']:>12,.0f} {mode:>4} {_t(r['compute']):>13} {_t(r['comm']):>10} {r['bound']:>8} "
                  f"{_t(r['total']):>10} {base / r['total']:>7.2f}× {base / r['total'] / p:>6.1%} "
                  f"{_t(degrees):>9} {_t(iteration):>11} {mem:>7.1f}{flag}")
    print()
    print('modes: row = softmax P·X (KQ "row"); sym = NCut ½(E+Eᵀ)X with q ≠ k (full ring, carried')
    print("column parts); vv = any product with q = k (VV graphs: half ring, each pair of shards once).")
    print("product: one operator application (Y = op·X for all N rows, m columns); degrees: the one-off LSE")
    print("pass(es) an operator caches; LOBPCG it.: one eigensolver iteration (b columns + small all-reduces).")


def _t(seconds: float) -> str:
    if seconds == 0:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


# --------------------------------------------------------------------------- --measure

def measure(args):
    """Time the block products the ring runs, at n = --measure-n, with the package's primitive."""
    import torch

    from spectral_kernels.ops import affinity_logsumexp, affinity_matmul, affinity_symmetric_matmul

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device == "cpu":
        dtype = torch.float32
    n, d, m, h = args.measure_n, args.d, args.m, args.heads
    g = torch.Generator(device=device).manual_seed(0)
    shape = (h, n, d) if h > 1 else (n, d)
    q = torch.randn(shape, generator=g, device=device).to(dtype)
    k = torch.randn(shape, generator=g, device=device).to(dtype)
    x = torch.randn(n, m, generator=g, device=device).to(dtype)
    weights = torch.full((h,), 1.0 / h, device=device) if h > 1 else None
    offset = torch.randn(shape[:-1], generator=g, device=device).float().mul_(0.1)
    common = dict(head_weights=weights, backend=args.backend)
    cases = {
        "row (softmax P·X, one step of a row product)": lambda: affinity_matmul(q, k, x, normalize="row", **common),
        "offset form (off-diagonal sym part)": lambda: affinity_matmul(q, k, x, row_offset=offset, col_offset=offset,
                                                                       **common),
        "fused symmetric (diagonal sym block)": lambda: affinity_symmetric_matmul(q, k, x, offset=offset, **common),
        "fused symmetric, q = k (VV diagonal block)": lambda: affinity_symmetric_matmul(q, q, x, offset=offset,
                                                                                         **common),
        "logsumexp (degrees)": lambda: affinity_logsumexp(q, k, backend=args.backend),
    }
    if device == "cuda":  # the DESIGN.md §5 baseline, rerun here: SDPA (cuDNN where available), v padded to d
        import torch.nn.functional as F
        q4, k4 = q.reshape(1, h, n, d), k.reshape(1, h, n, d)
        v4 = F.pad(x, (0, max(d - m, 0))).expand(1, h, n, max(d, m)).contiguous()
        cases["baseline: SDPA softmax(q kᵀ/√d)·V, V padded to d"] = lambda: F.scaled_dot_product_attention(q4, k4, v4)
    flops = 4.0 * n * n * d * h
    print(f"measured on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}: n = {n}, d = {d}, m = {m}, "
          f"heads = {h}, {dtype}, backend {args.backend}")
    results = {}
    for name, fn in cases.items():
        fn()  # compile / autotune
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        results[name] = best
        print(f"  {name:50s} {best * 1e3:10.2f} ms   {flops / best / 1e12:8.3g} TFLOP/s (4·n²·d convention)")
    row = results["row (softmax P·X, one step of a row product)"]
    print(f"  → --tflops {flops / row / 1e12:.3g} --sym-diag-factor {results['fused symmetric (diagonal sym block)'] / row:.2f} "
          f"--offdiag-factor {results['offset form (off-diagonal sym part)'] / row:.2f} "
          f"--lse-factor {results['logsumexp (degrees)'] / row:.2f} "
          f"--vv-diag-factor {results['fused symmetric, q = k (VV diagonal block)'] / row:.2f}")
    return {"tflops": flops / row / 1e12,
            "sym_diag_factor": results["fused symmetric (diagonal sym block)"] / row,
            "offdiag_factor": results["offset form (off-diagonal sym part)"] / row,
            "lse_factor": results["logsumexp (degrees)"] / row,
            "vv_diag_factor": results["fused symmetric, q = k (VV diagonal block)"] / row}


def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        measured = measure(args)
        for key, value in measured.items():
            setattr(args, key, value)
        print()
        print("model with the measured single-GPU inputs (block throughput assumed size-independent above n):")
    print_model(args)


if __name__ == "__main__":
    main()
