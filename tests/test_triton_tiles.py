"""Which tile shapes the Triton kernels launch with: every feature width gets one that fits
the GPU's shared memory (227 KB a block on H100/H200, 163 KB on A100), and the estimate
behind that choice is an upper bound of what the kernels compiled for sm_90 allocate.

Before this pruning, a launch whose tile did not fit failed with OutOfResources on the GPU:
the only wide-feature candidate for d > 256, and the fp32 paired walk's default tile (its
128-row blocks take 265 KB there).
"""
from __future__ import annotations

import pytest
import torch

tiles = pytest.importorskip("spectral_kernels.ops.triton_tiles")
if tiles.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from spectral_kernels.ops import backends  # noqa: E402
from spectral_kernels.ops import triton_backend as tb  # noqa: E402
from spectral_kernels.ops import triton_kernels as K  # noqa: E402

H100, A100, SM86 = 232448, 166912, 101376  # opt-in shared memory of a block, bytes
WIDTHS = (1, 7, 64, 80, 128, 160, 256, 384, 512, 768, 1024, 2048)
# (kernel, symmetric walk or None)
LAUNCHES = [("row", None), ("logsumexp", None), ("pair", None),
            ("symmetric", "rect"), ("symmetric", "paired"), ("symmetric", "auto")]


@pytest.fixture
def compiled(monkeypatch):
    """The configs a GPU process builds (the interpreter's single tile is never pruned)."""
    monkeypatch.setattr(tiles, "interpreted", lambda: False)


def _launch_configs(kernel, walk, tuned):
    if kernel == "symmetric":
        return tb._symmetric_configs(tuned, walk)
    table = {"row": tiles.ROW_TILES, "logsumexp": tiles.ROW_TILES, "pair": tiles.PAIR_TILES}[kernel]
    return tiles.configs([(table, {})], interpreter_rows=16)


def _constexprs(d, dtype, same_qk=False, width=32):
    """What the launchers pass for q/k/X of ``dtype`` (fp32 dots split into tf32x3)."""
    px = {torch.float32: K.PX_FP32, torch.bfloat16: K.PX_BF16, torch.float16: K.PX_FP16}[dtype]
    return dict(D=d, BLOCK_D=tiles.block_width(d), W=width, BLOCK_W=tiles.block_width(width),
                QK_FP32=dtype == torch.float32, DOT_FP32="tf32x3", PX_MODE=px, PW_MODE=px, UPCAST_BF16=False,
                SAME_QK=same_qk)


def _tile(config):
    return (config.kwargs["BLOCK_ROWS"], config.kwargs["BLOCK_COLS"], config.num_warps, config.num_stages)


def _close_fp32(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)  # fp32 kernels vs float64


def _size(kernel, config, flags):
    return tiles._config_bytes(kernel, config, flags)


def test_narrow_features_keep_the_tables(compiled):
    """d = 64 in bf16 (the benchmark shapes): tuned launches benchmark every table tile, an
    untuned one runs the table's first: the pruning changes nothing there."""
    flags = _constexprs(64, torch.bfloat16)
    for kernel, table in (("row", tiles.ROW_TILES), ("pair", tiles.PAIR_TILES)):
        configs, n = _launch_configs(kernel, None, True)
        assert [_tile(c) for c in tiles.choose(kernel, configs, n, tuned=True, limit=H100, **flags)] == table
        assert [_tile(c) for c in tiles.choose(kernel, configs, n, tuned=False, limit=H100, **flags)] == table[:1]
    configs, n = _launch_configs("symmetric", "auto", True)
    chosen = tiles.choose("symmetric", configs, n, tuned=True, limit=H100, **flags)
    assert [(_tile(c), c.kwargs["PAIRED"]) for c in chosen] == (
        [(t, False) for t in tiles.SYMMETRIC_TILES] + [(t, True) for t in tiles.PAIRED_WALK_TILES])
    # q is k and α = β: the kernel ignores PAIRED, so each tile is benchmarked once
    chosen = tiles.choose("symmetric", configs, n, tuned=True, limit=H100, **_constexprs(64, torch.bfloat16, True))
    assert [_tile(c) for c in chosen] == tiles.SYMMETRIC_TILES


@pytest.mark.parametrize("kernel,walk", LAUNCHES, ids=[f"{k}-{w}" if w else k for k, w in LAUNCHES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("limit", [H100, A100, SM86], ids=["H100", "A100", "sm86"])
def test_every_feature_width_gets_a_tile_that_fits(compiled, kernel, walk, dtype, limit):
    for d in WIDTHS:
        flags = _constexprs(d, dtype)
        for tuned in (True, False):
            configs, n = _launch_configs(kernel, walk, tuned)
            if not tiles.smallest_tile_fits(kernel, d, 32, dtype, limit):
                with pytest.raises(ValueError, match=rf"d={d} is too wide.*backend='torch'"):
                    tiles.choose(kernel, configs, n, tuned=tuned, limit=limit, **flags)
                continue
            chosen = tiles.choose(kernel, configs, n, tuned=tuned, limit=limit, **flags)
            sizes = [_size(kernel, c, flags) for c in chosen]
            assert chosen and min(sizes) <= limit, (d, tuned)  # the benchmark always holds one that runs
            assert max(sizes) <= limit * tiles._MAYBE_FITS, (d, tuned)
            if not tuned:
                assert len(chosen) == 1 and sizes[0] <= limit, d
            for config in chosen:
                if any(config is c for c in configs[:n]):  # a table tile: registers too
                    assert tiles._holds_in_registers(config, flags["BLOCK_D"]), (d, _tile(config))
            # each benchmarked fallback is one more compile on the first call
            assert sum(not any(c is t for t in configs[:n]) for c in chosen) <= tiles._FALLBACKS_TIMED + 1, d
            if walk == "paired" and not tuned:
                assert chosen[0].kwargs["PAIRED"] or d >= 128, d  # a paired tile where one fits


def test_fp32_paired_walk_default_tile_was_too_big_for_hopper(compiled):
    """The paired walk's table default (128 × 64, 2 stages) takes 270 848 bytes on sm_90 in
    fp32 with tf32x3 dots (compiled), more than an H100 block has: untuned it now runs the
    first paired tile that fits, tuned it benchmarks only those that may."""
    flags = _constexprs(64, torch.float32)
    configs, n = _launch_configs("symmetric", "paired", False)
    assert _tile(configs[0]) == tiles.PAIRED_WALK_TILES[0] and _size("symmetric", configs[0], flags) > H100
    (chosen,) = tiles.choose("symmetric", configs, n, tuned=False, limit=H100, **flags)
    assert chosen.kwargs["PAIRED"] and _tile(chosen) == tiles.SMALL_TILES[0]
    configs, n = _launch_configs("symmetric", "paired", True)
    chosen = tiles.choose("symmetric", configs, n, tuned=True, limit=H100, **flags)
    assert (128, 64, 8, 2) not in [_tile(c) for c in chosen]


def test_untuned_launches_take_the_first_table_tile_that_fits(compiled):
    """d = 160 (Stable Diffusion's deepest layers) in bf16: the 128-row tiles would not keep
    q in registers; the first of the small tiles runs."""
    flags = _constexprs(160, torch.bfloat16)
    configs, n = _launch_configs("row", None, False)
    (chosen,) = tiles.choose("row", configs, n, tuned=False, limit=H100, **flags)
    assert _tile(chosen) == tiles.SMALL_TILES[0]


def test_shared_bytes_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="kernel must be one of"):
        tiles.shared_bytes("rows", 64, 64, 2, block_d=64)


def test_pruner_reads_the_limit_of_the_launch_device(compiled, monkeypatch):
    seen = []
    monkeypatch.setattr(tiles, "device_limit", lambda device: seen.append(device) or SM86)
    configs, n = _launch_configs("row", None, True)
    flags = _constexprs(256, torch.bfloat16)
    q = torch.zeros(1)
    pruned = tiles.pruner("row", n)(configs, {"Q": q, "N": 3}, **flags)
    assert seen == [q.device]
    assert pruned == tiles.choose("row", configs, n, tuned=True, limit=SM86, **flags)


def test_auto_leaves_features_too_wide_for_any_tile_to_torch(monkeypatch):
    """backend="auto" on a GPU: triton where a tile fits, torch beyond (no OutOfResources).
    CPU stand-ins: a CUDA device object (no CUDA call is made) and an H100's limit."""
    monkeypatch.setattr(backends, "available_backends", lambda: ["dense", "torch", "triton"])
    monkeypatch.setattr(tiles, "device_shared_limit", lambda index: H100)
    gpu = torch.device("cuda", 0)
    # Every op name the public functions key by (ops/affinity.py, symmetric.py, pair.py).
    for op in ("matmul_none", "matmul_row", "logsumexp", "logsumexp_rows_and_cols", "pair", "symmetric",
               "symmetric_same_qk", "symmetric_separate_offsets", "symmetric_same_qk_separate_offsets"):
        for d, dtype, expected in ((64, torch.bfloat16, "triton"), (2048, torch.bfloat16, "triton"),
                                   (4096, torch.bfloat16, "torch"), (512, torch.float32, "triton"),
                                   (1024, torch.float32, "torch")):
            key = (op, 1, 100, 100, d, None if op.startswith("logsumexp") else 16, dtype)
            assert backends._auto(gpu, dtype, key, run=None) == expected, (op, d, dtype)
            assert tb.can_launch(key, gpu) == (expected == "triton")


def test_can_launch_rejects_an_op_no_kernel_computes():
    """An unknown op name is an error, never silently costed as another kernel's tile."""
    with pytest.raises(ValueError, match="no Triton kernel computes: 'gather'"):
        tb.can_launch(("gather", 1, 100, 100, 64, 16, torch.bfloat16), torch.device("cuda", 0))


# --------------------------------------------------------------------------- through Triton's autotuner
@pytest.mark.skipif(not tiles.interpreted(), reason="runs the kernels under TRITON_INTERPRET=1")
@pytest.mark.parametrize("d", [4, 300], ids=["narrow", "wide"])
def test_untuned_launches_run_the_chosen_tile(monkeypatch, d):
    """Untuned launches as on a GPU: the kernels built with the GPU config lists (tables +
    fallbacks) behind ChosenTile, each launch at the one tile ``choose`` gives for an H100
    (the table's first at d = 4, a fallback at d = 300) with no benchmark (Triton 3.6's
    autotuner would time even one config), run by the interpreter, results as the reference."""
    from spectral_kernels.ops import reference

    monkeypatch.setattr(tiles, "interpreted", lambda: False)
    monkeypatch.setattr(tb, "_interpreted", lambda: False)
    kernels = tb._tuned_kernels(False)
    monkeypatch.undo()
    assert all(isinstance(t, tiles.ChosenTile) for t in (*kernels[:2], *kernels[2].values(), kernels[3]))
    limits = []
    monkeypatch.setattr(tiles, "device_limit", lambda device: limits.append(device) or H100)
    monkeypatch.setattr(tb, "_KERNELS", {True: kernels, False: kernels})
    gen = torch.Generator().manual_seed(d)
    q, k = torch.randn(1, 2, 9, d, generator=gen), torch.randn(1, 2, 9, d, generator=gen)
    x = torch.randn(1, 2, 9, 3, generator=gen)
    scale = d ** -0.5
    y, _ = tb.matmul(q, k, x, scale=scale, normalize="row")
    r = tb.logsumexp(q, k, scale=scale)
    seen, symmetric_launch = [], kernels[2]["auto"].run  # .run can be spied on, as on an autotuner

    def spy(*args, **kwargs):
        seen.append(kwargs["SAME_QK"])
        return symmetric_launch(*args, **kwargs)

    monkeypatch.setattr(kernels[2]["auto"], "run", spy)
    s = tb.symmetric_matmul(q, k, x, scale=scale, row_offset=r)
    assert seen == [False]
    p, pt = tb.matmul_pair(q, k, x, x, scale=scale, row_offset=r)
    q64, k64, x64 = (t.double() for t in (q, k, x))
    _close_fp32(y.double(), reference.matmul(q64, k64, x64, scale=scale, normalize="row")[0])
    _close_fp32(r.double(), reference.logsumexp(q64, k64, scale=scale))
    _close_fp32(s.double(), reference.symmetric_matmul(q64, k64, x64, scale=scale,
                                                                       row_offset=r.double()))
    p_ref, pt_ref = reference.matmul_pair(q64, k64, x64, x64, scale=scale, row_offset=r.double())
    _close_fp32(p.double(), p_ref)
    _close_fp32(pt.double(), pt_ref)
    assert limits and all(device.type == "cpu" for device in limits)  # asked for the launch's device
    row_product, logsumexp, symmetric, pair = kernels
    flags = _constexprs(d, torch.float32)
    for kernel, tuner in (("row", row_product), ("logsumexp", logsumexp), ("symmetric", symmetric["auto"]),
                          ("pair", pair)):
        (expected,) = tiles.choose(kernel, tuner.configs, len(tuner.configs) - len(tiles.SMALL_TILES),
                                   tuned=False, limit=H100, **flags)
        assert _tile(tuner.best_config) == _tile(expected), kernel
        is_fallback = not any(c is tuner.best_config for c in tuner.configs[:-len(tiles.SMALL_TILES)])
        assert is_fallback == (d == 300), kernel


# --------------------------------------------------------------------------- against compiled kernels
_FOOTPRINT_SCRIPT = r"""
import torch
from hopper_compile import compile_hopper
from spectral_kernels.ops import triton_kernels as K, triton_tiles as T

FNS = {"row": K._row_product_kernel, "logsumexp": K._logsumexp_kernel, "symmetric": K._symmetric_kernel,
       "pair": K._pair_kernel}
def variant(kernel, d, fp32, paired):
    px = K.PX_FP32 if fp32 else K.PX_BF16
    flags = dict(D=d, BLOCK_D=T.block_width(d), QK_FP32=fp32, DOT_FP32="tf32x3", UPCAST_BF16=False)
    if kernel != "logsumexp":
        flags.update(W=32, BLOCK_W=32, PX_MODE=px)
    if kernel == "row":
        flags.update(HAS_ROW_OFFSET=True, HAS_COL_OFFSET=True, NORMALIZE=False, HEAD_SUM=False, RAW_MAX=False,
                     EVEN_ROWS=True, EVEN_COLS=True)
    elif kernel == "logsumexp":
        flags.update(HAS_COL_OFFSET=True, EVEN_ROWS=True, EVEN_COLS=True)
    elif kernel == "symmetric":
        flags.update(HAS_ROW_OFFSET=True, HAS_COL_OFFSET=True, HEAD_SUM=False, SAME_QK=False, PAIRED=paired,
                     EVEN_N=True)
    else:
        flags.update(PW_MODE=px, HAS_ROW_OFFSET=True, HAS_COL_OFFSET=True, EVEN_ROWS=True, EVEN_COLS=True)
    return flags

# (kernel, d, fp32, paired, tile): the tables' first tiles, where the fp32 estimates are
# tightest; the paired walk; small tiles of wide features (what the fallbacks launch).
CASES = [("row", 64, False, False, (128, 64, 4, 3)), ("row", 64, True, False, (128, 128, 8, 3)),
         ("logsumexp", 64, True, False, (128, 64, 4, 3)), ("symmetric", 64, False, False, (256, 64, 8, 3)),
         ("symmetric", 64, True, False, (128, 64, 4, 3)), ("symmetric", 64, True, True, (64, 64, 4, 2)),
         ("symmetric", 64, False, True, (128, 128, 8, 2)), ("pair", 64, True, False, (128, 64, 8, 2)),
         ("row", 160, False, False, (64, 64, 4, 2)), ("symmetric", 160, False, True, (64, 64, 4, 2)),
         ("symmetric", 160, True, False, (32, 32, 4, 2)), ("pair", 384, False, False, (64, 64, 4, 2)),
         ("symmetric", 768, False, False, (16, 16, 4, 1)), ("row", 384, True, False, (16, 16, 4, 1))]
for arch in (90, 80):  # calibrated on Hopper; Ampere (A100) allocates no more
    for kernel, d, fp32, paired, (rows, cols, warps, stages) in CASES:
        flags = variant(kernel, d, fp32, paired)
        # aligned: launches on 16-byte aligned tensors pipeline their loads through shared memory
        compiled = compile_hopper(FNS[kernel], dict(flags, BLOCK_ROWS=rows, BLOCK_COLS=cols), warps, stages,
                                  aligned=True, operands="fp32" if fp32 else "bf16", arch=arch)
        actual = compiled.metadata.shared
        estimate = T.shared_bytes(kernel, rows, cols, stages, block_d=T.block_width(d), block_w=32,
                                  qk_bytes=4 if fp32 else 2, px_bytes=4 if fp32 else 2, tf32x3=True, paired=paired)
        print(f"sm_{arch}", kernel, d, "fp32" if fp32 else "bf16", "paired" if paired else "",
              (rows, cols, warps, stages), "compiled", actual, "estimate", estimate)
        assert actual <= estimate, (arch, kernel, d, fp32, paired, actual, estimate)
        if arch == 90:
            assert estimate <= max(1.65 * actual, actual + 4096), (kernel, d, fp32, paired, actual, estimate)
print("footprints ok")
"""


@pytest.mark.slow
def test_footprint_estimate_bounds_the_compiled_kernels():
    """The estimate is an upper bound of the shared memory Triton allocates for sm_90 and
    sm_80 (what OutOfResources is raised on), and on sm_90 not so loose that it drops tiles
    that fit (within 1.65×, ~1.0–1.3× for the tables' tiles)."""
    pytest.importorskip("triton.backends.nvidia")
    from hopper_compile import run_script

    done = run_script(_FOOTPRINT_SCRIPT)
    assert done.returncode == 0 and "footprints ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
