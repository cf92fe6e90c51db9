"""Triton backend of the primitive: launchers and the four backend functions.

The kernels live in ``spectral_kernels.ops.triton_kernels``; this module autotunes them,
validates the canonical layout (``spectral_kernels.ops._layout``), allocates the fp32
outputs and launches them. Inputs are passed by strides (no copies), so X may be a
stride-0 view over the heads and offsets may be broadcast views.

On a GPU every kernel is autotuned over a few tile shapes, keyed on N, M, d, m, the
dtypes and the kernel variant, among those that fit the GPU's shared memory
(``spectral_kernels.ops.triton_tiles``). Under TRITON_INTERPRET=1 (tests on CPU) exactly one
small configuration is used and CPU tensors are accepted.
"""
from __future__ import annotations

import math
import os

import torch

from . import triton_tiles as _tiles
from ._layout import same_tensor, symmetric_offsets_args

try:
    import triton

    from . import triton_kernels as _k
except ImportError:  # triton missing: the backend registry sees is_available() False
    triton = None
    _k = None

__all__ = ["matmul", "logsumexp", "symmetric_matmul", "matmul_pair", "is_available", "can_launch"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available() -> bool:
    """True when triton imports (a GPU, or the interpreter, is checked by the registry)."""
    return triton is not None


_interpreted = _tiles.interpreted


# --------------------------------------------------------------------------- autotuning
# SPECTRAL_KERNELS_SYMMETRIC_WALK: "auto" lets the autotuner choose between the rectangle
# and the paired walk where both apply; "rect" / "paired" force one (tests, benchmarks).
SYMMETRIC_WALKS = ("auto", "rect", "paired")
FP32_DOTS = ("tf32x3", "ieee")


def _autotune_enabled() -> bool:
    """SPECTRAL_KERNELS_TRITON_AUTOTUNE=0 runs one tile shape, the first of the table that fits
    (fast compiles for tests)."""
    return os.environ.get("SPECTRAL_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def _autotune(kernel, configs_and_count, tuned, *, key, reset_to_zero=None):
    """Tuned: triton.autotune over the candidates and fallbacks of ``_tiles.configs``,
    pruned to what fits this GPU's shared memory (``_tiles.pruner``). Not tuned (on a GPU):
    ``_tiles.ChosenTile``, one tile per shape and no benchmark."""
    configs, n_candidates = configs_and_count
    if not tuned and not _interpreted():
        return lambda fn: _tiles.ChosenTile(fn, kernel, configs_and_count, key)
    # (interpreted: one config, which Triton never prunes)
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero, prune_configs_by={
        "early_config_prune": _tiles.pruner(kernel, n_candidates)})


def _symmetric_configs(tuned, walk):
    """Candidates of one walk ("auto": the rectangle walk's, plus the paired walk's when
    tuned; the pruning drops those where q is k and α = β); small fallback tiles of the
    walk, and of the rectangle walk (the smaller footprint) after the paired walk's."""
    rect, paired = (_tiles.SYMMETRIC_TILES, {"PAIRED": False}), (_tiles.PAIRED_WALK_TILES, {"PAIRED": True})
    tables = {"rect": [rect], "paired": [paired], "auto": [rect, paired] if tuned else [rect]}[walk]
    fallbacks = [{"PAIRED": True}, {"PAIRED": False}] if walk == "paired" else [{"PAIRED": False}]
    # Rows = 2 × columns: the interpreter tests cover a diagonal band of several tiles.
    return _tiles.configs(tables, interpreter_rows=2 * _tiles.INTERPRETER_BLOCK, fallbacks=fallbacks)


def _symmetric_walk():
    walk = os.environ.get("SPECTRAL_KERNELS_SYMMETRIC_WALK", "auto")
    if walk not in SYMMETRIC_WALKS:
        raise ValueError(f"SPECTRAL_KERNELS_SYMMETRIC_WALK must be one of {SYMMETRIC_WALKS}, got {walk!r}")
    return walk


def _even(size, block):
    return lambda args: args[size] % args[block] == 0


def _tuned_kernels(tuned):
    """(row product, logsumexp, {walk: symmetric}, pair) wrapped in autotune + the EVEN_*
    heuristics (one autotuner per symmetric walk; they share the compiled kernels)."""
    even_rows_cols = triton.heuristics({"EVEN_ROWS": _even("N", "BLOCK_ROWS"), "EVEN_COLS": _even("M", "BLOCK_COLS")})
    row_configs = _tiles.configs([(_tiles.ROW_TILES, {})], interpreter_rows=_tiles.INTERPRETER_BLOCK)
    row_product = _autotune(
        "row", row_configs, tuned,
        key=["N", "M", "D", "W", "HAS_ROW_OFFSET", "HAS_COL_OFFSET", "NORMALIZE", "HEAD_SUM", "RAW_MAX", "PX_MODE",
             "DOT_FP32"],
    )(even_rows_cols(_k._row_product_kernel))
    logsumexp = _autotune(
        "logsumexp", row_configs, tuned, key=["N", "M", "D", "HAS_COL_OFFSET", "DOT_FP32"],
    )(even_rows_cols(_k._logsumexp_kernel))
    even_n = triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_ROWS"] == 0
                                and args["N"] % args["BLOCK_COLS"] == 0})
    symmetric = {
        walk: _autotune(
            "symmetric", _symmetric_configs(tuned, walk), tuned,
            key=["N", "D", "W", "HAS_ROW_OFFSET", "HAS_COL_OFFSET", "HEAD_SUM", "SAME_QK", "PX_MODE", "DOT_FP32"],
            reset_to_zero=["Y"],
        )(even_n(_k._symmetric_kernel))
        for walk in SYMMETRIC_WALKS}
    # Rows ≠ columns under the interpreter, so that a mix-up of the two tile sizes shows in the tests.
    pair = _autotune(
        "pair", _tiles.configs([(_tiles.PAIR_TILES, {})], interpreter_rows=2 * _tiles.INTERPRETER_BLOCK),
        tuned,
        key=["N", "M", "D", "W", "HAS_ROW_OFFSET", "HAS_COL_OFFSET", "PX_MODE", "PW_MODE", "DOT_FP32"],
        reset_to_zero=["YT"],
    )(even_rows_cols(_k._pair_kernel))
    return row_product, logsumexp, symmetric, pair


if triton is not None:
    _KERNELS = {True: _tuned_kernels(True), False: _tuned_kernels(False)}


def _kernels():
    return _KERNELS[_autotune_enabled()]


# --------------------------------------------------------------------------- validation
def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the triton backend supports float16, bfloat16 "
                        f"and float32 (use backend='torch' or 'dense' for float64)")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (canonical layout), got shape {tuple(t.shape)}")


def _check_device(**tensors):
    interpreted = _interpreted()
    for name, t in tensors.items():
        if t is None:
            continue
        if interpreted and t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU under TRITON_INTERPRET=1, got {t.device}")
        if not interpreted and t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; the triton backend needs CUDA tensors "
                             f"(or TRITON_INTERPRET=1 for CPU tests)")


def _check_layout(q, k, x=None, *, row_offset=None, col_offset=None, head_weights=None):
    """Validate the canonical 4-D layout; returns (G, H, N, M, d, m or None)."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    g, h, n, d = q.shape
    m_tokens = k.shape[2]
    if k.shape[:2] != (g, h) or k.shape[3] != d:
        raise ValueError(f"k must have shape ({g}, {h}, M, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if d < 1:
        raise ValueError("q and k must have at least one feature (d ≥ 1)")
    width = None
    if x is not None:
        _check_tensor("x", x, 4)
        if x.shape[0] != g or x.shape[1] not in (1, h) or x.shape[2] != m_tokens:
            raise ValueError(f"x must have shape ({g}, {h} or 1, {m_tokens}, m), got {tuple(x.shape)}")
        width = x.shape[3]
    for name, t, length in (("row_offset", row_offset, n), ("col_offset", col_offset, m_tokens)):
        if t is not None:
            _check_tensor(name, t, 3)
            if tuple(t.shape) != (g, h, length):
                raise ValueError(f"{name} must have shape ({g}, {h}, {length}), got {tuple(t.shape)}")
    if head_weights is not None:
        _check_tensor("head_weights", head_weights, 1)
        if head_weights.shape[0] != h:
            raise ValueError(f"head_weights must have {h} entries (one per head), got {head_weights.shape[0]}")
    _check_device(q=q, k=k, x=x, row_offset=row_offset, col_offset=col_offset, head_weights=head_weights)
    return g, h, n, m_tokens, d, width


# --------------------------------------------------------------------------- launch helpers
# The kernels address one (group, head) slice with int32 offsets (row · row stride + lane ·
# lane stride; the group and head offsets are int64): a view whose slice spans more, e.g.
# q sliced out of a fused qkv projection of 10⁶ tokens, would wrap around.
_INT32_MAX = 2**31 - 1


def _slice_extent(t):
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))


def _int32_addressable(**tensors):
    """The tensors, each replaced by a contiguous copy where its slice offsets would overflow
    int32 (one copy per distinct tensor, so q is k stays true); a ValueError naming the
    argument where even the copy's would (more than 2³¹ elements in one slice)."""
    copies = []  # (original, contiguous copy)
    out = []
    for name, t in tensors.items():
        if t is not None and _slice_extent(t) > _INT32_MAX:
            copy = next((c for original, c in copies if same_tensor(original, t)), None)
            if copy is None:
                copy = t.contiguous()
                if _slice_extent(copy) > _INT32_MAX:
                    raise ValueError(f"{name} has {math.prod(t.shape[2:])} elements in one (group, head) slice, "
                                     f"beyond the triton kernels' int32 offsets; use backend='torch'")
                copies.append((t, copy))
            t = copy
        out.append(t)
    return out


_block = _tiles.block_width


def _px_mode(x_dtype):
    return {torch.float32: _k.PX_FP32, torch.bfloat16: _k.PX_BF16, torch.float16: _k.PX_FP16}[x_dtype]


def _fp32_dot():
    """input_precision of fp32 dots: SPECTRAL_KERNELS_FP32_DOT, "tf32x3" (default: three
    tensor-core tf32 products of the split operands, error at fp32 level) or "ieee" (SIMT
    FMAs). Plain tf32 is not offered: its 2.4e-3 relative error is not fp32 accuracy."""
    mode = os.environ.get("SPECTRAL_KERNELS_FP32_DOT", "tf32x3")
    if mode not in FP32_DOTS:
        raise ValueError(f"SPECTRAL_KERNELS_FP32_DOT must be one of {FP32_DOTS}, got {mode!r}")
    return mode


# The kernel each dispatched op runs: the first word of its ``_shape_key`` op name.
_KERNEL_OF_OP_FAMILY = {"matmul": "row", "logsumexp": "logsumexp", "pair": "pair", "symmetric": "symmetric"}


def can_launch(shape_key, device) -> bool:
    """Whether the op of ``shape_key`` (``ops._common._shape_key``) has a tile that fits
    this GPU's shared memory: False only for very wide features (on H100, d > 2 048 in
    bf16, d > 512 in fp32 with tf32x3 dots), which ``backend="auto"`` then leaves to torch."""
    op, _, _, _, d, width, dtype = shape_key
    family = op.split("_", 1)[0]  # "matmul_row" → "matmul", "symmetric_same_qk" → "symmetric"
    if family not in _KERNEL_OF_OP_FAMILY:
        raise ValueError(f"shape_key names an op no Triton kernel computes: {op!r}")
    kernel = _KERNEL_OF_OP_FAMILY[family]
    return _tiles.smallest_tile_fits(kernel, d, width, dtype, _tiles.device_limit(device),
                                     tf32x3=_fp32_dot() == "tf32x3")


def _dtype_flags(q, x=None, w=None):
    """Constexprs choosing dot precision and the interpreter's bf16 widening."""
    flags = {"QK_FP32": q.dtype == torch.float32, "DOT_FP32": _fp32_dot(),
             "UPCAST_BF16": _interpreted() and any(t is not None and t.dtype == torch.bfloat16 for t in (q, x, w))}
    if x is not None:
        flags["PX_MODE"] = _px_mode(x.dtype)
    if w is not None:
        flags["PW_MODE"] = _px_mode(w.dtype)
    return flags


def _strides(t, ndim):
    """t's strides, or zeros for an absent optional tensor (never dereferenced)."""
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _ptr(t, fallback):
    # An absent optional operand still needs a pointer argument; its constexpr flag keeps
    # the kernel from reading it.
    return t if t is not None else fallback


def _width_chunks(width):
    """Column ranges of X processed per launch: an fp32 accumulator of BLOCK_ROWS × m must
    stay in registers, so wide X (m > 128) is done in slices, recomputing the exponentials
    (the interpreter uses 16 so that the tests exercise the slicing)."""
    step = 16 if _interpreted() else 128
    return [(c0, min(c0 + step, width)) for c0 in range(0, width, step)]


def _grid(entries, n, block_name):
    return lambda meta: (triton.cdiv(n, meta[block_name]) * entries,)


# --------------------------------------------------------------------------- backend functions
def matmul(q, k, x, *, scale, row_offset=None, col_offset=None, normalize="none", head_weights=None):
    """Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j)·X_j, or softmax rows; returns (Y fp32, LSE or None).

    Canonical layout in, Y (G, H, N, m), or (G, N, m) = Σ_h w_h·Y_h with ``head_weights``;
    with normalize="row" also the row LSE (G, H, N) of S − β.
    """
    if normalize not in ("none", "row"):
        raise ValueError(f"normalize must be 'none' or 'row', got {normalize!r}")
    g, h, n, m_tokens, d, width = _check_layout(q, k, x, row_offset=row_offset, col_offset=col_offset,
                                                head_weights=head_weights)
    q, k, x, row_offset, col_offset = _int32_addressable(q=q, k=k, x=x, row_offset=row_offset, col_offset=col_offset)
    x = x.expand(g, h, m_tokens, width)
    head_sum = head_weights is not None
    y = torch.empty((g, n, width) if head_sum else (g, h, n, width), dtype=torch.float32, device=q.device)
    y_strides = (y.stride(0), 0, y.stride(1), y.stride(2)) if head_sum else y.stride()
    lse = torch.empty((g, h, n), dtype=torch.float32, device=q.device) if normalize == "row" else None
    if n == 0 or m_tokens == 0 or width == 0:  # nothing to launch; an empty sum is 0, its log −inf
        return y.zero_(), (None if lse is None else lse.fill_(float("-inf")))
    kernel = _kernels()[0]
    for c0, c1 in _width_chunks(width):
        kernel[_grid(g if head_sum else g * h, n, "BLOCK_ROWS")](
            q, k, x[..., c0:c1], _ptr(row_offset, q), _ptr(col_offset, q), _ptr(head_weights, q),
            y[..., c0:c1], _ptr(lse, y),
            *q.stride(), *k.stride(), *x.stride(), *_strides(row_offset, 3), *_strides(col_offset, 3),
            *y_strides, *_strides(lse, 3),
            h, n, m_tokens, float(scale) * _k.LOG2E,
            D=d, W=c1 - c0, HAS_ROW_OFFSET=row_offset is not None, HAS_COL_OFFSET=col_offset is not None,
            NORMALIZE=normalize == "row", HEAD_SUM=head_sum,
            RAW_MAX=normalize == "row" and col_offset is None and scale > 0,
            BLOCK_D=_block(d), BLOCK_W=_block(c1 - c0), **_dtype_flags(q, x))
    return y, lse


def logsumexp(q, k, *, scale, col_offset=None):
    """r_i = log Σ_j exp(τ q_i·k_j − β_j), (G, H, N) fp32, in one online pass."""
    g, h, n, m_tokens, d, _ = _check_layout(q, k, col_offset=col_offset)
    q, k, col_offset = _int32_addressable(q=q, k=k, col_offset=col_offset)
    lse = torch.empty((g, h, n), dtype=torch.float32, device=q.device)
    if n == 0 or m_tokens == 0:
        return lse.fill_(float("-inf"))
    _kernels()[1][_grid(g * h, n, "BLOCK_ROWS")](
        q, k, _ptr(col_offset, q), lse,
        *q.stride(), *k.stride(), *_strides(col_offset, 3), *lse.stride(),
        h, n, m_tokens, float(scale) * _k.LOG2E,
        D=d, HAS_COL_OFFSET=col_offset is not None, BLOCK_D=_block(d), **_dtype_flags(q))
    return lse


def symmetric_matmul(q, k, x, *, scale, offset=None, row_offset=None, col_offset=None, head_weights=None):
    """½(E + Eᵀ)·X with E_ij = exp(τ q_i·k_j − α_i − β_j), one pass over the score tiles.

    ``offset`` = a means α = β = a. When q and k are the same tensor (same storage, shape
    and strides) and α = β only the tiles on or above the diagonal are computed; otherwise
    the autotuner picks the rectangle or the paired walk (SPECTRAL_KERNELS_SYMMETRIC_WALK
    forces one). Returns (G, H, N, m), or (G, N, m) with weights.
    """
    alpha, beta = symmetric_offsets_args(offset, row_offset, col_offset)
    g, h, n, m_tokens, d, width = _check_layout(q, k, x, row_offset=alpha, col_offset=beta,
                                                head_weights=head_weights)
    q, k, x, alpha, beta = _int32_addressable(q=q, k=k, x=x, row_offset=alpha, col_offset=beta)
    if m_tokens != n:
        raise ValueError(f"the symmetric product needs q and k with the same number of tokens, got {n} and {m_tokens}")
    x = x.expand(g, h, n, width)
    head_sum = head_weights is not None
    y = torch.zeros((g, n, width) if head_sum else (g, h, n, width), dtype=torch.float32, device=q.device)
    if n == 0 or width == 0:
        return y
    y_strides = (y.stride(0), 0, y.stride(1), y.stride(2)) if head_sum else y.stride()
    kernel = _kernels()[2][_symmetric_walk()]
    for c0, c1 in _width_chunks(width):
        # Autotuning trials add into Y; reset_to_zero=["Y"] zeroes this slice before each
        # trial and again before the real launch (Triton 3.6 and 3.9 alike).
        kernel[_grid(g if head_sum else g * h, n, "BLOCK_ROWS")](
            q, k, x[..., c0:c1], _ptr(alpha, q), _ptr(beta, q), _ptr(head_weights, q), y[..., c0:c1],
            *q.stride(), *k.stride(), *x.stride(), *_strides(alpha, 3), *_strides(beta, 3), *y_strides,
            h, n, float(scale) * _k.LOG2E,
            D=d, W=c1 - c0, HAS_ROW_OFFSET=alpha is not None, HAS_COL_OFFSET=beta is not None, HEAD_SUM=head_sum,
            SAME_QK=same_tensor(q, k) and same_tensor(alpha, beta),
            BLOCK_D=_block(d), BLOCK_W=_block(c1 - c0), **_dtype_flags(q, x))
    return y


def matmul_pair(q, k, x, w, *, scale, row_offset=None, col_offset=None):
    """(E·X, Eᵀ·W) with E_ij = exp(τ q_i·k_j − α_i − β_j), both from one pass over the tiles.

    Canonical layout in: x (G, H or 1, M, m) has one row per key, w (G, H or 1, N, m) one
    row per query (either may be a stride-0 view over the heads). Returns fp32
    E·X (G, H, N, m) and Eᵀ·W (G, H, M, m).
    """
    g, h, n, m_tokens, d, width = _check_layout(q, k, x, row_offset=row_offset, col_offset=col_offset)
    _check_tensor("w", w, 4)
    if w.shape[0] != g or w.shape[1] not in (1, h) or w.shape[2] != n:
        raise ValueError(f"w must have shape ({g}, {h} or 1, {n}, m) (one row per query), got {tuple(w.shape)}")
    if w.shape[3] != width:
        raise ValueError(f"w must have the same width as x ({width}), got {w.shape[3]}")
    _check_device(w=w)
    q, k, x, w, row_offset, col_offset = _int32_addressable(q=q, k=k, x=x, w=w, row_offset=row_offset,
                                                            col_offset=col_offset)
    x = x.expand(g, h, m_tokens, width)
    w = w.expand(g, h, n, width)
    y = torch.empty((g, h, n, width), dtype=torch.float32, device=q.device)
    yt = torch.zeros((g, h, m_tokens, width), dtype=torch.float32, device=q.device)
    if n == 0 or m_tokens == 0 or width == 0:  # empty sums
        return y.zero_(), yt
    kernel = _kernels()[3]
    for c0, c1 in _width_chunks(width):
        # Autotuning trials add into YT; reset_to_zero=["YT"] zeroes this slice before each
        # trial and again before the real launch.
        kernel[_grid(g * h, n, "BLOCK_ROWS")](
            q, k, x[..., c0:c1], w[..., c0:c1], _ptr(row_offset, q), _ptr(col_offset, q),
            y[..., c0:c1], yt[..., c0:c1],
            *q.stride(), *k.stride(), *x.stride(), *w.stride(), *_strides(row_offset, 3),
            *_strides(col_offset, 3), *y.stride(), *yt.stride(),
            h, n, m_tokens, float(scale) * _k.LOG2E,
            D=d, W=c1 - c0, HAS_ROW_OFFSET=row_offset is not None, HAS_COL_OFFSET=col_offset is not None,
            BLOCK_D=_block(d), BLOCK_W=_block(c1 - c0), **_dtype_flags(q, x, w))
    return y, yt
