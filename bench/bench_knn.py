"""kNN graph construction: the official style (row chunks + an N×N mask) vs blockwise knn_graph.

Script (each measurement in a fresh subprocess, so peak memory is per method):

    python bench/bench_knn.py --device cpu --n 20000 --methods official,blockwise
    python bench/bench_knn.py --device cpu --n 100000 --methods blockwise
    python bench/bench_knn.py --device cuda --n 1000000 --methods blockwise

CPU peak memory is the growth of peak resident memory (VmHWM, reset just before the call)
over the RSS before it; CUDA peak memory is torch.cuda.max_memory_allocated. Images are contiguous runs of
``--tokens-per-image`` tokens (32 × 32 = 1024, as in the official dataset mode).

Also a tiny pytest-benchmark case: ``pytest bench/bench_knn.py``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from spectral_kernels.knn import knn_graph


def official_style_graph(q, k, image_ids, n_intra, n_inter, threshold=0.1, chunk=1024):
    """The official dataset-mode construction, written from its description (DESIGN.md §5).

    Normalise, allocate the N×N boolean same-image mask, then per 1024-row chunk: full
    similarity rows, diagonal pushed to -1e5, top-k of sim·mask and of sim·(¬mask);
    threshold after the top-k, COO, ½(W + Wᵀ), D⁻¹W with D⁻¹ = 1/d + 1e-6.
    """
    n = q.shape[0]
    qn = F.normalize(q.float(), dim=-1)
    kn = F.normalize(k.float(), dim=-1)
    same = image_ids[:, None] == image_ids[None, :]          # N × N bool: the memory wall
    vals, cols = [], []
    for r0 in range(0, n, chunk):
        sim = qn[r0:r0 + chunk] @ kn.T
        rows = torch.arange(sim.shape[0], device=q.device)
        sim[rows, r0 + rows] = -1e5
        mask = same[r0:r0 + chunk]
        v_intra, c_intra = (sim * mask).topk(n_intra, dim=-1)
        v_inter, c_inter = (sim * ~mask).topk(n_inter, dim=-1)
        vals.append(torch.cat([v_inter, v_intra], dim=-1))
        cols.append(torch.cat([c_inter, c_intra], dim=-1))
    vals, cols = torch.cat(vals), torch.cat(cols)
    vals[vals <= threshold] = 0
    rows = torch.arange(n, device=q.device)[:, None].expand_as(cols)
    w = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols.reshape(-1)]), vals.reshape(-1), (n, n))
    w = (0.5 * (w.t() + w)).coalesce()
    inv_degree = 1.0 / torch.sparse.sum(w, dim=1).to_dense() + 1e-6
    return w * inv_degree[:, None]


def make_inputs(n, d, tokens_per_image, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=gen).to(device)
    ids = (torch.arange(n) // tokens_per_image).to(device)
    return v, ids


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) so the next peak is this call's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False   # then VmHWM still holds earlier peaks: the growth is an upper bound


def measure(method, n, d, n_neighbours, tokens_per_image, device):
    """Run one construction once (after a small warm-up) and return time and peak memory."""
    v, ids = make_inputs(n, d, tokens_per_image, device)
    build = {
        "official": lambda a, b, i: official_style_graph(a, b, i, n_neighbours, n_neighbours),
        "blockwise": lambda a, b, i: knn_graph(a, b, n_intra=n_neighbours, n_inter=n_neighbours, image_ids=i),
    }[method]
    warm = min(n, 4 * tokens_per_image)
    build(v[:warm], v[:warm], ids[:warm])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_bytes("VmRSS")
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    graph = build(v, v, ids)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1)).to(device)
    y = (graph @ x).double().cpu()
    return dict(method=method, n=n, d=d, k=n_neighbours, device=device, seconds=seconds,
                cpu_seconds=cpu_seconds, threads=torch.get_num_threads(), peak_gib=peak / 2**30,
                nnz=int(graph._nnz()), probe=y.tolist()[:64])


def run_in_subprocess(method, args):
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--d", str(args.d),
           "--k", str(args.k), "--tokens-per-image", str(args.tokens_per_image), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(method=method, n=args.n, error=done.stderr.strip().splitlines()[-1:] or ["failed"])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=50, help="intra and inter neighbours each")
    parser.add_argument("--tokens-per-image", type=int, default=1024)
    parser.add_argument("--methods", default="official,blockwise")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (CPU-seconds at 1 thread are robust to a loaded machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args.n, args.d, args.k, args.tokens_per_image, args.device)))
        return
    results = [run_in_subprocess(m, args) for m in args.methods.split(",")]
    for r in results:
        if "error" in r:
            print(f"{r['method']:>10}  N={r['n']}: failed: {r['error']}")
        else:
            print(f"{r['method']:>10}  N={r['n']} d={r['d']} {r['k']}+{r['k']} on {r['device']}: "
                  f"{r['seconds']:.2f} s ({r['cpu_seconds']:.1f} CPU-s, {r['threads']} threads), "
                  f"peak {r['peak_gib']:.2f} GiB, nnz {r['nnz']}")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        a, b = (torch.tensor(r["probe"]) for r in ok)
        rel = float((a - b).norm() / b.norm())
        print(f"graph @ X agreement (first 64 rows): relative difference {rel:.2e} "
              "(the official D⁻¹ adds 1e-6 after the reciprocal)")
        print(f"time ratio {ok[0]['method']}/{ok[1]['method']}: {ok[0]['seconds'] / ok[1]['seconds']:.2f}")
    if len(ok) < len(results):
        raise SystemExit(1)  # a failed measurement fails the script (gpu_all.sh reports the step)


def test_bench_knn_small(benchmark):
    """pytest-benchmark smoke case: N = 4 096 tokens, d = 64, 10 + 10 neighbours."""
    v, ids = make_inputs(4096, 64, 1024, "cpu")
    graph = benchmark(lambda: knn_graph(v, v, n_intra=10, n_inter=10, image_ids=ids))
    assert graph.shape == (4096, 4096)


if __name__ == "__main__":
    main()
