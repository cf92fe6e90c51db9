"""Per-step time of SpectralSolver vs a dense implementation of the official loop.

    python bench/bench_solver.py --device cpu --steps 3            # this machine (reduced)
    python bench/bench_solver.py --device cuda --steps 50          # GPU figures
    python bench/bench_solver.py --device cuda --methods dense,solver,solver+graph,solver+graph+bf16

Sizes (synthetic q/k, d = 64, K = 20):
    sd      Stable Diffusion single image: 16 self-attention layers × 8 heads on grids
            64² ×5, 32² ×5, 16² ×5, 8² ×1 (SD_GRIDS) — N up to 4 096
    dinov2  DINOv2-S: 12 layers × 6 heads, 37² + 1 tokens (CLS dropped)

"dense" is the official loop: softmax attention materialised once per layer (H, N, N),
then every step X = softmax(θ), per-layer pooling, P·Z, loss, autograd, Adam. "solver" is
``SpectralSolver`` (layers of a grid stacked into one primitive call, no N×N array);
``solver+graph`` (or ``--cuda-graph``) replays each step as one captured CUDA graph,
``solver+bf16`` (or ``--qk-dtype bfloat16``) casts q/k once for tensor-core score tiles;
every solver row gets its dense/solver ratio.
BENCH_SOLVER_PROFILE=1 prints a torch.profiler table of 5 solver steps (setup included).
Each (size, method) runs in its own process so that peak memory (CUDA: max allocated;
CPU: peak RSS) is its own. Prints ms/step, peak memory and the dense/solver ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# Stable Diffusion v1 UNet self-attention layers: down 64²×2, 32²×2, 16²×2; mid 8²; up 16²×3, 32²×3, 64²×3.
SD_GRIDS = [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
SIZES = {
    "sd": dict(grids=SD_GRIDS, heads=8, n_extra=0),
    "dinov2": dict(grids=[37] * 12, heads=6, n_extra=1),
}
D, K = 64, 20


def make_captures(size, device, seed=0):
    from spectral_kernels.models.capture import LayerCapture
    spec = SIZES[size]
    g = torch.Generator(device="cpu").manual_seed(seed)
    caps = []
    for i, side in enumerate(spec["grids"]):
        n = side * side + spec["n_extra"]
        # q·k/√d of order a few units, as in trained attention (peaked but not one-hot)
        q = (1.5 * torch.randn(1, spec["heads"], n, D, generator=g)).to(device)
        k = (1.5 * torch.randn(1, spec["heads"], n, D, generator=g)).to(device)
        caps.append(LayerCapture(f"layer{i}", q, k, k, (side, side), spec["n_extra"]))
    return caps


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- dense baseline
def dense_run(caps, steps, device):
    """The official loop with precomputed dense softmax attention (one (H, N, N) per layer)."""
    base = max(c.grid[0] for c in caps)
    attn = []
    for c in caps:
        e = c.n_extra
        s = (c.q[0, :, e:] @ c.k[0, :, e:].transpose(1, 2)) * c.scale
        attn.append(s.softmax(-1))
    theta = torch.randn(1, K, base, base, device=device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=2e-3)

    def off_diag(m):
        return m.flatten()[:-1].view(K - 1, K + 1)[:, 1:]

    def step():
        feat = theta.softmax(1)
        eigs, orthos = [], []
        for c, p in zip(caps, attn):
            z = F.adaptive_avg_pool2d(feat, c.grid) if c.grid[0] != base else feat
            z = F.normalize(z.reshape(K, -1), dim=-1)                 # (K, N)
            eigs.append(((p @ z.T) * z.T[None]).sum(1).reshape(-1))    # (H, K)
            orthos.append(off_diag(z @ z.T).reshape(-1))
        loss = 2 * (torch.cat(eigs) - 1).abs().mean() + 2 * torch.cat(orthos).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    sync(device)
    return (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------- solver
def solver_run(caps, steps, device, backend, qk_dtype=None, cuda_graph=False, full_run=0):
    """(seconds per step, seconds of one whole ``full_run``-step fit or None)."""
    from spectral_kernels.solver import SpectralSolver

    def timed(n):
        solver = SpectralSolver(n_eig=K, steps=n, lr=2e-3, progress=False, backend=backend, seed=0,
                                qk_dtype=qk_dtype, cuda_graph=cuda_graph)
        sync(device)
        t0 = time.perf_counter()
        solver.fit(caps)
        sync(device)
        return time.perf_counter() - t0

    # Warm-up on every device: the first fit pays one-time costs (kernel compilation and
    # autotuning on a GPU, allocator growth and first-call dispatch on a CPU).
    timed(2)
    if os.environ.get("BENCH_SOLVER_PROFILE"):
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed(5)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    # Per step = (T(lead + steps) − T(lead)) / steps: setup (grouping, the cached row LSE,
    # module build) and, with a CUDA graph, its eager warm-up steps and capture fall in
    # both runs and cancel. The lead run's fastest of three keeps a noisy neighbour out.
    lead = 5 if cuda_graph else 0
    setup = min(timed(lead) for _ in range(3))
    total = timed(lead + steps)
    full = timed(full_run) if full_run else None  # everything a user waits for, setup included
    if total <= setup:
        print(f"warning: {steps} steps took {total:.3f} s, not more than setup {setup:.3f} s: "
              "machine too noisy, use more --steps", file=sys.stderr)
        return math.nan, full
    return (total - setup) / steps, full


# --------------------------------------------------------------------------- driver
SOLVER_SUFFIXES = {"graph", "bf16"}


def solver_options(method, args):
    """(cuda_graph, qk_dtype) of a solver method: "solver", "solver+graph", "solver+graph+bf16", ...
    (suffixes add to --cuda-graph / --qk-dtype)."""
    name, *suffixes = method.split("+")
    if name != "solver" or not set(suffixes) <= SOLVER_SUFFIXES:
        raise SystemExit(f"unknown method {method!r}: dense, or solver with +graph / +bf16 suffixes")
    return (args.cuda_graph or "graph" in suffixes), ("bfloat16" if "bf16" in suffixes else args.qk_dtype)


def worker(args):
    device = args.device
    caps = make_captures(args.size, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    full = None
    if args.method == "dense":
        per_step = dense_run(caps, args.steps, device)
    else:
        graph, qk_dtype = solver_options(args.method, args)
        per_step, full = solver_run(caps, args.steps, device, args.backend, qk_dtype, graph, args.full_run)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps(dict(size=args.size, method=args.method, ms=per_step * 1e3, peak_gib=peak, full_s=full)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on GPU, 3 on CPU)")
    parser.add_argument("--sizes", default="dinov2,sd")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--methods", default="dense,solver",
                        help="comma-separated: dense, solver, solver+graph, solver+bf16, solver+graph+bf16")
    parser.add_argument("--qk-dtype", dest="qk_dtype", default=None, choices=["bfloat16", "float16"],
                        help="solver: cast q/k once (tensor-core score tiles)")
    parser.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                        help="solver: capture one step as a CUDA graph and replay it")
    parser.add_argument("--full-run", dest="full_run", type=int, default=0, metavar="STEPS",
                        help="also time one whole fit of STEPS steps (setup included) for --full-run-methods")
    parser.add_argument("--full-run-methods", dest="full_run_methods", default=None, metavar="M,M",
                        help="solver methods the --full-run applies to (default: all)")
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 50 if args.device == "cuda" else 3
    if args.method:
        return worker(args)

    methods = args.methods.split(",")
    for method in methods:
        if method != "dense":
            solver_options(method, args)  # unknown names fail before any run
    rows = {}
    failures = 0
    for size in args.sizes.split(","):
        for method in methods:
            full_run = args.full_run if args.full_run_methods is None or method in args.full_run_methods.split(",") \
                else 0
            cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--backend",
                   args.backend, "--size", size, "--method", method, "--full-run", str(full_run)]
            if args.qk_dtype:
                cmd += ["--qk-dtype", args.qk_dtype]
            if args.cuda_graph:
                cmd += ["--cuda-graph"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if os.environ.get("BENCH_SOLVER_PROFILE"):
                print(out.stderr[-6000:])
            if out.returncode:
                print(f"{size}/{method} failed:\n{out.stderr[-2000:]}")
                failures += 1
                continue
            rows[(size, method)] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[(size, method)]
            full = "" if r.get("full_s") is None else f"   {full_run}-step fit {r['full_s']:.2f} s"
            print(f"{size:7s} {method:18s} {r['ms']:10.2f} ms/step   peak {r['peak_gib']:.3f} GiB"
                  f"{'' if args.device == 'cuda' else ' (process RSS)'}{full}", flush=True)
    for size in args.sizes.split(","):
        for method in methods:
            if method != "dense" and (size, "dense") in rows and (size, method) in rows:
                ratio = rows[(size, "dense")]["ms"] / max(rows[(size, method)]["ms"], 1e-9)
                print(f"{size:7s} dense/{method} time ratio: {ratio:.2f}x  (device {args.device}; goal ≥ 5 on a GPU)")
    if failures:
        raise SystemExit(1)  # a failed measurement fails the script (gpu_all.sh reports the step)


if __name__ == "__main__":
    main()
