"""spectral_kernels.distributed against one process, over 2 and 3 (and 4) gloo processes.

Products (none/row/sym, KQ and VV, heads, sums), degrees, gram, eigenvectors, kNN graphs,
the solver's loss and gradient, checkpoint resumption, and the errors when ranks disagree
or one dies. One process group per world size runs every check (starting processes is the
expensive part); each rank saves its rows of every result, and the tests compare the
concatenated rows with the single-process code on the same data. Shards are deliberately
uneven (one rank holds a single row). Workers are forked (fast: torch is already imported)
with one intra-op thread each.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import warnings

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from spectral_kernels.distributed import (ShardedKQAffinity, ShardedVVAffinity, init_distributed,  # noqa: E402
                                          local_rows_of, row_partition)
from spectral_kernels.distributed.eigsh import distributed_eigsh  # noqa: E402
from spectral_kernels.distributed.knn import sharded_knn_graph  # noqa: E402
from spectral_kernels.eigsh import eigsh  # noqa: E402
from spectral_kernels.distributed.solver import sharded_fit, sharded_objective  # noqa: E402
from spectral_kernels.knn import knn_graph  # noqa: E402
from spectral_kernels.operators import KQAffinity, VVAffinity  # noqa: E402

# uneven row shards per world size (a rank with one row included)
COUNTS = {2: (14, 23), 3: (12, 1, 24)}
COUNTS_PRODUCTS_ONLY = {4: (9, 3, 1, 8)}   # products only: the longest ring the CPU budget allows
HEADS, D, M, K_EIG = 2, 5, 3, 3
HEAD_WEIGHTS = torch.tensor([0.25, 0.75])
N_FEAT = 4                       # channels of the solver's features
GRAPH_WEIGHTS = (1.0, 0.5)       # the solver's mix: KQ random-walk graph + 0.5 × VV NCut graph
KNN = dict(n_intra=3, n_inter=4, threshold=0.1)
TIMEOUT_S = 60
MODES = ("none", "row", "sym")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker, world: int, *args):
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, start_method=method, join=True)


def _make_data(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # three overlapping clusters of tokens: gaps ≳ 1e-3 between the top eigenvalues (well
    # separated clusters would make eigenvalue 1 nearly threefold, and the test ill-posed)
    centers = 0.7 * torch.randn(3, D, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    base = centers[labels] + 0.5 * torch.randn(n, D, generator=g)
    return {
        "q": base + 0.3 * torch.randn(HEADS, n, D, generator=g),
        "k": base + 0.3 * torch.randn(HEADS, n, D, generator=g),
        "v": base + 0.3 * torch.randn(HEADS, n, D, generator=g),
        "x": torch.randn(n, M, generator=g),
        "feat": torch.randn(n, 6, generator=g),
        # 4 images in random token order, each with ≥ n // 4 ≥ 9 tokens: enough for n_intra = 3
        # (independent random ids could leave an image with too few tokens for the kNN check).
        "ids": (torch.arange(n) % 4)[torch.randperm(n, generator=g)],
        "theta": torch.randn(n, N_FEAT, generator=g),
    }


# --------------------------------------------------------------------------- the workers

def _rows(t, counts, rank, dim=-2):
    return local_rows_of(t, counts, rank, dim=dim).contiguous()


def _products(data, counts, rank) -> dict:
    out = {}
    q, k, v, x = (_rows(data[name], counts, rank) for name in ("q", "k", "v", "x"))
    for mode in MODES:
        op = ShardedKQAffinity(q, k, normalize=mode, head_weights=HEAD_WEIGHTS)
        out[f"kq/{mode}"] = op.matmul(x)
        out[f"kq/{mode}/again"] = op.matmul(x)          # "row": cached-LSE offset path; "sym": cached offsets
        if mode != "sym":
            out[f"kq/{mode}/adjoint"] = op.adjoint_matmul(x)
        out[f"kq/{mode}/vector"] = op.matmul(x[:, 0])
        vv = ShardedVVAffinity(v, temperature=0.5, normalize=mode)
        out[f"vv/{mode}"] = vv.matmul(x)
        out[f"vv/{mode}/again"] = vv.matmul(x)           # "row": the half-ring offset path
        out[f"vv/{mode}/adjoint"] = vv.adjoint_matmul(x)
    mixed = 0.5 * ShardedKQAffinity(q, k, normalize="row") + ShardedVVAffinity(v, temperature=0.5, normalize="sym")
    out["sum"], out["sum/adjoint"] = mixed.matmul(x), mixed.adjoint_matmul(x)
    sym = ShardedKQAffinity(q, k, normalize="sym")
    out["row_lse"], out["col_lse"], out["log_degrees"] = sym.row_lse(), sym.col_lse(), sym.log_degrees()
    out["gram"] = sym.gram(x, x)
    return out


def _eigen(data, counts, rank, tmp) -> dict:
    out = {}
    q, k = _rows(data["q"][:1], counts, rank), _rows(data["k"][:1], counts, rank)
    op = ShardedKQAffinity(q, k, normalize="sym")
    out["eig/kq/vals"], out["eig/kq/vecs"] = distributed_eigsh(op, K_EIG, tol=1e-6, seed=1)
    out["eig/kq_deflated/vals"], out["eig/kq_deflated/vecs"] = distributed_eigsh(op, K_EIG, tol=1e-6,
                                                                                exclude_trivial=True)
    vv = ShardedVVAffinity(_rows(data["v"], counts, rank), temperature=0.5, normalize="sym")
    out["eig/vv/vals"], out["eig/vv/vecs"] = distributed_eigsh(vv, K_EIG, tol=1e-6)
    out["eig/sum/vals"], out["eig/sum/vecs"] = distributed_eigsh(0.7 * op + 0.3 * vv, K_EIG, tol=1e-6)
    # the single-process entry point on a sharded operator: op.row_algebra() makes its reductions collective
    out["eig/plain/vals"], out["eig/plain/vecs"] = eigsh(op, K_EIG, tol=1e-6,
                                                        generator=torch.Generator().manual_seed(7 + rank))

    # checkpoints: stop after 3 iterations, lose rank 0's newest slot (as if it died while
    # writing it), resume: the ranks agree on iteration 2 and finish exactly as without a stop
    prefix = os.path.join(tmp, "eig")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        distributed_eigsh(op, K_EIG, tol=1e-6, seed=1, checkpoint=prefix, checkpoint_every=1, max_iter=3)
    dist.barrier()
    if rank == 0:
        os.remove(f"{prefix}.rank0-of-{len(counts)}.slot1.pt")   # iteration 3 lives in slot 3 % 2 = 1
    vals, vecs, info = distributed_eigsh(op, K_EIG, tol=1e-6, seed=1, checkpoint=prefix, resume=True,
                                         return_info=True)
    out["eig/resumed/vals"], out["eig/resumed/vecs"] = vals, vecs
    out["eig/resumed/first_iteration"] = torch.tensor(len(info.history) - (info.n_iter - 2))
    return out


def _knn(data, counts, rank) -> dict:
    out = {}
    feat, ids = _rows(data["feat"], counts, rank, dim=0), _rows(data["ids"], counts, rank, dim=0)
    keys = _rows(data["q"][0], counts, rank, dim=0)
    for mode in ("row", "sym"):
        out[f"knn/{mode}"] = sharded_knn_graph(feat, feat, image_ids_local=ids, normalize=mode, block_size=(4, 5),
                                               **KNN).to_dense()
    out["knn/kq"] = sharded_knn_graph(feat[:, :D], keys, image_ids_local=ids, **KNN).to_dense()
    return out


def _solver_graphs(q, k, v, sharded=True):
    kq, vv = (ShardedKQAffinity, ShardedVVAffinity) if sharded else (KQAffinity, VVAffinity)
    return [(GRAPH_WEIGHTS[0], kq(q, k, normalize="row", head_weights=HEAD_WEIGHTS)),
            (GRAPH_WEIGHTS[1], vv(v, temperature=0.5, normalize="sym"))]


def _solver(data, counts, rank, tmp) -> dict:
    out = {}
    q, k, v, theta = (_rows(data[name], counts, rank) for name in ("q", "k", "v", "theta"))
    graphs = _solver_graphs(q, k, v)
    theta = theta.clone().requires_grad_()
    loss = sharded_objective(graphs, theta.softmax(dim=1))
    loss.backward()
    out["solver/loss"], out["solver/grad"] = loss.detach(), theta.grad
    # an uninterrupted fit, and one stopped after 2 steps and resumed: the same logits
    sym = graphs[1][1]
    whole = sharded_fit(sym, N_FEAT, steps=4, lr=0.05, softmax=False, seed=3)
    prefix = os.path.join(tmp, "fit")
    sharded_fit(sym, N_FEAT, steps=2, lr=0.05, softmax=False, seed=3, checkpoint=prefix, checkpoint_every=1)
    resumed = sharded_fit(sym, N_FEAT, steps=4, lr=0.05, softmax=False, seed=3, checkpoint=prefix, resume=True)
    out["solver/whole"], out["solver/resumed"] = whole.features, resumed.features
    descent = sharded_fit(sym, N_FEAT, steps=40, lr=0.05, softmax=False, seed=4)
    out["solver/history"] = torch.tensor(descent.history)
    return out


def _errors(data, counts, rank) -> dict:
    """Disagreements between ranks: every rank must raise a ValueError naming the problem."""
    out = {}
    q = _rows(data["q"], counts, rank)
    bad_d = q[..., :-1] if rank == len(counts) - 1 else q
    bad_dtype = q.double() if rank == 0 else q
    for name, q_bad in (("d", bad_d), ("dtype", bad_dtype)):
        try:
            ShardedKQAffinity(q_bad, q_bad.clone())
            out[f"error/{name}"] = ""
        except ValueError as err:
            out[f"error/{name}"] = str(err)
    op = ShardedKQAffinity(q, q)
    x = torch.randn(q.shape[1], 2 if rank == 0 else 3)
    try:
        op.matmul(x)
        out["error/width"] = ""
    except ValueError as err:
        out["error/width"] = str(err)
    try:  # a bad block on one rank: that rank says what is wrong, the others that it happened
        op.matmul(torch.randn(q.shape[1] + (1 if rank == 0 else 0), 2))
        out["error/rows"] = ""
    except ValueError as err:
        out["error/rows"] = str(err)
    return out


def _worker(rank, world, port, data_path, tmp):
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                     timeout_s=TIMEOUT_S)
    data = torch.load(data_path)
    counts = COUNTS[world]
    results = {}
    results.update(_products(data, counts, rank))
    results.update(_eigen(data, counts, rank, tmp))
    results.update(_knn(data, counts, rank))
    results.update(_solver(data, counts, rank, tmp))
    results.update(_errors(data, counts, rank))
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _products_worker(rank, world, port, data_path, tmp):
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                     timeout_s=TIMEOUT_S)
    results = _products(torch.load(data_path), COUNTS_PRODUCTS_ONLY[world], rank)
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _dying_worker(rank, world, port, tmp):
    """Rank 1 dies after construction; rank 0's next product must fail, not hang."""
    torch.set_num_threads(1)
    init_distributed("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout_s=20)
    q = torch.randn(3, 4)
    op = ShardedKQAffinity(q, q)
    dist.barrier()
    if rank == 1:
        os._exit(0)
    start = time.monotonic()
    try:
        op.matmul(torch.randn(3, 2))
        message = ""
    except RuntimeError as err:
        message = str(err)
    torch.save({"message": message, "seconds": time.monotonic() - start}, os.path.join(tmp, "dying.pt"))
    os._exit(0)  # the group is broken: no clean shutdown possible


# --------------------------------------------------------------------------- the runs

def _run_world(world, counts, worker, label, tmp_path_factory):
    """Fresh random data, ``worker`` on ``world`` processes, and what each rank saved."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    data = _make_data(seed, sum(counts))
    tmp = tmp_path_factory.mktemp(label)
    data_path = os.path.join(tmp, "data.pt")
    torch.save(data, data_path)
    _launch(worker, world, data_path, str(tmp))
    per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    return {"world": world, "counts": counts, "data": data, "seed": seed, "ranks": per_rank}


@pytest.fixture(scope="module", params=sorted(COUNTS), ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    return _run_world(world, COUNTS[world], _worker, f"world{world}", tmp_path_factory)


def _gathered(run, key, dim=0):
    return torch.cat([r[key] for r in run["ranks"]], dim=dim)


def _close(got, want, rtol=2e-5):
    scale = want.abs().max().clamp_min(1e-30)
    err = float((got.to(torch.float64) - want.to(torch.float64)).abs().max() / scale)
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


def _reference(run, family, mode, **kw):
    d = run["data"]
    if family == "kq":
        return KQAffinity(d["q"], d["k"], normalize=mode, head_weights=HEAD_WEIGHTS, **kw)
    return VVAffinity(d["v"], temperature=0.5, normalize=mode, **kw)


@pytest.fixture(scope="module", params=sorted(COUNTS_PRODUCTS_ONLY), ids=lambda w: f"world{w}")
def products_run(request, tmp_path_factory):
    world = request.param
    return _run_world(world, COUNTS_PRODUCTS_ONLY[world], _products_worker, f"products{world}", tmp_path_factory)


@pytest.mark.parametrize("mode", MODES)
def test_products_match_one_process_on_four_ranks(products_run, mode):
    test_products_match_one_process(products_run, mode)


@pytest.mark.parametrize("mode", MODES)
def test_products_match_one_process(run, mode):
    x = run["data"]["x"]
    kq = _reference(run, "kq", mode)
    want = kq.matmul(x)
    _close(_gathered(run, f"kq/{mode}"), want)
    _close(_gathered(run, f"kq/{mode}/again"), want)
    _close(_gathered(run, f"kq/{mode}/vector"), kq.matmul(x[:, 0]))
    if mode != "sym":
        _close(_gathered(run, f"kq/{mode}/adjoint"), kq.adjoint_matmul(x))
    vv = _reference(run, "vv", mode)
    _close(_gathered(run, f"vv/{mode}"), vv.matmul(x))
    _close(_gathered(run, f"vv/{mode}/again"), vv.matmul(x))
    _close(_gathered(run, f"vv/{mode}/adjoint"), vv.adjoint_matmul(x))


def test_weighted_sum_matches_one_process(run):
    d = run["data"]
    mixed = 0.5 * KQAffinity(d["q"], d["k"], normalize="row") + VVAffinity(d["v"], temperature=0.5, normalize="sym")
    _close(_gathered(run, "sum"), mixed.matmul(d["x"]))
    _close(_gathered(run, "sum/adjoint"), mixed.adjoint_matmul(d["x"]))


def test_degrees_and_gram_match_one_process(run):
    d = run["data"]
    op = KQAffinity(d["q"], d["k"], normalize="sym")
    _close(_gathered(run, "row_lse", dim=1), op.row_lse(), rtol=1e-5)
    _close(_gathered(run, "col_lse", dim=1), op.col_lse(), rtol=1e-5)
    _close(_gathered(run, "log_degrees", dim=1), op.log_degrees(), rtol=1e-5)
    x = d["x"].double()
    for r in run["ranks"]:  # replicated on every rank
        _close(r["gram"], x.T @ x, rtol=1e-6)


def _principal_cosines(a, b):
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.T @ qb)


def _dense_top(op, k, deflate=False):
    dense = op.to_dense().double()
    if deflate:  # the operator with its trivial eigenvector projected out, as the solver sees it
        u = op.trivial_eigenvector().double()[:, None]
        proj = torch.eye(dense.shape[0], dtype=dense.dtype) - u @ u.T
        dense = proj @ dense @ proj
    evals, evecs = torch.linalg.eigh(dense)
    order = torch.argsort(evals, descending=True)[:k]
    return evals[order], evecs[:, order]


@pytest.mark.parametrize("case", ["kq", "kq_deflated", "vv", "sum"])
def test_eigenvectors_match_one_process(run, case):
    d = run["data"]
    vv = VVAffinity(d["v"], temperature=0.5, normalize="sym")
    kq = KQAffinity(d["q"][:1], d["k"][:1], normalize="sym")
    op = {"vv": vv, "sum": 0.7 * kq + 0.3 * vv}.get(case, kq)
    want_vals, want_vecs = _dense_top(op, K_EIG, deflate=case == "kq_deflated")
    got_vecs = _gathered(run, f"eig/{case}/vecs")
    for r in run["ranks"]:
        _close(r[f"eig/{case}/vals"], want_vals, rtol=1e-5)
    cos = _principal_cosines(got_vecs, want_vecs)
    assert float(cos.min()) >= 0.999, f"principal cosines {cos.tolist()}"
    # sign convention: the largest-magnitude entry of each vector is positive
    pivot = got_vecs.abs().argmax(dim=0)
    assert bool((got_vecs[pivot, torch.arange(K_EIG)] > 0).all())


def test_single_process_eigsh_solves_a_sharded_operator(run):
    """eigsh itself on a ShardedKQAffinity: the same LOBPCG, collective through row_algebra()."""
    test_eigenvectors_match_one_process(run, "plain")


def test_eigsh_resumes_from_the_newest_common_checkpoint(run):
    first = run["ranks"][0]
    for r in run["ranks"]:
        # the resumed run ends exactly where the uninterrupted one (same seed) did
        torch.testing.assert_close(r["eig/resumed/vals"], r["eig/kq/vals"], rtol=0, atol=0)
        torch.testing.assert_close(r["eig/resumed/vecs"], r["eig/kq/vecs"], rtol=0, atol=0)
    assert first["eig/resumed/vals"].shape == (K_EIG,)


@pytest.mark.parametrize("case", ["row", "sym", "kq"])
def test_knn_graph_matches_one_process(run, case):
    d = run["data"]
    if case == "kq":
        want = knn_graph(d["feat"][:, :D], d["q"][0], image_ids=d["ids"], **KNN)
    else:
        want = knn_graph(d["feat"], d["feat"], image_ids=d["ids"], normalize=case, **KNN)
    got = _gathered(run, f"knn/{case}")
    want = want.to_dense()
    assert torch.equal(got != 0, want != 0), "different neighbour sets"
    _close(got, want, rtol=1e-5)


def _reference_objective(graphs, x, w_eig=2.0, w_orth=2.0):
    xhat = x / torch.linalg.vector_norm(x, dim=0)
    weights = torch.tensor([w for w, _ in graphs])
    eig = torch.stack([torch.diagonal(xhat.T @ op.matmul(xhat)) for _, op in graphs])
    gram = xhat.T @ xhat
    off = gram[~torch.eye(x.shape[1], dtype=torch.bool)]
    return w_eig * (weights[:, None] * (eig - 1).abs()).mean(dim=1).sum() / weights.sum() + w_orth * off.pow(2).mean()


def test_solver_loss_and_gradient_match_one_process(run):
    d = run["data"]
    theta = d["theta"].clone().requires_grad_()
    loss = _reference_objective(_solver_graphs(d["q"], d["k"], d["v"], sharded=False), theta.softmax(dim=1))
    loss.backward()
    for r in run["ranks"]:
        _close(r["solver/loss"], loss.detach(), rtol=1e-5)
    _close(_gathered(run, "solver/grad"), theta.grad, rtol=1e-4)


def test_solver_resumes_and_descends(run):
    for r in run["ranks"]:
        torch.testing.assert_close(r["solver/resumed"], r["solver/whole"], rtol=0, atol=0)
        history = r["solver/history"]
        assert float(history[-1]) < 0.7 * float(history[0]), history.tolist()
    torch.testing.assert_close(run["ranks"][0]["solver/history"], run["ranks"][-1]["solver/history"])


@pytest.mark.parametrize("what, words", [("d", "feature dim d"), ("dtype", "dtype"), ("width", "x columns")])
def test_rank_disagreement_raises_on_every_rank(run, what, words):
    for rank, r in enumerate(run["ranks"]):
        message = r[f"error/{what}"]
        assert message, f"rank {rank} did not raise"
        assert words in message and "ranks disagree" in message, message


def test_bad_block_on_one_rank_raises_on_every_rank(run):
    messages = [r["error/rows"] for r in run["ranks"]]
    assert "must hold this rank's" in messages[0] and "on rank 0" in messages[0], messages[0]
    for message in messages[1:]:
        assert "x valid on every rank" in message, message


def test_sharded_eigsh_rejects_single_process_operator():
    op = KQAffinity(torch.randn(6, 3), torch.randn(6, 3))
    with pytest.raises(TypeError, match="ShardedOperator"):
        distributed_eigsh(op, 2)


def test_construction_without_process_group_raises():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        ShardedKQAffinity(torch.randn(4, 3), torch.randn(4, 3))


def test_local_argument_errors_name_the_argument():
    # checked on the rank itself, before any collective
    with pytest.raises(ValueError, match="normalize"):
        ShardedKQAffinity(torch.randn(4, 3), torch.randn(4, 3), normalize="softmax")
    with pytest.raises(ValueError, match="q_local and k_local"):
        ShardedKQAffinity(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        ShardedVVAffinity(torch.randn(4, 3), temperature=0.0)
    feats = torch.randn(6, 3)
    with pytest.raises(TypeError, match="image_ids_local"):
        sharded_knn_graph(feats, feats, n_intra=1, n_inter=1, image_ids_local=torch.zeros(6))
    with pytest.raises(ValueError, match="image_ids_local"):
        sharded_knn_graph(feats, feats, n_intra=1, n_inter=1, image_ids_local=torch.zeros(5, dtype=torch.long))


def test_ring_rejects_a_bad_step_count():
    from spectral_kernels.distributed import ShardLayout, ring_pass
    layout = ShardLayout(group=None, rank=0, world_size=1, counts=(3,))
    with pytest.raises(ValueError, match="steps"):
        ring_pass(layout, [torch.zeros(3, 2)], [0], lambda source, shard: None, steps=2)
    seen = []
    ring_pass(layout, [torch.zeros(3, 2)], [0], lambda source, shard: seen.append(source))
    assert seen == [0]


def test_row_partition():
    assert row_partition(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="at least one row"):
        row_partition(2, 3)


def test_dead_rank_stops_the_run_with_an_error(tmp_path):
    _launch(_dying_worker, 2, str(tmp_path))
    result = torch.load(tmp_path / "dying.pt")
    assert "a rank died" in result["message"], result["message"]
    assert result["seconds"] < 30


@pytest.mark.slow
def test_torchrun_entry_point_writes_rank_shards(tmp_path, rng):
    """The README's launch command, end to end: 2 ranks under torchrun, eigenvectors per rank."""
    import subprocess

    import numpy as np

    feats = torch.randn(41, 6, generator=rng)
    np.save(tmp_path / "feats.npy", feats.numpy())
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "spectral_kernels.distributed", "eigsh", "--features", str(tmp_path / "feats.npy"),
           "--graph", "vv", "--temperature", "0.5", "--n-eig", "3", "--tol", "1e-6", "--out", str(out),
           "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = [torch.load(out / f"eigsh.rank{r}-of-2.pt") for r in range(2)]
    assert [s["rows"] for s in shards] == [(0, 21), (21, 41)]
    want_vals, want_vecs = _dense_top(VVAffinity(feats, temperature=0.5, normalize="sym"), 3)
    _close(shards[0]["eigenvalues"], want_vals, rtol=1e-5)
    got = torch.cat([s["eigenvectors"] for s in shards])
    assert float(_principal_cosines(got, want_vecs).min()) >= 0.999


def _nccl_worker(rank, world, port, tmp):
    init_distributed("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout_s=60)
    g = torch.Generator().manual_seed(0)
    q, k, x = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g), torch.randn(300, 8, generator=g)
    results = {}
    for mode in MODES:
        op = ShardedKQAffinity(q.cuda(), k.cuda(), normalize=mode)
        results[mode] = op.matmul(x.cuda()).cpu()
    torch.save(results, os.path.join(tmp, "nccl.pt"))
    dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_single_rank_products_match_one_process(tmp_path):
    """One GPU: the NCCL code path (metadata all-gather on CUDA tensors, no ring steps)."""
    mp.start_processes(_nccl_worker, args=(1, _free_port(), str(tmp_path)), nprocs=1, start_method="spawn")
    got = torch.load(tmp_path / "nccl.pt")
    g = torch.Generator().manual_seed(0)
    q, k, x = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g), torch.randn(300, 8, generator=g)
    for mode in MODES:
        _close(got[mode], KQAffinity(q, k, normalize=mode).matmul(x), rtol=1e-4)
