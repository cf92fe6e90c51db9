"""Triton kernels of the primitive (DESIGN.md §2) over tiles of S = τ·Q·Kᵀ.

    _row_product_kernel   Y_i = Σ_j exp(S_ij − α_i − β_j)·X_j, or softmax(S − β)·X (online)
                          with the row LSE; optionally Σ_h w_h·Y_h over the heads in-kernel
    _logsumexp_kernel     r_i = log Σ_j exp(S_ij − β_j) (online)
    _symmetric_kernel     ½(E + Eᵀ)·X in one pass: rows accumulate in registers, the Eᵀ·X
                          part of each tile goes to the column rows by atomic adds; an
                          upper-triangle walk where E is symmetric (q is k) or over the
                          symmetric pair tiles E_IJ + (E_JI)ᵀ (PAIRED)
    _pair_kernel          (E·X, Eᵀ·W) in one pass, E_ij = exp(S_ij − α_i − β_j), N ≠ M
                          allowed: the symmetric kernel's row-plus-atomic-column walk over
                          the full rectangle of tiles, with a separate W for the columns

One program owns one block of rows of one batch entry (a (group, head) pair, or a group
when heads are summed) and walks the column tiles. Exponentials use exp2 with log2(e)
folded into the scale and the offsets. Everything accumulates in fp32.

Precision of the two dots (``*_MODE`` constexprs chosen by the launcher; the pair
kernel's Eᵀ·W dot follows the same rule by w's dtype, PW_MODE):
    fp32 operands           input_precision=DOT_FP32: "tf32x3" by default on a GPU (three
                            tf32 tensor-core products of the split operands, fp32-level
                            error) or "ieee" (SIMT FMAs); never plain tf32, whose 2.4e-3
                            relative error breaks fp32 accuracy
    bf16 operands           tensor cores; p is rounded to bf16 for the P·X dot
    fp16 x                  P·X in tf32: same mantissa as fp16, but exp(s) > 65504 (s > 11,
                            easy without offsets) cannot overflow to inf and make 0·inf = NaN
Under TRITON_INTERPRET=1 numpy has no bf16, so bf16 tiles are widened to fp32 after the
load (UPCAST_BF16) and p is rounded through bf16 to keep the GPU's rounding.

Launch grid: 1-D, program id = batch_entry · row_blocks + row_block (no 65 535 limit on
the batch; the programs of one batch entry run together and share K/X in L2).
"""
from __future__ import annotations

import triton
import triton.language as tl

# log2(e) and ln(2). Kernels spell them as literals (a plain Python global cannot be read
# inside @triton.jit); the launchers fold LOG2E into the scale.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Dot modes for the P·X product, by the dtype of x.
PX_FP32 = 0   # x fp32: p fp32, DOT_FP32 precision
PX_BF16 = 1   # x bf16: p rounded to bf16, tensor cores
PX_FP16 = 2   # x fp16: p fp32, x widened, tf32


# --------------------------------------------------------------------------- program and tile helpers
@triton.jit
def _program_rows(N, BLOCK_ROWS: tl.constexpr):
    """(batch entry, first row) of this program: the 1-D grid is entry-major over row blocks."""
    row_blocks = tl.cdiv(N, BLOCK_ROWS)
    pid = tl.program_id(0)
    return pid // row_blocks, (pid % row_blocks) * BLOCK_ROWS


@triton.jit
def _group_and_head(entry, H):
    """(group, head) of a batch entry, as int64 for the pointer arithmetic."""
    return (entry // H).to(tl.int64), (entry % H).to(tl.int64)


@triton.jit
def _load_tile(base, idx, lanes, stride_idx, stride_lane, n_idx, n_lanes,
               EVEN_IDX: tl.constexpr, EVEN_LANES: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """tile[a, b] = base[idx[a]·stride_idx + lanes[b]·stride_lane], zero outside the bounds."""
    ptrs = base + idx[:, None] * stride_idx + lanes[None, :] * stride_lane
    if EVEN_IDX and EVEN_LANES:
        tile = tl.load(ptrs)
    elif EVEN_IDX:
        tile = tl.load(ptrs, mask=(lanes < n_lanes)[None, :], other=0.0)
    elif EVEN_LANES:
        tile = tl.load(ptrs, mask=(idx < n_idx)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(idx < n_idx)[:, None] & (lanes < n_lanes)[None, :], other=0.0)
    if UPCAST_BF16:
        if tile.dtype == tl.bfloat16:
            tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_vector_log2(base, idx, stride, n_idx, EVEN: tl.constexpr):
    """An offset vector (natural log units) converted to log2 units, zero outside the bounds."""
    if EVEN:
        v = tl.load(base + idx * stride)
    else:
        v = tl.load(base + idx * stride, mask=idx < n_idx, other=0.0)
    return v.to(tl.float32) * 1.4426950408889634


@triton.jit
def _dot_qk(q, k_t, QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr):
    """q kᵀ for one tile, fp32 (unscaled)."""
    if QK_FP32:
        return tl.dot(q, k_t, input_precision=DOT_FP32)
    return tl.dot(q, k_t)


@triton.jit
def _scores_log2(q, k_t, scale_log2, QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr):
    """log2(e)·τ·q kᵀ for one tile, fp32."""
    return _dot_qk(q, k_t, QK_FP32, DOT_FP32) * scale_log2


@triton.jit
def _dot_px(acc, p, x, PX_MODE: tl.constexpr, UPCAST_BF16: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + p·x with the precision rule of the module docstring."""
    if PX_MODE == 0:
        acc = tl.dot(p, x, acc, input_precision=DOT_FP32)
    elif PX_MODE == 2:
        acc = tl.dot(p, x.to(tl.float32), acc, input_precision="tf32")
    else:
        p_low = p.to(tl.bfloat16)
        if UPCAST_BF16:
            acc = tl.dot(p_low.to(tl.float32), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(p_low, x, acc)
    return acc


# --------------------------------------------------------------------------- row product
@triton.jit
def _row_block_one_head(Q, K, X, ROW_OFFSET, COL_OFFSET, LSE, g, hh,
                        sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d,
                        sx_g, sx_h, sx_n, sx_w, sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sl_g, sl_h, sl_n,
                        rows, N, M, scale_log2,
                        D: tl.constexpr, W: tl.constexpr,
                        HAS_ROW_OFFSET: tl.constexpr, HAS_COL_OFFSET: tl.constexpr,
                        NORMALIZE: tl.constexpr, RAW_MAX: tl.constexpr,
                        QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
                        PX_MODE: tl.constexpr, UPCAST_BF16: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
                        EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Rows of head (g, hh): Y rows in fp32 (divided by the row sums with NORMALIZE, which
    also stores the row LSE)."""
    q_ptr = Q + g * sq_g + hh * sq_h
    k_ptr = K + g * sk_g + hh * sk_h
    x_ptr = X + g * sx_g + hh * sx_h
    alpha_ptr = ROW_OFFSET + g * sa_g + hh * sa_h
    beta_ptr = COL_OFFSET + g * sb_g + hh * sb_h
    dims = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_W)
    q = _load_tile(q_ptr, rows, dims, sq_n, sq_d, N, D, EVEN_ROWS, D == BLOCK_D, UPCAST_BF16)
    if HAS_ROW_OFFSET:
        alpha = _load_vector_log2(alpha_ptr, rows, sa_n, N, EVEN_ROWS)
    else:
        alpha = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    row_max = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
    for col0 in range(0, M, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        # Kᵀ tile loaded transposed: (BLOCK_D, BLOCK_COLS).
        k_t = tl.trans(_load_tile(k_ptr, cols, dims, sk_n, sk_d, M, D, EVEN_COLS, D == BLOCK_D, UPCAST_BF16))
        qk = _dot_qk(q, k_t, QK_FP32, DOT_FP32)
        if RAW_MAX:
            # τ > 0 and no β: max(τ·qk) = τ·max(qk), so the scaling fuses into the exponent's
            # FMA (one fp32 op per score fewer; the FP32 pipe competes with exp2 here).
            if not EVEN_COLS:
                qk = tl.where((cols < M)[None, :], qk, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(qk, 1) * scale_log2)
            p = tl.exp2(qk * scale_log2 - new_max[:, None])
        else:
            s = qk * scale_log2
            if HAS_COL_OFFSET:
                s -= _load_vector_log2(beta_ptr, cols, sb_n, M, EVEN_COLS)[None, :]
            if not EVEN_COLS:
                # −inf, not 0: exp(0 − α_i) of a padded column may overflow, and inf·0 is NaN.
                s = tl.where((cols < M)[None, :], s, float("-inf"))
            if NORMALIZE:
                new_max = tl.maximum(row_max, tl.max(s, 1))
                p = tl.exp2(s - new_max[:, None])
            else:
                p = tl.exp2(s - alpha[:, None])
        x = _load_tile(x_ptr, cols, lanes, sx_n, sx_w, M, W, EVEN_COLS, W == BLOCK_W, UPCAST_BF16)
        if NORMALIZE:
            correction = tl.exp2(row_max - new_max)
            row_sum = row_sum * correction + tl.sum(p, 1)
            acc = acc * correction[:, None]
            row_max = new_max
        acc = _dot_px(acc, p, x, PX_MODE, UPCAST_BF16, DOT_FP32)
    if NORMALIZE:
        acc = acc / row_sum[:, None]
        if HAS_ROW_OFFSET:
            acc = acc * tl.exp2(-alpha)[:, None]
        lse = (row_max + tl.log2(row_sum)) * 0.6931471805599453
        tl.store(LSE + g * sl_g + hh * sl_h + rows * sl_n, lse, mask=rows < N)
    return acc


@triton.jit
def _row_product_kernel(Q, K, X, ROW_OFFSET, COL_OFFSET, HEAD_WEIGHTS, Y, LSE,
                        sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d,
                        sx_g, sx_h, sx_n, sx_w, sa_g, sa_h, sa_n, sb_g, sb_h, sb_n,
                        sy_g, sy_h, sy_n, sy_w, sl_g, sl_h, sl_n,
                        H, N, M, scale_log2,
                        D: tl.constexpr, W: tl.constexpr,
                        HAS_ROW_OFFSET: tl.constexpr, HAS_COL_OFFSET: tl.constexpr,
                        NORMALIZE: tl.constexpr, HEAD_SUM: tl.constexpr, RAW_MAX: tl.constexpr,
                        QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr, PX_MODE: tl.constexpr,
                        UPCAST_BF16: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
                        EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    entry, row0 = _program_rows(N, BLOCK_ROWS)
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    lanes = tl.arange(0, BLOCK_W)
    if HEAD_SUM:
        # One program sums all heads of its group: Σ_h w_h·Y_h with no atomics.
        g = entry.to(tl.int64)
        total = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        for h in range(0, H):
            acc = _row_block_one_head(
                Q, K, X, ROW_OFFSET, COL_OFFSET, LSE, g, tl.cast(h, tl.int64),
                sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d, sx_g, sx_h, sx_n, sx_w,
                sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sl_g, sl_h, sl_n, rows, N, M, scale_log2,
                D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, NORMALIZE, RAW_MAX, QK_FP32, DOT_FP32, PX_MODE, UPCAST_BF16,
                BLOCK_ROWS, BLOCK_COLS, BLOCK_D, BLOCK_W, EVEN_ROWS, EVEN_COLS)
            total += tl.load(HEAD_WEIGHTS + h).to(tl.float32) * acc
        y_ptrs = Y + g * sy_g + rows[:, None] * sy_n + lanes[None, :] * sy_w
    else:
        g, hh = _group_and_head(entry, H)
        total = _row_block_one_head(
            Q, K, X, ROW_OFFSET, COL_OFFSET, LSE, g, hh,
            sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d, sx_g, sx_h, sx_n, sx_w,
            sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sl_g, sl_h, sl_n, rows, N, M, scale_log2,
            D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, NORMALIZE, RAW_MAX, QK_FP32, DOT_FP32, PX_MODE, UPCAST_BF16,
            BLOCK_ROWS, BLOCK_COLS, BLOCK_D, BLOCK_W, EVEN_ROWS, EVEN_COLS)
        y_ptrs = Y + g * sy_g + hh * sy_h + rows[:, None] * sy_n + lanes[None, :] * sy_w
    tl.store(y_ptrs, total, mask=(rows < N)[:, None] & (lanes < W)[None, :])


# --------------------------------------------------------------------------- logsumexp
@triton.jit
def _logsumexp_kernel(Q, K, COL_OFFSET, LSE,
                      sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d, sb_g, sb_h, sb_n,
                      sl_g, sl_h, sl_n, H, N, M, scale_log2,
                      D: tl.constexpr, HAS_COL_OFFSET: tl.constexpr, QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
                      UPCAST_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                      BLOCK_D: tl.constexpr, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    entry, row0 = _program_rows(N, BLOCK_ROWS)
    g, h = _group_and_head(entry, H)
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + g * sq_g + h * sq_h, rows, dims, sq_n, sq_d, N, D, EVEN_ROWS, D == BLOCK_D,
                   UPCAST_BF16)
    k_base = K + g * sk_g + h * sk_h
    b_base = COL_OFFSET + g * sb_g + h * sb_h
    row_max = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for col0 in range(0, M, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        k_t = tl.trans(_load_tile(k_base, cols, dims, sk_n, sk_d, M, D, EVEN_COLS, D == BLOCK_D, UPCAST_BF16))
        s = _scores_log2(q, k_t, scale_log2, QK_FP32, DOT_FP32)
        if HAS_COL_OFFSET:
            s -= _load_vector_log2(b_base, cols, sb_n, M, EVEN_COLS)[None, :]
        if not EVEN_COLS:
            s = tl.where((cols < M)[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        row_max = new_max
    lse = (row_max + tl.log2(row_sum)) * 0.6931471805599453
    tl.store(LSE + g * sl_g + h * sl_h + rows * sl_n, lse, mask=rows < N)


# --------------------------------------------------------------------------- symmetric product
@triton.jit
def _exp_tile(lhs, rhs_base, row_shift, col_shift_base, rows, cols, dims, s_n, s_d, sc_n, N, scale_log2,
              D: tl.constexpr, HAS_ROW_SHIFT: tl.constexpr, HAS_COL_SHIFT: tl.constexpr,
              QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr, UPCAST_BF16: tl.constexpr, BLOCK_D: tl.constexpr,
              EVEN_N: tl.constexpr):
    """exp(τ·lhs·rhs[cols]ᵀ − shift_i − shift_j) for one tile (shifts in log2 units; absent
    ones cost nothing), zero outside N×N."""
    rhs_t = tl.trans(_load_tile(rhs_base, cols, dims, s_n, s_d, N, D, EVEN_N, D == BLOCK_D, UPCAST_BF16))
    s = _scores_log2(lhs, rhs_t, scale_log2, QK_FP32, DOT_FP32)
    if HAS_ROW_SHIFT:
        s -= row_shift[:, None]
    if HAS_COL_SHIFT:
        s -= _load_vector_log2(col_shift_base, cols, sc_n, N, EVEN_N)[None, :]
    if not EVEN_N:
        # Padded rows feed the column sums and padded columns the row sums: both must be 0.
        s = tl.where((rows < N)[:, None] & (cols < N)[None, :], s, float("-inf"))
    return tl.exp2(s)


@triton.jit
def _symmetric_tile(q_rows, k_rows, alpha_rows, beta_rows, q_base, k_base, x_base, alpha_base, beta_base,
                    rows, cols, dims, lanes, sq_n, sq_d, sk_n, sk_d, sx_n, sx_w, sa_n, sb_n, N, scale_log2,
                    D: tl.constexpr, W: tl.constexpr, HAS_ROW_OFFSET: tl.constexpr, HAS_COL_OFFSET: tl.constexpr,
                    SAME_QK: tl.constexpr, PAIRED: tl.constexpr, QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
                    UPCAST_BF16: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr):
    """E_IJ = exp(S_IJ − α_I − β_J), or with PAIRED (ignored when SAME_QK) the symmetric
    pair tile T_IJ = E_IJ + (E_JI)ᵀ, whose second term is exp(τ K_I·Q_Jᵀ − β_I − α_J); and
    the X rows of the tile's columns."""
    p = _exp_tile(q_rows, k_base, alpha_rows, beta_base, rows, cols, dims, sk_n, sk_d, sb_n, N, scale_log2,
                  D, HAS_ROW_OFFSET, HAS_COL_OFFSET, QK_FP32, DOT_FP32, UPCAST_BF16, BLOCK_D, EVEN_N)
    if PAIRED and not SAME_QK:
        p += _exp_tile(k_rows, q_base, beta_rows, alpha_base, rows, cols, dims, sq_n, sq_d, sa_n, N, scale_log2,
                       D, HAS_COL_OFFSET, HAS_ROW_OFFSET, QK_FP32, DOT_FP32, UPCAST_BF16, BLOCK_D, EVEN_N)
    x_cols = _load_tile(x_base, cols, lanes, sx_n, sx_w, N, W, EVEN_N, W == BLOCK_W, UPCAST_BF16)
    return p, x_cols


@triton.jit
def _symmetric_one_head(Q, K, X, ROW_OFFSET, COL_OFFSET, y_base, g, hh, weight,
                        sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d,
                        sx_g, sx_h, sx_n, sx_w, sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sy_n, sy_w,
                        row0, N, scale_log2,
                        D: tl.constexpr, W: tl.constexpr, HAS_ROW_OFFSET: tl.constexpr,
                        HAS_COL_OFFSET: tl.constexpr, SAME_QK: tl.constexpr, PAIRED: tl.constexpr,
                        QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr, PX_MODE: tl.constexpr,
                        UPCAST_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr):
    """Head (g, hh): adds weight·(tileᵀ·X) of the visited column tiles to Y (atomics) and
    returns weight·(tile·X) of the block's rows (not yet added)."""
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_W)
    q_base = Q + g * sq_g + hh * sq_h
    k_base = K + g * sk_g + hh * sk_h
    x_base = X + g * sx_g + hh * sx_h
    alpha_base = ROW_OFFSET + g * sa_g + hh * sa_h
    beta_base = COL_OFFSET + g * sb_g + hh * sb_h
    q_rows = _load_tile(q_base, rows, dims, sq_n, sq_d, N, D, EVEN_N, D == BLOCK_D, UPCAST_BF16)
    x_rows = _load_tile(x_base, rows, lanes, sx_n, sx_w, N, W, EVEN_N, W == BLOCK_W, UPCAST_BF16)
    if HAS_ROW_OFFSET:
        alpha_rows = _load_vector_log2(alpha_base, rows, sa_n, N, EVEN_N)
    else:
        alpha_rows = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    k_rows = q_rows  # read only by the paired walk
    beta_rows = alpha_rows
    if PAIRED and not SAME_QK:
        k_rows = _load_tile(k_base, rows, dims, sk_n, sk_d, N, D, EVEN_N, D == BLOCK_D, UPCAST_BF16)
        if HAS_COL_OFFSET:
            beta_rows = _load_vector_log2(beta_base, rows, sb_n, N, EVEN_N)
        else:
            beta_rows = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
    col_start = 0
    if SAME_QK or PAIRED:
        # Upper triangle only: the tile is symmetric (E itself when q is k and α = β, the
        # pair tile T otherwise). Inside the diagonal band every pair (i, j) is met as a
        # row entry from both sides, so the band adds rows only.
        band_end = tl.minimum(row0 + BLOCK_ROWS, N)
        for col0 in range(row0, band_end, BLOCK_COLS):
            cols = col0 + tl.arange(0, BLOCK_COLS)
            p, x_cols = _symmetric_tile(q_rows, k_rows, alpha_rows, beta_rows, q_base, k_base, x_base, alpha_base,
                                        beta_base, rows, cols, dims, lanes, sq_n, sq_d, sk_n, sk_d, sx_n, sx_w, sa_n,
                                        sb_n, N, scale_log2, D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, SAME_QK, PAIRED,
                                        QK_FP32, DOT_FP32, UPCAST_BF16, BLOCK_D, BLOCK_W, EVEN_N)
            acc = _dot_px(acc, p, x_cols, PX_MODE, UPCAST_BF16, DOT_FP32)
        col_start = row0 + BLOCK_ROWS
    for col0 in range(col_start, N, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        p, x_cols = _symmetric_tile(q_rows, k_rows, alpha_rows, beta_rows, q_base, k_base, x_base, alpha_base,
                                    beta_base, rows, cols, dims, lanes, sq_n, sq_d, sk_n, sk_d, sx_n, sx_w, sa_n, sb_n,
                                    N, scale_log2, D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, SAME_QK, PAIRED, QK_FP32,
                                    DOT_FP32, UPCAST_BF16, BLOCK_D, BLOCK_W, EVEN_N)
        acc = _dot_px(acc, p, x_cols, PX_MODE, UPCAST_BF16, DOT_FP32)
        col_part = _dot_px(tl.zeros([BLOCK_COLS, BLOCK_W], dtype=tl.float32), tl.trans(p), x_rows,
                           PX_MODE, UPCAST_BF16, DOT_FP32)
        tl.atomic_add(y_base + cols[:, None] * sy_n + lanes[None, :] * sy_w, col_part * weight,
                      mask=(cols < N)[:, None] & (lanes < W)[None, :], sem="relaxed")
    return acc * weight


@triton.jit
def _symmetric_kernel(Q, K, X, ROW_OFFSET, COL_OFFSET, HEAD_WEIGHTS, Y,
                      sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d,
                      sx_g, sx_h, sx_n, sx_w, sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sy_g, sy_h, sy_n, sy_w,
                      H, N, scale_log2,
                      D: tl.constexpr, W: tl.constexpr, HAS_ROW_OFFSET: tl.constexpr,
                      HAS_COL_OFFSET: tl.constexpr, HEAD_SUM: tl.constexpr, SAME_QK: tl.constexpr,
                      PAIRED: tl.constexpr, QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr, PX_MODE: tl.constexpr,
                      UPCAST_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr):
    """Y += the rows' part (once, at the end) and, tile by tile, the columns' part (atomics)
    of ½(E + Eᵀ)·X, E_ij = exp(S_ij − α_i − β_j).

    Y must be zero on entry. BLOCK_ROWS is a multiple of BLOCK_COLS. Three walks:

    * SAME_QK (q is k and α = β, set by the launcher): E is symmetric and ½(E + Eᵀ) = E,
      so a program visits only the columns from its own first row on, each tile adding its
      rows and (beyond the diagonal band) its transpose to the columns;
    * PAIRED (an autotuned walk for every other case): the same upper-triangle walk over
      the symmetric pair tiles T_IJ = E_IJ + (E_JI)ᵀ, factor ½. Two score tiles and
      exponentials per visit as before, but half the P·X products and half the column
      atomics of the rectangle walk;
    * otherwise the full rectangle of tiles, each adding both directions with factor ½.

    Column atomics scale with N·m per program, so taller row blocks mean fewer in total.
    """
    entry, row0 = _program_rows(N, BLOCK_ROWS)
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    lanes = tl.arange(0, BLOCK_W)
    half = 1.0
    if not SAME_QK:
        half = 0.5
    if HEAD_SUM:
        g = entry.to(tl.int64)
        y_base = Y + g * sy_g
        total = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        for h in range(0, H):
            weight = tl.load(HEAD_WEIGHTS + h).to(tl.float32) * half
            total += _symmetric_one_head(
                Q, K, X, ROW_OFFSET, COL_OFFSET, y_base, g, tl.cast(h, tl.int64), weight,
                sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d, sx_g, sx_h, sx_n, sx_w,
                sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sy_n, sy_w, row0, N, scale_log2,
                D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, SAME_QK, PAIRED, QK_FP32, DOT_FP32, PX_MODE, UPCAST_BF16,
                BLOCK_ROWS, BLOCK_COLS, BLOCK_D, BLOCK_W, EVEN_N)
    else:
        g, hh = _group_and_head(entry, H)
        y_base = Y + g * sy_g + hh * sy_h
        total = _symmetric_one_head(
            Q, K, X, ROW_OFFSET, COL_OFFSET, y_base, g, hh, half,
            sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d, sx_g, sx_h, sx_n, sx_w,
            sa_g, sa_h, sa_n, sb_g, sb_h, sb_n, sy_n, sy_w, row0, N, scale_log2,
            D, W, HAS_ROW_OFFSET, HAS_COL_OFFSET, SAME_QK, PAIRED, QK_FP32, DOT_FP32, PX_MODE, UPCAST_BF16,
            BLOCK_ROWS, BLOCK_COLS, BLOCK_D, BLOCK_W, EVEN_N)
    tl.atomic_add(y_base + rows[:, None] * sy_n + lanes[None, :] * sy_w, total,
                  mask=(rows < N)[:, None] & (lanes < W)[None, :], sem="relaxed")


# --------------------------------------------------------------------------- pair product
@triton.jit
def _pair_kernel(Q, K, X, WQ, ROW_OFFSET, COL_OFFSET, Y, YT,
                 sq_g, sq_h, sq_n, sq_d, sk_g, sk_h, sk_n, sk_d,
                 sx_g, sx_h, sx_n, sx_w, sw_g, sw_h, sw_n, sw_w,
                 sa_g, sa_h, sa_n, sb_g, sb_h, sb_n,
                 sy_g, sy_h, sy_n, sy_w, st_g, st_h, st_n, st_w,
                 H, N, M, scale_log2,
                 D: tl.constexpr, W: tl.constexpr,
                 HAS_ROW_OFFSET: tl.constexpr, HAS_COL_OFFSET: tl.constexpr,
                 QK_FP32: tl.constexpr, DOT_FP32: tl.constexpr, PX_MODE: tl.constexpr, PW_MODE: tl.constexpr,
                 UPCAST_BF16: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
                 EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Y = E·X (stored) and YT += Eᵀ·WQ (atomics), E_ij = exp(S_ij − α_i − β_j).

    X has one row per key (M rows), WQ one row per query (N rows), both W wide. YT must
    be zero on entry. One program owns a block of rows of one (group, head) and walks
    every column tile: each tile's exponentials feed the rows' accumulator (kept in
    registers, stored once) and, transposed, the tile's columns of YT. Nothing is
    symmetric here, so the full N×M rectangle of tiles is visited; column atomics total
    N·M·W/BLOCK_ROWS.
    """
    entry, row0 = _program_rows(N, BLOCK_ROWS)
    g, hh = _group_and_head(entry, H)
    rows = row0 + tl.arange(0, BLOCK_ROWS)
    dims = tl.arange(0, BLOCK_D)
    lanes = tl.arange(0, BLOCK_W)
    q = _load_tile(Q + g * sq_g + hh * sq_h, rows, dims, sq_n, sq_d, N, D, EVEN_ROWS, D == BLOCK_D, UPCAST_BF16)
    w_rows = _load_tile(WQ + g * sw_g + hh * sw_h, rows, lanes, sw_n, sw_w, N, W, EVEN_ROWS, W == BLOCK_W,
                        UPCAST_BF16)
    if HAS_ROW_OFFSET:
        alpha = _load_vector_log2(ROW_OFFSET + g * sa_g + hh * sa_h, rows, sa_n, N, EVEN_ROWS)
    else:
        alpha = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    k_base = K + g * sk_g + hh * sk_h
    x_base = X + g * sx_g + hh * sx_h
    beta_base = COL_OFFSET + g * sb_g + hh * sb_h
    yt_base = YT + g * st_g + hh * st_h
    acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
    for col0 in range(0, M, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        k_t = tl.trans(_load_tile(k_base, cols, dims, sk_n, sk_d, M, D, EVEN_COLS, D == BLOCK_D, UPCAST_BF16))
        s = _scores_log2(q, k_t, scale_log2, QK_FP32, DOT_FP32) - alpha[:, None]
        if HAS_COL_OFFSET:
            s -= _load_vector_log2(beta_base, cols, sb_n, M, EVEN_COLS)[None, :]
        # −inf, not 0, outside N×M: padded rows feed the column sums and padded columns the
        # row sums, and exp of a padded score (offsets only) could overflow; inf·0 is NaN.
        if not EVEN_ROWS and not EVEN_COLS:
            s = tl.where((rows < N)[:, None] & (cols < M)[None, :], s, float("-inf"))
        elif not EVEN_ROWS:
            s = tl.where((rows < N)[:, None], s, float("-inf"))
        elif not EVEN_COLS:
            s = tl.where((cols < M)[None, :], s, float("-inf"))
        p = tl.exp2(s)
        x_cols = _load_tile(x_base, cols, lanes, sx_n, sx_w, M, W, EVEN_COLS, W == BLOCK_W, UPCAST_BF16)
        acc = _dot_px(acc, p, x_cols, PX_MODE, UPCAST_BF16, DOT_FP32)
        col_part = _dot_px(tl.zeros([BLOCK_COLS, BLOCK_W], dtype=tl.float32), tl.trans(p), w_rows,
                           PW_MODE, UPCAST_BF16, DOT_FP32)
        tl.atomic_add(yt_base + cols[:, None] * st_n + lanes[None, :] * st_w, col_part,
                      mask=(cols < M)[:, None] & (lanes < W)[None, :], sem="relaxed")
    tl.store(Y + g * sy_g + hh * sy_h + rows[:, None] * sy_n + lanes[None, :] * sy_w, acc,
             mask=(rows < N)[:, None] & (lanes < W)[None, :])
