"""Dataset runs: batch objectives against dense float64 references, the row-wise optimiser,
joint orthogonalisation, inputs and errors, per-image outputs, checkpoint/resume."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectral_kernels.dataset import DatasetRun, analyze_dataset
from spectral_kernels.dataset.features import LayerFeatures
from spectral_kernels.dataset.graphs import DenseBatchGraph, KnnBatchGraph, block_diagonal_csr, compact_csr
from spectral_kernels.dataset.results import joint_orthogonalize
from spectral_kernels.dataset.table import LogitTableState
from spectral_kernels.models.capture import LayerCapture


# --------------------------------------------------------------------------- a tiny "model"

class PatchModel:
    """Random linear maps of 4×4 pixel patches to q, k, v: a capture-compatible stand-in for a ViT.

    Two layers: the patch grid (with one extra CLS-like token) and a 2× average-pooled grid.
    """
    name = "patch-model"
    patch_size = 4

    def __init__(self, generator, heads=2, d=8):
        dim = 3 * self.patch_size ** 2
        self.w = [torch.randn(dim, heads * d, generator=generator) / math.sqrt(dim) for _ in range(3)]
        self.heads, self.d = heads, d
        self.calls = 0

    def capture(self, images, size=None):
        self.calls += 1
        x = torch.stack([F.interpolate(i[None], size=size, mode="bilinear")[0] for i in images])
        b, p = x.shape[0], self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, h * w, -1)
        tokens = tokens - tokens.mean(1, keepdim=True)  # centred: cosines spread over [-1, 1]

        def split(t):
            return t.reshape(b, -1, self.heads, self.d).transpose(1, 2)

        q, k, v = (split(tokens @ m) for m in self.w)

        def pooled(t):
            grid = t.transpose(-1, -2).reshape(b * self.heads, self.d, h, w)
            return F.avg_pool2d(grid, 2).reshape(b, self.heads, self.d, -1).transpose(-1, -2)

        def with_cls(t):
            return torch.cat([t.mean(2, keepdim=True), t], dim=2)

        return [LayerCapture("fine", with_cls(q), with_cls(k), with_cls(v), (h, w), n_extra=1),
                LayerCapture("coarse", pooled(q), pooled(k), pooled(v), (h // 2, w // 2))]


def random_images(rng, n, size=(20, 24)):
    return [torch.rand(3, *size, generator=rng) for _ in range(n)]


SMALL = dict(n_eig=4, batch_images=3, inner_steps=2, n_intra=3, n_inter=5, image_size=16, progress=False)


# --------------------------------------------------------------------------- dense references

def dense_knn_graph(q, k, ids, n_intra, n_inter, threshold):
    """Official dataset graph, dense float64: top-k per row in / out of the image, D⁻¹W."""
    cos = F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).T
    same = ids[:, None] == ids[None, :]
    intra = same & ~torch.eye(len(ids), dtype=torch.bool)
    w0 = torch.zeros_like(cos)
    for ok, count in ((intra, n_intra), (~same, n_inter)):
        if count:
            masked = torch.where(ok, cos, torch.tensor(-math.inf, dtype=cos.dtype))
            vals, cols = masked.topk(count, dim=1)
            w0.scatter_(1, cols, torch.where(vals > threshold, vals, torch.zeros_like(vals)))
    w = 0.5 * (w0 + w0.T)
    deg = w.sum(1, keepdim=True)
    return torch.where(deg > 0, w / torch.where(deg > 0, deg, torch.ones_like(deg)), torch.zeros_like(w))


def official_loss(graphs_per_layer, feat, grids, base):
    """train_utils.subsample_feat_and_solve_ncut_semantic's loss for (B, K, h0, w0) features."""
    eig, ortho, weight, ortho_weight = [], [], [], []
    for graphs, grid in zip(graphs_per_layer, grids):
        prob = F.adaptive_avg_pool2d(feat, grid).permute(0, 2, 3, 1).flatten(0, 2)
        z = F.normalize(prob, dim=0)
        for a in graphs:
            val = ((a @ z) * z).sum(0)
            gram = z.T @ z
            off = gram[~torch.eye(gram.shape[0], dtype=torch.bool)]
            eig.append(val)
            ortho.append(off)
            w = math.sqrt(base[0] * base[1] / (grid[0] * grid[1]))
            weight.append(torch.full_like(val, w))
            ortho_weight.append(torch.full_like(off, w))
    eig, ortho, weight, ortho_weight = map(torch.cat, (eig, ortho, weight, ortho_weight))
    return (weight * (eig - 1)).abs().mean() + (ortho_weight * ortho.pow(2)).mean()


def random_layers(rng, n_images, heads=2, d=6, kq=True):
    layers = []
    for name, grid in (("fine", (6, 5)), ("coarse", (3, 3))):
        n = grid[0] * grid[1]
        a = torch.randn(n_images, heads, n, d, generator=rng)
        b = torch.randn(n_images, heads, n, d, generator=rng) if kq else None
        if not kq:
            a = F.normalize(a, dim=-1)
        layers.append(LayerFeatures(name, grid, d ** -0.5, a, b))
    return layers


@pytest.mark.parametrize("kq", [True, False])
def test_knn_batch_loss_and_gradient_match_official_dense(rng, kq):
    layers = random_layers(rng, 5, kq=kq)
    index = torch.tensor([0, 2, 3])
    base = (6, 5)
    graph = KnnBatchGraph(layers, index, base, n_intra=4, n_inter=6, threshold=0.1, device="cpu",
                          dtype=torch.float64)
    logits = torch.randn(3, 4, *base, generator=rng, dtype=torch.float64, requires_grad=True)
    rows = logits.softmax(1).flatten(2).transpose(1, 2)
    loss = graph.loss(rows)
    loss.backward()

    ref_logits = logits.detach().clone().requires_grad_(True)
    dense = []
    for lf in layers:
        n = lf.grid[0] * lf.grid[1]
        ids = torch.arange(3).repeat_interleave(n)
        a = lf.a[index].double().permute(1, 0, 2, 3).flatten(1, 2)
        b = a if lf.b is None else lf.b[index].double().permute(1, 0, 2, 3).flatten(1, 2)
        dense.append([dense_knn_graph(a[h], b[h], ids, 4, 6, 0.1) for h in range(a.shape[0])])
    ref = official_loss(dense, ref_logits.softmax(1), [lf.grid for lf in layers], base)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("graph_kind", ["kq", "vv"])
def test_dense_batch_loss_matches_softmax_reference(rng, graph_kind):
    layers = random_layers(rng, 4, kq=graph_kind == "kq")
    index = torch.tensor([1, 3])
    base = (6, 5)
    graph = DenseBatchGraph(layers, index, base, graph=graph_kind, temperature=0.2, device="cpu",
                            dtype=torch.float64)
    logits = torch.randn(2, 3, *base, generator=rng, dtype=torch.float64)
    loss = graph.loss(logits.softmax(1).flatten(2).transpose(1, 2), w_eig=2.0, w_orth=0.5)
    dense = []
    for lf in layers:
        a = lf.a[index].double().permute(1, 0, 2, 3).flatten(1, 2)
        b = a if lf.b is None else lf.b[index].double().permute(1, 0, 2, 3).flatten(1, 2)
        scale = 1 / 0.2 if graph_kind == "vv" else lf.scale
        dense.append(list((scale * a @ b.transpose(-1, -2)).softmax(-1)))  # inter-image edges included
    ref = official_loss(dense, logits.softmax(1), [lf.grid for lf in layers], base)  # w_eig = w_orth = 1
    eig_only = graph.loss(logits.softmax(1).flatten(2).transpose(1, 2), w_eig=1.0, w_orth=0.0)
    orth_only = graph.loss(logits.softmax(1).flatten(2).transpose(1, 2), w_eig=0.0, w_orth=1.0)
    torch.testing.assert_close(eig_only + orth_only, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss, 2.0 * eig_only + 0.5 * orth_only, rtol=1e-12, atol=1e-12)
    # training: the quotients come from one symmetric pass with the row LSE cached per batch
    # graph; value and gradient against autograd through the dense softmax, twice (cached LSE)
    for _ in range(2):
        theta = logits.clone().requires_grad_()
        ours = graph.loss(theta.softmax(1).flatten(2).transpose(1, 2), w_eig=1.0, w_orth=1.0)
        (grad,) = torch.autograd.grad(ours, theta)
        theta_ref = logits.clone().requires_grad_()
        ref = official_loss(dense, theta_ref.softmax(1), [lf.grid for lf in layers], base)
        (grad_ref,) = torch.autograd.grad(ref, theta_ref)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)
    assert all(lse is not None for lse in graph._row_lse)


def test_symmetric_sparse_product_gradcheck(rng):
    layers = random_layers(rng, 3, heads=1, d=4, kq=False)[:1]
    graph = KnnBatchGraph(layers, torch.tensor([0, 1, 2]), (6, 5), n_intra=3, n_inter=3, threshold=0.0,
                          device="cpu", dtype=torch.float64)
    logits = torch.randn(3, 3, 6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: graph.loss(t.softmax(1).flatten(2).transpose(1, 2)), (logits,))


def test_block_diagonal_csr_matches_dense(rng):
    mats = [torch.randn(n, n, generator=rng).relu() for n in (3, 1, 5)]
    out = block_diagonal_csr([m.to_sparse_csr() for m in mats])
    torch.testing.assert_close(out.to_dense(), torch.block_diag(*mats))
    # int32 indices where they fit (half the index memory), also from int32 and mixed inputs
    assert out.crow_indices().dtype == torch.int32 and out.col_indices().dtype == torch.int32
    mixed = block_diagonal_csr([compact_csr(mats[0].to_sparse_csr()), mats[2].to_sparse_csr()])
    torch.testing.assert_close(mixed.to_dense(), torch.block_diag(mats[0], mats[2]))
    x = torch.randn(9, 2, generator=rng)  # 3 + 1 + 5 rows
    torch.testing.assert_close(out @ x, torch.block_diag(*mats) @ x)
    blocks = [m.to_sparse_csr() for m in mats]
    consumed = block_diagonal_csr(blocks, consume=True)  # each block released once copied
    assert blocks == [None, None, None]
    torch.testing.assert_close(consumed.to_dense(), torch.block_diag(*mats))


# --------------------------------------------------------------------------- optimiser and EMA

def test_row_adamw_and_lazy_ema_match_per_image_parameters(rng):
    """The official setup: one Parameter per image, AdamW, grads None outside the batch, full EMA."""
    n, lr, wd, m = 5, 1e-2, 0.05, 0.9
    init = torch.randn(n, 2, 3, 3, generator=rng, dtype=torch.float64)
    params = [torch.nn.Parameter(init[i].clone()) for i in range(n)]
    ema_ref = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=False)
    state = LogitTableState(init.clone(), lr=lr, weight_decay=wd, ema=m)
    target = torch.randn(n, 2, 3, 3, generator=rng, dtype=torch.float64)
    for step in range(7):
        index = torch.randperm(n, generator=rng)[:2].sort().values
        state.ema_sync(index, step)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            sum(((params[i] - target[i]) ** 3).sum() for i in index.tolist()).backward()
            opt.step()
            rows = state.rows(index)
            ((rows - target[index]) ** 3).sum().backward()
            state.adam_step(index, rows.grad)
        for e, p in zip(ema_ref, params):
            e.mul_(m).add_(p.detach() * (1 - m))
        state.ema_update(index, step)
    torch.testing.assert_close(state.table, torch.stack([p.detach() for p in params]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.final(7), torch.stack(ema_ref), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- orthogonalisation

def test_joint_orthogonalize_is_the_svd_of_the_stacked_normalised_features(rng):
    feats = torch.rand(4, 15, 5, generator=rng, dtype=torch.float64)
    us, s = joint_orthogonalize(feats)
    stacked = F.normalize(feats.flatten(0, 1), dim=0)
    u, s_ref, _ = torch.linalg.svd(stacked, full_matrices=False)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-6)
    ref = u * s_ref
    signs = torch.sign((ref * us.flatten(0, 1).double()).sum(0))
    torch.testing.assert_close(us.flatten(0, 1).double(), ref * signs, rtol=1e-4, atol=1e-5)
    assert (us.flatten(0, 1).sum(0) >= 0).all()


# --------------------------------------------------------------------------- whole runs

def _assert_npz(path, grid, k):
    with np.load(path) as data:
        assert data["eigenvectors"].shape == (*grid, k)
        assert data["features"].shape == (*grid, k)
        assert data["singular_values"].shape == (k,)
        assert data["eigenvalues"].shape == (k,)
        assert np.isfinite(data["eigenvectors"]).all()


@pytest.mark.parametrize("mode", ["knn", "dense"])
def test_run_writes_per_image_results(rng, tmp_path, mode):
    images, model = random_images(rng, 5), PatchModel(rng)
    result = analyze_dataset(images, out_dir=tmp_path, model=model, mode=mode, steps=3, **SMALL)
    assert result.names == [f"image_{i:05d}" for i in range(5)]
    assert result.eigenvectors.shape == (5, 4, 4, 4)
    assert len(result.loss_history) == 3 and all(math.isfinite(v) for v in result.loss_history)
    for path in result.paths:
        _assert_npz(path, (4, 4), 4)
    # jointly orthogonal over the dataset: Σ_i E_iᵀ E_i = diag(s²)
    e = result.eigenvectors.flatten(0, 2).double()
    torch.testing.assert_close(e.T @ e, torch.diag(result.singular_values.double() ** 2), rtol=1e-4, atol=1e-5)
    # per-image eigenvalues: mean over layers and heads of ẑᵀ A ẑ on the image's own graph
    fs = DatasetRun(images, out_dir=tmp_path, model=model, mode=mode, **SMALL).features()  # from the cache
    image = 3
    quotients = []
    for lf in fs.layers:
        z = F.normalize(F.adaptive_avg_pool2d(result.eigenvectors[image].permute(2, 0, 1).double(), lf.grid)
                        .flatten(1).T, dim=0)
        for h in range(lf.heads):
            a = lf.a[image, h].double()
            b = a if lf.b is None else lf.b[image, h].double()
            if mode == "knn":
                graph = dense_knn_graph(a, b, torch.zeros(len(a), dtype=torch.long), 3, 0, 0.1)
            else:
                graph = (a @ b.T / 0.1).softmax(-1)
            quotients.append(((graph @ z) * z).sum(0))
    torch.testing.assert_close(result.eigenvalues[image].double(), torch.stack(quotients).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss(rng, tmp_path):
    images = random_images(rng, 3)
    settings = dict(SMALL, batch_images=3, inner_steps=5, lr=5e-2, image_eigenvalues=False)
    result = analyze_dataset(images, out_dir=tmp_path, model=PatchModel(rng), steps=8, **settings)
    assert result.loss_history[-1] < result.loss_history[0]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["knn", "dense"])
def test_interrupted_run_resumes_to_the_same_result(rng, tmp_path, mode):
    images = random_images(rng, 7)
    seed = int(torch.randint(0, 2 ** 31, (), generator=rng))
    model = PatchModel(rng)
    settings = dict(SMALL, mode=mode, steps=7, seed=seed, checkpoint_every=2, image_eigenvalues=False)
    full = analyze_dataset(images, out_dir=tmp_path / "full", model=model, **settings)

    def stop_at_5(step, loss):
        if step == 5:
            raise Interrupt

    run = DatasetRun(images, out_dir=tmp_path / "cut", model=model, **settings)
    with pytest.raises(Interrupt):
        run.run(callback=stop_at_5)
    assert torch.load(tmp_path / "cut" / "_run" / "checkpoint.pt", weights_only=False)["step"] == 4
    calls = model.calls
    resumed = analyze_dataset(images, out_dir=tmp_path / "cut", model=model, **settings)
    assert model.calls == calls, "a resumed run must read its features from the cache"
    assert resumed.loss_history == full.loss_history
    torch.testing.assert_close(resumed.eigenvectors, full.eigenvectors, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.features, full.features, rtol=0, atol=1e-6)
    # a finished run resumed again only rewrites its results
    again = analyze_dataset(images, out_dir=tmp_path / "cut", model=model, **settings)
    assert again.loss_history == full.loss_history


def test_resume_with_other_settings_raises(rng, tmp_path):
    images, model = random_images(rng, 4), PatchModel(rng)
    analyze_dataset(images, out_dir=tmp_path, model=model, steps=1, image_eigenvalues=False, **SMALL)
    with pytest.raises(ValueError, match="n_intra: saved 3, now 2"):
        analyze_dataset(images, out_dir=tmp_path, model=model, steps=2, **dict(SMALL, n_intra=2))
    with pytest.raises(ValueError, match="another set of images"):
        analyze_dataset(images[:3], out_dir=tmp_path, model=model, steps=2, **SMALL)
    other = PatchModel(rng)
    other.name = "another-model"
    with pytest.raises(ValueError, match="trained on model 'patch-model'"):
        analyze_dataset(images, out_dir=tmp_path, model=other, steps=2, **SMALL)
    # steps may grow: the run continues from its checkpoint
    longer = analyze_dataset(images, out_dir=tmp_path, model=model, steps=2, image_eigenvalues=False, **SMALL)
    assert len(longer.loss_history) == 2


def _write_png(path, rng, size=(20, 20)):
    from PIL import Image
    array = (torch.rand(*size, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


def test_folder_skips_unreadable_files_with_one_warning(rng, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b.png", "a.png", "c.PNG", "d.jpg", "d.png"):
        _write_png(folder / name, rng)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = analyze_dataset(folder, out_dir=tmp_path / "out", model=PatchModel(rng), steps=2, **SMALL)
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(messages) == 1 and "broken" in messages[0] and "empty" in messages[0]
    assert result.names == ["a", "b", "c", "d_jpg", "d_png"]  # sorted; a shared stem keeps its extension
    assert sorted(name for name, _ in result.skipped) == ["broken", "empty"]
    for name in result.names:
        _assert_npz(tmp_path / "out" / f"{name}.npz", (4, 4), 4)
    assert not (tmp_path / "out" / "broken.npz").exists()


def test_in_memory_inputs_are_named_in_order(rng):
    from PIL import Image
    from spectral_kernels.dataset.sources import collect_images
    batch = torch.rand(2, 3, 8, 8, generator=rng)
    array = (torch.rand(2, 8, 8, 3, generator=rng) * 255).to(torch.uint8).numpy()
    items = collect_images([batch, Image.fromarray(array[0]), array, torch.rand(3, 5, 7, generator=rng)])
    assert [item.name for item in items] == ["image_00000_000", "image_00000_001", "image_00001",
                                             "image_00002_000", "image_00002_001", "image_00003"]
    torch.testing.assert_close(items[1].load(), batch[1])
    assert items[0].key != items[1].key
    assert collect_images([batch[0]])[0].key == items[0].key   # content-addressed: the cache survives reordering


def test_empty_inputs_raise(rng, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        analyze_dataset(empty, out_dir=tmp_path / "o1", model=PatchModel(rng), **SMALL)
    with pytest.raises(ValueError, match="empty"):
        analyze_dataset([], out_dir=tmp_path / "o2", model=PatchModel(rng), **SMALL)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning, match="unreadable"), pytest.raises(ValueError, match="none of its 1"):
        analyze_dataset(bad, out_dir=tmp_path / "o3", model=PatchModel(rng), **SMALL)
    with pytest.raises(ValueError, match="neither a folder"):
        analyze_dataset(tmp_path / "missing", out_dir=tmp_path / "o4", model=PatchModel(rng), **SMALL)


@pytest.mark.parametrize("settings, message", [
    (dict(n_intra=4), "n_intra=4 is larger than the smallest image"),   # coarse layer: 2 × 2 tokens
    (dict(n_intra=2, n_inter=9), "n_inter=9 exceeds"),
])
def test_neighbour_counts_larger_than_the_images_raise(rng, tmp_path, settings, message):
    images = random_images(rng, 3)
    kw = dict(SMALL, batch_images=3, **settings)
    with pytest.raises(ValueError, match=message):
        analyze_dataset(images, out_dir=tmp_path, model=PatchModel(rng), steps=1, **kw)


@pytest.mark.parametrize("settings, error, message", [
    (dict(mode="exact"), ValueError, "mode must be one of"),
    (dict(graph="qq"), ValueError, "graph must be one of"),
    (dict(n_eig=1), ValueError, "n_eig"),
    (dict(batch_images=0), ValueError, "batch_images"),
    (dict(ema=1.5), ValueError, "ema"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(n_intra=0, n_inter=0), ValueError, "n_intra and n_inter"),
    (dict(layers=["nope"]), ValueError, "unknown layer 'nope'"),
    (dict(bogus=1), TypeError, "unknown setting 'bogus'"),
])
def test_bad_settings_name_the_argument(rng, tmp_path, settings, error, message):
    with pytest.raises(error, match=message):
        DatasetRun(random_images(rng, 2), out_dir=tmp_path, model=PatchModel(rng),
                   **dict(SMALL, **settings)).run()


def test_bad_model_and_images_raise(rng, tmp_path):
    with pytest.raises(TypeError, match="model must be"):
        DatasetRun(random_images(rng, 2), out_dir=tmp_path, model=object(), **SMALL).run()
    with pytest.raises(TypeError, match="images"):
        DatasetRun(42, out_dir=tmp_path, model=PatchModel(rng), **SMALL)


def test_layer_selection_and_kq_graph(rng, tmp_path):
    images = random_images(rng, 4)
    result = analyze_dataset(images, out_dir=tmp_path, model=PatchModel(rng), layers=["fine"], graph="kq",
                             steps=2, **dict(SMALL, n_intra=6))
    assert result.eigenvectors.shape == (4, 4, 4, 4)
    cached = os.listdir(tmp_path / "_run" / "features")
    record = torch.load(tmp_path / "_run" / "features" / cached[0], weights_only=False)
    assert list(record) == ["fine"] and record["fine"]["b"] is not None
    assert record["fine"]["a"].dtype == torch.float16 and record["fine"]["a"].shape == (2, 16, 8)  # CLS dropped


def test_head_selection(rng, tmp_path):
    result = analyze_dataset(random_images(rng, 3), out_dir=tmp_path, model=PatchModel(rng), heads=[1], steps=1,
                             **SMALL)
    assert result.eigenvectors.shape == (3, 4, 4, 4)
    record = torch.load(next((tmp_path / "_run" / "features").iterdir()), weights_only=False)
    assert all(r["a"].shape[0] == 1 for r in record.values())
    with pytest.raises(ValueError, match="heads"):
        analyze_dataset(random_images(rng, 3), out_dir=tmp_path / "bad", model=PatchModel(rng), heads=[5], **SMALL)


def test_bench_image_folder_gives_distinct_readable_images(tmp_path):
    """bench/make_image_folder.py (the 1 000-image GPU run's input): seeded, distinct, loadable."""
    import importlib.util

    from spectral_kernels.images import load_image

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "make_image_folder.py")
    spec = importlib.util.spec_from_file_location("make_image_folder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for folder in ("a", "b"):
        module.main([str(tmp_path / folder), "--count", "5", "--size", "28", "--seed", "3"])
    names = sorted(os.listdir(tmp_path / "a"))
    assert len(names) == 5 and names == sorted(os.listdir(tmp_path / "b"))
    images = [load_image(tmp_path / "a" / name) for name in names]
    assert all(image.shape == (3, 28, 28) for image in images)
    assert all(torch.equal(image, load_image(tmp_path / "b" / name)) for image, name in zip(images, names))
    assert len({image.sum().item() for image in images}) == 5
