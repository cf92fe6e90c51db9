"""knn_graph against a brute-force dense reference, odd shapes, errors and a memory bound."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from spectral_kernels.knn import knn_graph


# --------------------------------------------------------------------------- dense reference

def reference_neighbours(q, k, image_ids, n_intra, n_inter, exclude_self=True):
    """(N, N) float64 matrix W0 of selected cosines (-inf elsewhere), by full stable sorts.

    Ties are resolved by the lower column index: a stable descending sort over columns in
    index order keeps equal values in column order.
    """
    qn = torch.nn.functional.normalize(q.double(), dim=-1)
    kn = torch.nn.functional.normalize(k.double(), dim=-1)
    cos = qn @ kn.T
    n = cos.shape[0]
    same = image_ids[:, None] == image_ids[None, :]
    intra_ok = same.clone()
    if exclude_self:
        intra_ok.fill_diagonal_(False)
    selected = torch.full_like(cos, -math.inf)
    for ok, count in ((intra_ok, n_intra), (~same, n_inter)):
        if count == 0:
            continue
        masked = torch.where(ok, cos, torch.tensor(-math.inf, dtype=cos.dtype))
        _, order = masked.sort(dim=1, descending=True, stable=True)
        chosen = order[:, :count]
        rows = torch.arange(n)[:, None].expand_as(chosen)
        selected[rows, chosen] = cos[rows, chosen]
    return selected


def reference_graph(q, k, image_ids, n_intra, n_inter, *, threshold=0.1, exclude_self=True,
                    normalize="row"):
    selected = reference_neighbours(q, k, image_ids, n_intra, n_inter, exclude_self)
    return normalize_reference(selected, threshold, normalize)


def normalize_reference(selected, threshold, normalize):
    """Threshold, symmetrise and normalise a dense matrix of selected cosines."""
    w0 = torch.where(selected > threshold, selected, torch.zeros((), dtype=selected.dtype))
    w = 0.5 * (w0 + w0.T)
    if normalize == "none":
        return w
    degree = w.sum(dim=1)
    safe = torch.where(degree > 0, degree, torch.ones_like(degree))
    if normalize == "row":
        return torch.where(degree[:, None] > 0, w / safe[:, None], torch.zeros_like(w))
    inv_sqrt = torch.where(degree > 0, safe.rsqrt(), torch.zeros_like(degree))
    return w * inv_sqrt[:, None] * inv_sqrt[None, :]


def shuffled_image_ids(sizes, gen):
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=gen)]


# --------------------------------------------------------------------------- equality with the reference

def test_matches_dense_reference_three_images(rng):
    # ≈ 3 000 tokens from 3 images of unequal sizes, ids interleaved; small tiles so that
    # row blocks span several images and zones straddle tile borders
    sizes = [1100, 957, 943]
    ids = shuffled_image_ids(sizes, rng)
    v = torch.randn(sum(sizes), 16, generator=rng, dtype=torch.float64)
    selected = reference_neighbours(v, v, ids, 7, 5)
    for normalize in ("row", "sym", "none"):
        graph = knn_graph(v, v, n_intra=7, n_inter=5, image_ids=ids, normalize=normalize,
                          block_size=(256, 700))
        assert graph.layout == torch.sparse_csr and graph.dtype == torch.float64
        expected = normalize_reference(selected, 0.1, normalize)
        dense = graph.to_dense()
        assert torch.equal(dense != 0, expected != 0)  # same edge set
        torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-14)


def test_kq_graph_matches_reference_and_default_blocks(rng):
    # q ≠ k (KQ graph), contiguous images, default block size, float64
    sizes = [400, 333, 517]
    ids = torch.cat([torch.full((s,), 10 * i + 3) for i, s in enumerate(sizes)])
    q = torch.randn(sum(sizes), 24, generator=rng, dtype=torch.float64)
    k = q + 0.7 * torch.randn(sum(sizes), 24, generator=rng, dtype=torch.float64)
    graph = knn_graph(q, k, n_intra=9, n_inter=11, image_ids=ids)
    expected = reference_graph(q, k, ids, 9, 11)
    torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-14)


def test_float32_matches_reference_up_to_near_ties(rng):
    """float32 similarities may swap neighbours whose cosines differ by ~1e-7; compare the rest."""
    sizes = [1000, 1000, 1000]
    ids = shuffled_image_ids(sizes, rng)
    v = torch.randn(3000, 16, generator=rng)
    n_intra, n_inter = 6, 6
    graph = knn_graph(v, v, n_intra=n_intra, n_inter=n_inter, image_ids=ids, normalize="none")
    assert graph.dtype == torch.float32
    expected = reference_graph(v, v, ids, n_intra, n_inter, normalize="none")
    # rows whose k-th and (k+1)-th candidates are within 1e-5: their neighbour set is ambiguous
    cos = torch.nn.functional.normalize(v.double(), dim=-1)
    cos = cos @ cos.T
    same = ids[:, None] == ids[None, :]
    intra = torch.where(same, cos, -math.inf).fill_diagonal_(-math.inf).sort(dim=1, descending=True).values
    inter = torch.where(~same, cos, -math.inf).sort(dim=1, descending=True).values
    ambiguous = ((intra[:, n_intra - 1] - intra[:, n_intra]).abs() < 1e-5) | \
                ((inter[:, n_inter - 1] - inter[:, n_inter]).abs() < 1e-5)
    clear = ~ambiguous
    assert clear.sum() > 2900
    block = clear[:, None] & clear[None, :]
    dense = graph.to_dense().double()
    torch.testing.assert_close(dense[block], expected[block], rtol=1e-5, atol=1e-6)


def test_ties_lower_column_index_wins(rng):
    # tokens drawn from 5 vectors with four ±1 entries: normalised entries are ±0.5, so every
    # cosine is exact in any summation order and most candidates tie exactly; the lowest
    # indices must win, also with interleaved image ids (tokens are regrouped internally)
    base = torch.zeros(5, 8, dtype=torch.float64)
    for row in base:
        signs = torch.randint(0, 2, (4,), generator=rng).double() * 2 - 1
        row[torch.randperm(8, generator=rng)[:4]] = signs
    v = base[torch.randint(0, 5, (300,), generator=rng)]
    ids = shuffled_image_ids([100, 120, 80], rng)
    graph = knn_graph(v, v, n_intra=4, n_inter=3, image_ids=ids, normalize="none",
                      block_size=(64, 96), threshold=-1.0)
    expected = reference_graph(v, v, ids, 4, 3, threshold=-1.0, normalize="none")
    torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-14)
    # and the result does not depend on the tiling
    other = knn_graph(v, v, n_intra=4, n_inter=3, image_ids=ids, normalize="none",
                      block_size=(300, 300), threshold=-1.0)
    torch.testing.assert_close(other.to_dense(), graph.to_dense(), rtol=0, atol=0)


def test_block_max_prefilter_is_exact(rng, monkeypatch):
    """Wide tiles select through block maxima: forced onto small tiles (blocks of 4 columns),
    the graphs still equal the references, exact ties included, and every tile's top-k equals
    torch.topk's up to the order of equal values."""
    from spectral_kernels import knn as knn_module
    monkeypatch.setattr(knn_module, "PREFILTER_MIN_WIDTH", 0)
    monkeypatch.setattr(knn_module, "PREFILTER_BLOCK", 4)
    sizes = [1100, 957, 943]
    ids = shuffled_image_ids(sizes, rng)
    v = torch.randn(sum(sizes), 16, generator=rng, dtype=torch.float64)
    graph = knn_graph(v, v, n_intra=7, n_inter=5, image_ids=ids, normalize="none", block_size=(256, 700))
    torch.testing.assert_close(graph.to_dense(), reference_graph(v, v, ids, 7, 5, normalize="none"),
                               rtol=1e-12, atol=1e-14)
    # few distinct values: ties everywhere, also across the block-maximum boundary
    for width in (96, 101, 257):
        sim = torch.randint(0, 6, (40, width), generator=rng).double()
        sim[::7, : width // 2] = -math.inf  # rows with masked halves
        cols = torch.randperm(10 * width, generator=rng)[:width]
        for kk in (1, 3, 5):
            vals, picked = knn_module.tile_topk(sim, cols, kk, threshold=-1.0)
            monkeypatch.setattr(knn_module, "PREFILTER_MIN_WIDTH", 10**9)
            ref_vals, ref_picked = knn_module.tile_topk(sim, cols, kk, threshold=-1.0)
            monkeypatch.setattr(knn_module, "PREFILTER_MIN_WIDTH", 0)
            assert torch.equal(vals, ref_vals)
            assert torch.equal(picked.sort(1).values, ref_picked.sort(1).values), (width, kk)


# --------------------------------------------------------------------------- properties and small shapes

def test_normalisations_are_stochastic_and_symmetric(rng):
    ids = shuffled_image_ids([50, 70, 31], rng)
    v = torch.randn(151, 12, generator=rng)
    row = knn_graph(v, v, n_intra=5, n_inter=5, image_ids=ids, normalize="row").to_dense()
    sym = knn_graph(v, v, n_intra=5, n_inter=5, image_ids=ids, normalize="sym").to_dense()
    raw = knn_graph(v, v, n_intra=5, n_inter=5, image_ids=ids, normalize="none").to_dense()
    has_edges = raw.sum(dim=1) > 0
    assert has_edges.any()
    torch.testing.assert_close(row.sum(dim=1)[has_edges], torch.ones(int(has_edges.sum())))
    assert torch.all(row[~has_edges] == 0)
    torch.testing.assert_close(sym, sym.T)
    torch.testing.assert_close(raw, raw.T)
    assert torch.all(raw.diagonal() == 0)  # exclude_self
    assert torch.isfinite(row).all() and torch.isfinite(sym).all()


def test_single_image_of_seven_tokens(rng):
    v = torch.randn(7, 5, generator=rng, dtype=torch.float64)
    ids = torch.zeros(7, dtype=torch.long)
    for normalize in ("row", "sym", "none"):
        graph = knn_graph(v, v, n_intra=6, n_inter=0, image_ids=ids, normalize=normalize, threshold=0.0)
        expected = reference_graph(v, v, ids, 6, 0, threshold=0.0, normalize=normalize)
        torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_unequal_images_odd_sizes(rng, exclude_self):
    sizes = [3, 11, 5, 2]
    ids = shuffled_image_ids(sizes, rng) * 7 - 4   # arbitrary (negative) id values
    v = torch.randn(sum(sizes), 3, generator=rng, dtype=torch.float64)
    n_intra = min(sizes) - (1 if exclude_self else 0)
    n_inter = sum(sizes) - max(sizes)
    graph = knn_graph(v, v, n_intra=n_intra, n_inter=n_inter, image_ids=ids, normalize="none",
                      exclude_self=exclude_self, block_size=(2, 3), threshold=0.05)
    expected = reference_graph(v, v, ids, n_intra, n_inter, exclude_self=exclude_self,
                               threshold=0.05, normalize="none")
    torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-14)


def test_only_inter_neighbours_and_list_ids(rng):
    v = torch.randn(40, 6, generator=rng, dtype=torch.float64)
    ids = [i % 4 for i in range(40)]
    graph = knn_graph(v, v, n_intra=0, n_inter=3, image_ids=ids, normalize="sym", block_size=7)
    expected = reference_graph(v, v, torch.tensor(ids), 0, 3, normalize="sym")
    torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-14)


def test_half_precision_input_gives_float32_graph(rng):
    v = torch.randn(64, 8, generator=rng).to(torch.bfloat16)
    ids = torch.arange(64) // 16
    graph = knn_graph(v, v, n_intra=3, n_inter=3, image_ids=ids)
    assert graph.dtype == torch.float32
    expected = reference_graph(v.float(), v.float(), ids, 3, 3)
    # same inputs after the bf16 → fp32 cast; near-ties are rare at N = 64
    torch.testing.assert_close(graph.to_dense().double(), expected, rtol=1e-5, atol=1e-6)


def test_graph_product_and_gradient(rng):
    ids = torch.arange(90) // 30
    v = torch.randn(90, 10, generator=rng)
    graph = knn_graph(v, v, n_intra=4, n_inter=4, image_ids=ids)
    x = torch.randn(90, 5, generator=rng, requires_grad=True)
    y = graph @ x
    dense = graph.to_dense()
    torch.testing.assert_close(y, dense @ x.detach())
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * dense.T @ (dense @ x.detach()))


# --------------------------------------------------------------------------- errors

def _inputs(n=20, d=4):
    v = torch.randn(n, d)
    return v, torch.arange(n) // 5   # 4 images of 5 tokens


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(image_ids=torch.arange(19)), ValueError, "image_ids must have shape"),
    (dict(image_ids=torch.zeros(20)), TypeError, "image_ids must have an integer dtype"),
    (dict(n_intra=5), ValueError, "n_intra=5 exceeds"),
    (dict(n_inter=16), ValueError, "n_inter=16 exceeds"),
    (dict(n_intra=-1), ValueError, "n_intra must be non-negative"),
    (dict(n_inter=-2), ValueError, "n_inter must be non-negative"),
    (dict(n_intra=2.0), TypeError, "n_intra must be an int"),
    (dict(n_intra=0, n_inter=0), ValueError, "both 0"),
    (dict(normalize="rw"), ValueError, "normalize must be one of"),
    (dict(threshold=-0.5), ValueError, "threshold=-0.5 < 0"),
    (dict(threshold=float("nan")), TypeError, "threshold must be a real number"),
    (dict(block_size=(0, 4)), ValueError, "block_size rows must be positive"),
    (dict(block_size="big"), TypeError, "block_size must be"),
    (dict(backend="triton"), ValueError, "backend must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, error, message):
    v, ids = _inputs()
    args = dict(n_intra=2, n_inter=3, image_ids=ids)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        knn_graph(v, v, **args)


def test_bad_tensors_name_the_argument():
    v, ids = _inputs()
    with pytest.raises(ValueError, match="k has feature dimension 5 but q has 4"):
        knn_graph(v, torch.randn(20, 5), n_intra=1, n_inter=1, image_ids=ids)
    with pytest.raises(ValueError, match="k has 21 tokens"):
        knn_graph(v, torch.randn(21, 4), n_intra=1, n_inter=1, image_ids=ids)
    bad = v.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        knn_graph(bad, v, n_intra=1, n_inter=1, image_ids=ids)
    with pytest.raises(ValueError, match="k contains NaN"):
        knn_graph(v, bad, n_intra=1, n_inter=1, image_ids=ids)
    with pytest.raises(ValueError, match="q is empty"):
        knn_graph(torch.zeros(0, 4), torch.zeros(0, 4), n_intra=1, n_inter=1,
                  image_ids=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="q must have 2 dimensions"):
        knn_graph(v[None], v[None], n_intra=1, n_inter=1, image_ids=ids)
    with pytest.raises(TypeError, match="q has unsupported dtype"):
        knn_graph(v.long(), v.long(), n_intra=1, n_inter=1, image_ids=ids)
    with pytest.raises(ValueError, match="n_inter=1 exceeds"):
        knn_graph(v, v, n_intra=1, n_inter=1, image_ids=torch.zeros(20, dtype=torch.long))


# --------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from spectral_kernels.knn import knn_graph

    def status_bytes(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    def reset_peak():
        # VmHWM restarts from the current RSS; without it ru_maxrss (an upper bound) is used
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    n, d = 100_000, 16
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    v = torch.randn(n, d, generator=gen)
    ids = torch.arange(n) // 1024          # 98 images of 32 x 32 tokens (the last one smaller)
    knn_graph(v[:2048], v[:2048], n_intra=10, n_inter=10, image_ids=ids[:2048])  # warm-up
    peak_was_reset = reset_peak()
    before = status_bytes("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start, cpu_start = time.perf_counter(), usage.ru_utime + usage.ru_stime
    graph = knn_graph(v, v, n_intra=10, n_inter=10, image_ids=ids)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime - cpu_start
    peak = (status_bytes("VmHWM") if peak_was_reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row_sums = torch.zeros(n).index_add_(0, torch.repeat_interleave(
        torch.arange(n), graph.crow_indices().diff()), graph.values())
    print(json.dumps(dict(growth=peak - before, seconds=seconds, cpu_seconds=cpu_seconds,
                          nnz=graph.values().numel(), rows_ok=bool(((row_sums - 1).abs() < 1e-4).all()))))
""")


@pytest.mark.slow
def test_memory_100k_tokens_under_2gb(rng):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(seed)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"N=100000 d=16 10+10: {result['seconds']:.1f} s ({result['cpu_seconds']:.0f} CPU-s), "
          f"peak RSS growth {result['growth'] / 2**20:.0f} MiB, nnz {result['nnz']}")
    assert result["growth"] < 2 * 2**30
    assert result["rows_ok"]
    assert 100_000 * 20 <= result["nnz"] <= 100_000 * 40


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    sizes = [700, 900, 448]
    ids = shuffled_image_ids(sizes, rng)
    v = torch.randn(sum(sizes), 32, generator=rng, dtype=torch.float64)
    cpu = knn_graph(v, v, n_intra=8, n_inter=8, image_ids=ids)
    gpu = knn_graph(v.cuda(), v.cuda(), n_intra=8, n_inter=8, image_ids=ids.cuda(), block_size=(512, 1024))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.to_dense().cpu(), cpu.to_dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
def test_cuda_wide_tiles_with_block_max_prefilter_match_plain_cpu(rng, monkeypatch):
    """The default CUDA tiles (width ≥ 16 384) go through the block-maximum prefilter; the
    CPU reference here runs plain torch.topk: same graph in float64."""
    from spectral_kernels import knn as knn_module
    sizes = [1024] * 20
    ids = shuffled_image_ids(sizes, rng)
    v = torch.randn(sum(sizes), 32, generator=rng, dtype=torch.float64)
    gpu = knn_graph(v.cuda(), v.cuda(), n_intra=20, n_inter=30, image_ids=ids.cuda())
    monkeypatch.setattr(knn_module, "PREFILTER_MIN_WIDTH", 10**9)
    cpu = knn_graph(v, v, n_intra=20, n_inter=30, image_ids=ids)
    assert torch.equal(gpu.crow_indices().cpu(), cpu.crow_indices())
    assert torch.equal(gpu.col_indices().cpu(), cpu.col_indices())  # same edges (N² dense is 3 GB)
    torch.testing.assert_close(gpu.values().cpu(), cpu.values(), rtol=1e-12, atol=1e-14)
