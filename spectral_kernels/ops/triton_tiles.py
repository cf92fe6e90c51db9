"""Tile shapes the Triton kernels launch with: autotune candidates, their shared-memory
footprint, and the pruning that keeps only shapes that fit the GPU.

Each kernel keeps a row block of q (and, for the column side, of X or W) in shared memory
for its whole walk and streams column tiles of k and X through ``num_stages`` buffers, all
d wide. Wide features outgrow the opt-in shared memory of a block (227 KB on H100/H200,
163 KB on A100): a launch that does not fit fails with OutOfResources, and Triton's
autotuner only skips such a candidate when it benchmarks several. So the pruning estimates
every candidate's footprint (the formula is checked against kernels compiled for sm_90 in
tests/test_triton_tiles.py), drops those that cannot fit, and where none is left falls
back to the first of ever smaller tiles that does.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton

    from . import triton_kernels as _k
except ImportError:  # the registry never loads the triton backend without it
    triton = None
    _k = None

# (BLOCK_ROWS, BLOCK_COLS, num_warps, num_stages), in order of preference: an untuned launch
# runs the first that fits. Row product and logsumexp: FlashAttention-2/3 shapes for Hopper.
ROW_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
# Symmetric product, rows a multiple of columns: tall row blocks cut the column atomics
# (N²·m/BLOCK_ROWS in total).
SYMMETRIC_TILES = [(128, 64, 8, 2), (256, 64, 8, 2), (128, 128, 8, 2), (256, 64, 8, 3), (128, 64, 4, 3),
                   (64, 64, 4, 3)]
# The paired upper-triangle walk of the symmetric product: two score tiles live per step,
# so no 256-row blocks.
PAIRED_WALK_TILES = [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)]
# Pair product: the same trade-off as the symmetric one (column atomics N·M·m/BLOCK_ROWS).
PAIR_TILES = SYMMETRIC_TILES
# Where no candidate fits: tried in this order, the first that fits is launched (rows a
# multiple of columns, as the symmetric kernel needs; 16 is tl.dot's smallest tile).
SMALL_TILES = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)]

INTERPRETER_BLOCK = 16
# What the compiled kernels use beyond their tiles (barriers, reduction scratch: 0.25–1.3 KB
# on sm_90).
_SLACK_BYTES = 2048
# A tuned launch benchmarks the candidates whose estimate is within this factor of the limit:
# the estimate is an upper bound (up to ~1.3× above for the tables' tiles, more for small
# tiles of very wide features), and Triton's autotuner skips a candidate that does not fit.
_MAYBE_FITS = 1.4
# Fallbacks a tuned launch benchmarks (the first that may fit): every one is a compile.
_FALLBACKS_TIMED = 2
KERNELS = ("row", "logsumexp", "symmetric", "pair")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def shared_bytes(kernel, rows, cols, stages, *, block_d, block_w=0, qk_bytes=2, px_bytes=2, tf32x3=False,
                 paired=False):
    """Estimated shared memory of one program of ``kernel`` (one of KERNELS) at this tile:
    an upper bound of what Triton 3.6/3.9 allocate on sm_90 (within ~1.3× for the tables'
    tiles) and sm_80 (tests/test_triton_tiles.py checks it against compiled kernels).

    ``qk_bytes`` / ``px_bytes``: element size of q, k and of X (and W, and the P tile fed
    to the P·X dots: bf16/fp16, or fp32). ``tf32x3``: fp32 dots split into three tf32
    products, which keep the high and low parts of their operands. ``paired``: the
    symmetric product's paired walk, which holds q and k of both the row block and the
    column tile.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    split_qk, split_px = tf32x3 and qk_bytes == 4, tf32x3 and px_bytes == 4
    q_block = rows * block_d * qk_bytes * (2 if split_qk else 1)  # the row block of q, loaded once
    k_tile = cols * block_d * qk_bytes  # a column tile of k: one buffer a stage (fp32: one more)
    k_buffers = stages + (1 if qk_bytes == 4 else 0)
    if kernel == "logsumexp":
        return q_block + k_buffers * k_tile + _SLACK_BYTES
    x_tile = cols * block_w * px_bytes  # ... and of X, one a stage
    p_tile = rows * cols * px_bytes * (2 if split_px else 1)
    if kernel == "row":
        return q_block + k_buffers * k_tile + stages * x_tile + (p_tile // 2 if split_px else 0) + _SLACK_BYTES
    # Column side: the rows' X (or W) block, and P transposed through shared memory for Pᵀ·X.
    resident = q_block + rows * block_w * px_bytes + p_tile
    if paired:  # q and k of both blocks: twice the q block and the k tiles
        resident += q_block
        k_tile *= 2
    return resident + k_buffers * k_tile + stages * x_tile + _SLACK_BYTES


def block_width(size):
    """Power-of-two tile width ≥ 16 (tl.dot's minimum) covering ``size``."""
    return max(16, triton.next_power_of_2(size))


def smallest_tile_fits(kernel, d, width, dtype, limit, *, tf32x3=True) -> bool:
    """Whether ``kernel``'s smallest fallback tile fits ``limit`` bytes for features of
    width ``d``, ``width`` columns of X (None: no X) and q/k of ``dtype``. X is taken as
    fp32, the wider case, so that a True here means ``choose`` finds a tile."""
    rows, cols, _, stages = SMALL_TILES[-1]
    return shared_bytes(kernel, rows, cols, stages, block_d=block_width(d), block_w=block_width(min(width or 1, 128)),
                        qk_bytes=4 if dtype == torch.float32 else 2, px_bytes=4, tf32x3=tf32x3) <= limit


def _config_bytes(kernel, config, constexprs):
    """shared_bytes of an autotune config launched with the call's ``constexprs``."""
    wide = 4 if constexprs.get("UPCAST_BF16") else 2  # the interpreter widens bf16 to fp32
    px_modes = [constexprs[name] for name in ("PX_MODE", "PW_MODE") if name in constexprs]
    return shared_bytes(
        kernel, config.kwargs["BLOCK_ROWS"], config.kwargs["BLOCK_COLS"], config.num_stages,
        block_d=constexprs["BLOCK_D"], block_w=constexprs.get("BLOCK_W", 0),
        qk_bytes=4 if constexprs.get("QK_FP32") else wide,
        px_bytes=4 if _k.PX_FP32 in px_modes else wide, tf32x3=constexprs.get("DOT_FP32") == "tf32x3",
        paired=kernel == "symmetric" and bool(config.kwargs.get("PAIRED")) and not constexprs.get("SAME_QK"))


def _holds_in_registers(config, block_d):
    """Wide features (d > 128; X is sliced to m ≤ 128 by the launchers): only short row
    blocks and two stages keep the q tile and the k pipeline in registers."""
    return block_d <= 128 or (config.kwargs["BLOCK_ROWS"] * block_d <= 64 * 256 and config.num_stages <= 2)


@functools.lru_cache(maxsize=None)
def device_shared_limit(index: int) -> int:
    """Opt-in shared memory of one block on CUDA device ``index``, as Triton checks it."""
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # an older driver API: torch knows it too
        return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def device_limit(device: torch.device) -> int:
    return device_shared_limit(device.index if device.index is not None else torch.cuda.current_device())


def _launch_limit(named_args) -> int:
    return device_limit(next(t.device for t in named_args.values() if isinstance(t, torch.Tensor)))


def choose(kernel, configs, n_candidates, *, tuned, limit, **constexprs):
    """The configs to benchmark (``tuned``), or the one to run, for one launch.

    ``configs[:n_candidates]`` are the tables' candidates in order of preference, the rest
    the SMALL_TILES fallbacks. Not tuned: the first candidate that surely fits ``limit``
    bytes (and, for wide features, the registers), else the first fallback that does.
    Tuned: the candidates that may fit (estimate within _MAYBE_FITS of the limit: Triton's
    autotuner skips a launch that does not); where none surely fits, the first
    _FALLBACKS_TIMED fallbacks that may fit and the first that surely does, so that the
    benchmark always holds a config that runs. Raises ValueError
    naming d when even the smallest tile cannot fit.
    """
    block_d = constexprs["BLOCK_D"]
    if kernel == "symmetric" and constexprs.get("SAME_QK"):
        # q is k and α = β: the kernel ignores PAIRED, keep one copy of each tile
        rect = [c for c in configs[:n_candidates] if not c.kwargs.get("PAIRED")]
        configs, n_candidates = rect + configs[n_candidates:], len(rect)
    sized = [(c, _config_bytes(kernel, c, constexprs)) for c in configs]
    candidates = [(c, size) for c, size in sized[:n_candidates] if _holds_in_registers(c, block_d)]
    small = sized[n_candidates:]
    sure = next((c for c, size in candidates + small if size <= limit), None)
    if sure is None:
        smallest = min(size for _, size in sized)
        raise ValueError(
            f"q/k feature dim d={constexprs.get('D', block_d)} is too wide for the triton kernels on this GPU: the "
            f"smallest tile needs ~{smallest} bytes of shared memory, a block has {limit}; use backend='torch'")
    if not tuned:
        return [sure]
    maybe = [c for c, size in candidates if size <= limit * _MAYBE_FITS]
    if not any(c is sure for c in maybe):
        extra = [c for c, size in small if size <= limit * _MAYBE_FITS][:_FALLBACKS_TIMED]
        maybe += extra if any(c is sure for c in extra) else extra + [sure]
    return maybe


def pruner(kernel, n_candidates):
    """``early_config_prune`` for a tuned autotuner whose first ``n_candidates`` configs are
    the candidates and whose rest are fallbacks (untuned launches go through ChosenTile)."""
    def prune(configs, named_args, **kwargs):
        return choose(kernel, configs, n_candidates, tuned=True, limit=_launch_limit(named_args), **kwargs)

    return prune


class ChosenTile:
    """What an untuned launch goes through instead of triton.autotune: ``fn`` launched at
    the one tile ``choose`` gives, cached per ``key`` (the named arguments' values and the
    tensors' dtypes, as the autotuner keys). Never benchmarks — Triton 3.6's autotuner
    times even a single pruned config, which costs a do_bench per new shape and would
    synchronise inside a CUDA graph capture. ``configs``/``best_config`` as on an autotuner.
    """

    def __init__(self, fn, kernel, configs_and_count, key):
        self.fn, self.kernel, self.key = fn, kernel, key
        self.configs, self.n_candidates = configs_and_count
        self.cache = {}
        self.best_config = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def run(self, *args, grid, **kwargs):
        named = dict(zip(self.fn.arg_names, args))
        key = tuple(named.get(name, kwargs.get(name)) for name in self.key) + tuple(
            str(a.dtype) for a in args if hasattr(a, "dtype"))
        config = self.cache.get(key)
        if config is None:
            (config,) = choose(self.kernel, self.configs, self.n_candidates, tuned=False,
                               limit=_launch_limit(named), **kwargs)
            self.cache[key] = config
        self.best_config = config
        return self.fn[grid](*args, **kwargs, **config.all_kwargs())


def configs(tables, *, interpreter_rows, fallbacks=({},)):
    """(autotune configs, number of candidates) for one autotuner.

    ``tables``: [(tile table, constexprs fixed in its configs), ...], the candidates in
    order of preference; then SMALL_TILES once for each constexpr dict of ``fallbacks``.
    Under the interpreter: one small tile (``interpreter_rows`` × INTERPRETER_BLOCK) with
    the first table's constexprs (no shared memory limit, and a single config is never
    pruned).
    """
    if interpreted():
        fixed = tables[0][1]
        return [triton.Config({"BLOCK_ROWS": interpreter_rows, "BLOCK_COLS": INTERPRETER_BLOCK, **fixed},
                              num_warps=1, num_stages=1)], 1
    candidates = [triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c, **fixed}, num_warps=w, num_stages=s)
                  for table, fixed in tables for r, c, w, s in table]
    small = [triton.Config({"BLOCK_ROWS": r, "BLOCK_COLS": c, **fixed}, num_warps=w, num_stages=s)
             for fixed in fallbacks for r, c, w, s in SMALL_TILES]
    return candidates + small, len(candidates)
