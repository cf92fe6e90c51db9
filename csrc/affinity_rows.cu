// Row products on tensor cores (fp16/bf16 inputs, fp32 accumulation):
//   offset form   Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j) X_j
//   softmax form  Y_i = e^{−α_i} Σ_j softmax_j(τ q_i·k_j − β_j) X_j, plus lse_i (online max)
//   lse only      lse_i = log Σ_j exp(τ q_i·k_j − β_j)
// One CTA = 8 warps = 128 query rows of one (group, head) and one ≤MP-wide slice of X's
// columns; each warp keeps its 16 query rows in registers (A fragments) and the CTA
// streams 64-key tiles of K and X through double-buffered shared memory (cp.async,
// 16-byte chunks; fragments read back with ldmatrix). Exponentials are exp2 of log2-domain scores (log2 e is
// folded into the scale and the offsets). fp32 inputs go to the SIMT kernels.
#include <cmath>

#include "launchers.h"
#include "tile_products.cuh"

namespace spectral_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockM = 128;  // 16 rows per warp
constexpr int kBlockN = 64;

struct RowsArgs {
  const void* q;
  const void* k;
  const void* x;
  const float* row_offset;
  const float* col_offset;
  ProductShape shape;
  float scale_log2;
  bool normalize;
  ProductOutput output;
};

template <int D, int MP, bool WithX, typename T>
constexpr size_t rows_smem_bytes() {
  return (static_cast<size_t>(kBlockM) * (D + 8) + 2ull * kBlockN * (D + 8) +
          (WithX ? 2ull * kBlockN * (MP + 8) : 0ull)) * sizeof(T);
}

template <typename T, int D, int MP, bool WithX>
__global__ void __launch_bounds__(kThreads) rows_kernel(const RowsArgs a) {
  constexpr int kLdQK = D + 8, kLdX = MP + 8;  // +8 elements: conflict-free fragment loads
  constexpr int kScoreTiles = kBlockN / 8, kOutTiles = MP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + kBlockM * kLdQK;
  T* x_s = k_s + 2 * kBlockN * kLdQK;

  const ProductShape& sh = a.shape;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y, head = b % sh.heads, group = b / sh.heads;
  const int row_base = blockIdx.x * kBlockM;
  const int x_col0 = blockIdx.z * MP;
  const T* q = static_cast<const T*>(a.q) + static_cast<size_t>(b) * sh.n * sh.d;
  const T* k = static_cast<const T*>(a.k) + static_cast<size_t>(b) * sh.m_keys * sh.d;
  const T* x = WithX ? static_cast<const T*>(a.x) +
                           static_cast<size_t>(sh.x_heads == 1 ? group : b) * sh.m_keys * sh.width
                     : nullptr;
  const float* col_offset = a.col_offset ? a.col_offset + static_cast<size_t>(b) * sh.m_keys : nullptr;
  const int rows[2] = {row_base + 16 * warp + g, row_base + 16 * warp + g + 8};

  // Offset form: α_i in log2 units, subtracted inside the exponent.
  float alpha2[2] = {0.0f, 0.0f};
  if (a.row_offset && !a.normalize) {
    for (int h = 0; h < 2; ++h)
      if (rows[h] < sh.n) alpha2[h] = a.row_offset[static_cast<size_t>(b) * sh.n + rows[h]] * mma::kLog2e;
  }

  const int n_tiles = (sh.m_keys + kBlockN - 1) / kBlockN;
  auto load_tile = [&](int tile, int buf) {
    mma::async_tile_load<T, kBlockN, D, kThreads>(k_s + buf * kBlockN * kLdQK, kLdQK, k, sh.m_keys, sh.d,
                                                  tile * kBlockN, 0, tid);
    if (WithX)
      mma::async_tile_load<T, kBlockN, MP, kThreads>(x_s + buf * kBlockN * kLdX, kLdX, x, sh.m_keys,
                                                     sh.width, tile * kBlockN, x_col0, tid);
  };
  mma::async_tile_load<T, kBlockM, D, kThreads>(q_s, kLdQK, q, sh.n, sh.d, row_base, 0, tid);
  load_tile(0, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
  tiles::load_q_fragments<T, D>(qf, q_s, kLdQK, 16 * warp, lane);

  float acc[kOutTiles][4];
#pragma unroll
  for (int i = 0; i < kOutTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units (softmax form)
  float row_sum[2] = {0.0f, 0.0f};            // this thread's share; quad-summed at the end

  for (int tile = 0; tile < n_tiles; ++tile) {
    if (tile > 0) {  // tile 0 (and Q) arrived before the loop
      mma::cp_async_wait<0>();
      __syncthreads();
    }
    if (tile + 1 < n_tiles) {  // prefetch the next tile while this one is computed
      load_tile(tile + 1, (tile + 1) & 1);
      mma::cp_async_commit();
    }

    float s[kScoreTiles][4];
    tiles::warp_scores<T, D, kBlockN>(s, qf, k_s + (tile & 1) * kBlockN * kLdQK, kLdQK, lane);

    // log2-domain scores minus column offsets; columns past the end become -inf.
    const bool plain_tile = col_offset == nullptr && (tile + 1) * kBlockN <= sh.m_keys;
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * a.scale_log2;
        if (!plain_tile) {
          const int col = tile * kBlockN + nt * 8 + 2 * t + (e & 1);
          if (col >= sh.m_keys) v = -INFINITY;
          else if (col_offset) v -= col_offset[col] * mma::kLog2e;
        }
        s[nt][e] = v;
      }
    }

    if (a.normalize) {
      float correction[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kScoreTiles; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        const float new_max = fmaxf(row_max[h], mma::quad_max(tile_max));
        const float shift = new_max == -INFINITY ? 0.0f : new_max;  // nothing seen yet: no -inf − -inf
        correction[h] = mma::fast_exp2(row_max[h] - shift);
        row_max[h] = new_max;
        float partial = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kScoreTiles; ++nt) {
          s[nt][2 * h] = mma::fast_exp2(s[nt][2 * h] - shift);
          s[nt][2 * h + 1] = mma::fast_exp2(s[nt][2 * h + 1] - shift);
          partial += s[nt][2 * h] + s[nt][2 * h + 1];
        }
        row_sum[h] = row_sum[h] * correction[h] + partial;
      }
      if constexpr (WithX) {
#pragma unroll
        for (int i = 0; i < kOutTiles; ++i) {
          acc[i][0] *= correction[0];
          acc[i][1] *= correction[0];
          acc[i][2] *= correction[1];
          acc[i][3] *= correction[1];
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = mma::fast_exp2(s[nt][e] - alpha2[e >> 1]);
    }

    if constexpr (WithX)
      tiles::warp_p_times_x<T, kBlockN, MP>(acc, s, x_s + (tile & 1) * kBlockN * kLdX, kLdX, lane);
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  float row_scale[2] = {1.0f, 1.0f};
  if (a.normalize) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float total = mma::quad_sum(row_sum[h]);
      const bool valid = rows[h] < sh.n;
      if (valid && a.output.lse && blockIdx.z == 0 && t == 0)
        a.output.lse[static_cast<size_t>(b) * sh.n + rows[h]] =
            total > 0.0f ? (row_max[h] + log2f(total)) * mma::kLn2 : -INFINITY;
      row_scale[h] = total > 0.0f ? 1.0f / total : 0.0f;
      if (valid && a.row_offset) row_scale[h] *= expf(-a.row_offset[static_cast<size_t>(b) * sh.n + rows[h]]);
    }
  }
  if constexpr (WithX) {
    const float* w = a.output.head_weights;
    const float factor = a.output.factor * (w ? w[head] : 1.0f);
    row_scale[0] *= factor;
    row_scale[1] *= factor;
    float* out = a.output.out + static_cast<size_t>(w ? group : b) * sh.n * sh.width;
    tiles::warp_write_rows<MP>(acc, out, sh.n, sh.width, row_base + 16 * warp, x_col0, row_scale,
                               a.output.accumulate || w != nullptr, lane);
  }
}

template <typename T, int D, int MP, bool WithX>
cudaError_t launch_rows_tc(const RowsArgs& args, cudaStream_t stream) {
  constexpr size_t smem = rows_smem_bytes<D, MP, WithX, T>();
  auto kernel = rows_kernel<T, D, MP, WithX>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const ProductShape& sh = args.shape;
  const dim3 grid((sh.n + kBlockM - 1) / kBlockM, sh.groups * sh.heads, WithX ? (sh.width + MP - 1) / MP : 1);
  kernel<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int MP, bool WithX>
cudaError_t dispatch_head_dim(const RowsArgs& args, cudaStream_t stream) {
  const int d = args.shape.d;
  if (d <= 32) return launch_rows_tc<T, 32, MP, WithX>(args, stream);
  if (d <= 64) return launch_rows_tc<T, 64, MP, WithX>(args, stream);
  if (d <= 128) return launch_rows_tc<T, 128, MP, WithX>(args, stream);
  if (d <= kMaxHeadDim) return launch_rows_tc<T, 256, MP, WithX>(args, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_rows(const RowsArgs& args, bool with_x, cudaStream_t stream) {
  if (!with_x) return dispatch_head_dim<T, 8, false>(args, stream);
  if (args.shape.width <= 32) return dispatch_head_dim<T, 32, true>(args, stream);
  return dispatch_head_dim<T, 64, true>(args, stream);  // wider X: one CTA column per 64
}

bool valid_16bit_shape(const ProductShape& sh) {
  return sh.d > 0 && sh.d <= kMaxHeadDim && sh.d % 8 == 0 && sh.width % 8 == 0 && sh.n > 0 && sh.m_keys > 0 &&
         sh.groups * sh.heads <= 65535;
}

}  // namespace

cudaError_t launch_affinity_rows(ElementType dtype, const void* q, const void* k, const void* x,
                                 const float* row_offset, const float* col_offset, const ProductShape& shape,
                                 float scale, bool normalize, const ProductOutput& output, cudaStream_t stream) {
  if (dtype == ElementType::kFloat32)
    return launch_affinity_rows_simt(static_cast<const float*>(q), static_cast<const float*>(k),
                                     static_cast<const float*>(x), row_offset, col_offset, shape, scale, normalize,
                                     true, output, stream);
  if (!valid_16bit_shape(shape) || shape.width <= 0) return cudaErrorInvalidValue;
  const RowsArgs args{q, k, x, row_offset, col_offset, shape, scale * mma::kLog2e, normalize, output};
  return dtype == ElementType::kFloat16 ? dispatch_rows<__half>(args, true, stream)
                                        : dispatch_rows<__nv_bfloat16>(args, true, stream);
}

cudaError_t launch_affinity_logsumexp(ElementType dtype, const void* q, const void* k, const float* col_offset,
                                      const ProductShape& shape, float scale, float* lse, cudaStream_t stream) {
  ProductOutput output;
  output.lse = lse;
  if (dtype == ElementType::kFloat32)
    return launch_affinity_rows_simt(static_cast<const float*>(q), static_cast<const float*>(k), nullptr, nullptr,
                                     col_offset, shape, scale, true, false, output, stream);
  ProductShape sh = shape;
  sh.width = 0;
  if (!valid_16bit_shape(sh)) return cudaErrorInvalidValue;
  const RowsArgs args{q, k, nullptr, nullptr, col_offset, sh, scale * mma::kLog2e, true, output};
  return dtype == ElementType::kFloat16 ? dispatch_rows<__half>(args, false, stream)
                                        : dispatch_rows<__nv_bfloat16>(args, false, stream);
}

}  // namespace spectral_kernels
