// fp32 inputs: the row product / softmax / log-sum-exp with exact fp32 dot products on the
// CUDA cores (accuracy over speed; tensor cores would round fp32 to tf32).
//
// One thread per query row, 128 rows per CTA, one ≤32-wide slice of X's columns per CTA.
// 32-key tiles of K and X are staged in shared memory, where every thread of the CTA
// reads the same element (a broadcast). Natural-log exponentials (expf) throughout.
#include <cmath>

#include "launchers.h"

namespace spectral_kernels {
namespace {

constexpr int kRowsPerBlock = 128;
constexpr int kKeysPerTile = 32;
constexpr int kColsPerBlock = 32;

struct SimtArgs {
  const float* q;
  const float* k;
  const float* x;
  const float* row_offset;
  const float* col_offset;
  ProductShape shape;
  float scale;
  bool normalize;
  ProductOutput output;
};

template <bool WithX>
__global__ void __launch_bounds__(kRowsPerBlock) rows_simt_kernel(const SimtArgs a) {
  extern __shared__ float smem[];
  float* k_s = smem;                             // [kKeysPerTile][d]
  float* x_s = smem + kKeysPerTile * a.shape.d;  // [kKeysPerTile][kColsPerBlock]

  const ProductShape& sh = a.shape;
  const int d = sh.d;
  const int b = blockIdx.y, head = b % sh.heads, group = b / sh.heads;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x;
  const bool valid_row = row < sh.n;
  const int x_col0 = blockIdx.z * kColsPerBlock;
  const float* q_row = a.q + (static_cast<size_t>(b) * sh.n + (valid_row ? row : 0)) * d;
  const float* k = a.k + static_cast<size_t>(b) * sh.m_keys * d;
  const float* x = WithX ? a.x + static_cast<size_t>(sh.x_heads == 1 ? group : b) * sh.m_keys * sh.width : nullptr;
  const float* col_offset = a.col_offset ? a.col_offset + static_cast<size_t>(b) * sh.m_keys : nullptr;
  const float row_alpha =
      (valid_row && a.row_offset) ? a.row_offset[static_cast<size_t>(b) * sh.n + row] : 0.0f;

  float acc[kColsPerBlock];
#pragma unroll
  for (int c = 0; c < kColsPerBlock; ++c) acc[c] = 0.0f;
  float run_max = -INFINITY, run_sum = 0.0f;

  for (int key0 = 0; key0 < sh.m_keys; key0 += kKeysPerTile) {
    __syncthreads();  // previous tile fully consumed
    for (int idx = threadIdx.x; idx < kKeysPerTile * d; idx += kRowsPerBlock) {
      const int j = key0 + idx / d;
      k_s[idx] = j < sh.m_keys ? k[static_cast<size_t>(j) * d + idx % d] : 0.0f;
    }
    if (WithX) {
      for (int idx = threadIdx.x; idx < kKeysPerTile * kColsPerBlock; idx += kRowsPerBlock) {
        const int j = key0 + idx / kColsPerBlock, c = x_col0 + idx % kColsPerBlock;
        x_s[idx] = (j < sh.m_keys && c < sh.width) ? x[static_cast<size_t>(j) * sh.width + c] : 0.0f;
      }
    }
    __syncthreads();

    float s[kKeysPerTile];
#pragma unroll
    for (int j = 0; j < kKeysPerTile; ++j) s[j] = 0.0f;
    for (int c = 0; c < d; ++c) {
      const float qc = q_row[c];
#pragma unroll
      for (int j = 0; j < kKeysPerTile; ++j) s[j] = fmaf(qc, k_s[j * d + c], s[j]);
    }
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeysPerTile; ++j) {
      const int key = key0 + j;
      float v = s[j] * a.scale;
      if (key >= sh.m_keys) v = -INFINITY;
      else if (col_offset) v -= col_offset[key];
      s[j] = v;
      tile_max = fmaxf(tile_max, v);
    }
    if (a.normalize) {
      const float new_max = fmaxf(run_max, tile_max);
      const float shift = new_max == -INFINITY ? 0.0f : new_max;
      const float correction = expf(run_max - shift);
      run_max = new_max;
      float partial = 0.0f;
#pragma unroll
      for (int j = 0; j < kKeysPerTile; ++j) {
        s[j] = expf(s[j] - shift);
        partial += s[j];
      }
      run_sum = run_sum * correction + partial;
      if (WithX) {
#pragma unroll
        for (int c = 0; c < kColsPerBlock; ++c) acc[c] *= correction;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kKeysPerTile; ++j) s[j] = expf(s[j] - row_alpha);
    }
    if (WithX) {
#pragma unroll
      for (int j = 0; j < kKeysPerTile; ++j)
#pragma unroll
        for (int c = 0; c < kColsPerBlock; ++c) acc[c] = fmaf(s[j], x_s[j * kColsPerBlock + c], acc[c]);
    }
  }

  if (!valid_row) return;
  float row_scale = 1.0f;
  if (a.normalize) {
    if (a.output.lse && blockIdx.z == 0)
      a.output.lse[static_cast<size_t>(b) * sh.n + row] = run_sum > 0.0f ? run_max + logf(run_sum) : -INFINITY;
    row_scale = run_sum > 0.0f ? 1.0f / run_sum : 0.0f;
    if (a.row_offset) row_scale *= expf(-row_alpha);
  }
  if (!WithX) return;
  const float* w = a.output.head_weights;
  row_scale *= a.output.factor * (w ? w[head] : 1.0f);
  float* out_row = a.output.out + (static_cast<size_t>(w ? group : b) * sh.n + row) * sh.width;
  const bool accumulate = a.output.accumulate || w != nullptr;
#pragma unroll
  for (int c = 0; c < kColsPerBlock; ++c) {
    if (x_col0 + c >= sh.width) break;
    if (accumulate) atomicAdd(out_row + x_col0 + c, acc[c] * row_scale);
    else out_row[x_col0 + c] = acc[c] * row_scale;
  }
}

}  // namespace

cudaError_t launch_affinity_rows_simt(const float* q, const float* k, const float* x, const float* row_offset,
                                      const float* col_offset, const ProductShape& shape, float scale,
                                      bool normalize, bool with_x, const ProductOutput& output,
                                      cudaStream_t stream) {
  const ProductShape& sh = shape;
  if (sh.d <= 0 || sh.d > kMaxHeadDim || sh.n <= 0 || sh.m_keys <= 0 || sh.groups * sh.heads > 65535 ||
      (with_x && sh.width <= 0) || (!with_x && !normalize))
    return cudaErrorInvalidValue;
  const SimtArgs args{q, k, x, row_offset, col_offset, sh, scale, normalize, output};
  const size_t smem = (static_cast<size_t>(kKeysPerTile) * sh.d + (with_x ? kKeysPerTile * kColsPerBlock : 0)) *
                      sizeof(float);  // ≤ 36 KiB: no opt-in needed
  const dim3 grid((sh.n + kRowsPerBlock - 1) / kRowsPerBlock, sh.groups * sh.heads,
                  with_x ? (sh.width + kColsPerBlock - 1) / kColsPerBlock : 1);
  if (with_x) rows_simt_kernel<true><<<grid, kRowsPerBlock, smem, stream>>>(args);
  else rows_simt_kernel<false><<<grid, kRowsPerBlock, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace spectral_kernels
