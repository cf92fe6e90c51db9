"""CPU benchmarks of the primitive against torch's own scaled_dot_product_attention.

Run:  python -m pytest bench/bench_primitive_cpu.py --benchmark-enable -q
The summary prints every method's median time as a ratio to SDPA measured in the same run
(goal: row-normalised ≤ 1.0, general offsets ≤ 1.5, DESIGN.md §5 / issue 2).
"""
import pytest
import torch
import torch.nn.functional as F

import spectral_kernels as sk

D, WIDTH = 64, 16
SIZES = [8192, 20000]


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"N{n}")
def inputs(request):
    n = request.param
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    x = torch.randn(n, WIDTH, generator=g)
    offsets = torch.randn(n, generator=g) * 0.1
    return n, q, k, x, offsets


def _rounds(n):
    return dict(rounds=3 if n <= 8192 else 1, iterations=1, warmup_rounds=0)


def test_sdpa_baseline(benchmark, inputs):
    n, q, k, x, _ = inputs
    benchmark.group = f"row-normalised N={n}"
    benchmark.pedantic(lambda: F.scaled_dot_product_attention(q[None, None], k[None, None], x[None, None]), **_rounds(n))


def test_torch_backend_row(benchmark, inputs):
    n, q, k, x, _ = inputs
    benchmark.group = f"row-normalised N={n}"
    benchmark.pedantic(lambda: sk.affinity_matmul(q, k, x, normalize="row", backend="torch"), **_rounds(n))


def test_torch_backend_offsets(benchmark, inputs):
    n, q, k, x, offsets = inputs
    benchmark.group = f"row-normalised N={n}"
    benchmark.pedantic(lambda: sk.affinity_matmul(q, k, x, row_offset=offsets, col_offset=offsets, backend="torch"),
                       **_rounds(n))


def test_torch_backend_symmetric(benchmark, inputs):
    n, q, k, x, offsets = inputs
    benchmark.group = f"row-normalised N={n}"
    benchmark.pedantic(lambda: sk.affinity_symmetric_matmul(q, k, x, offset=offsets, backend="torch"), **_rounds(n))
