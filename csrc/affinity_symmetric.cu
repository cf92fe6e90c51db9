// One-pass symmetric product on tensor cores: out += factor·½(E + Eᵀ)X with
// E_ij = exp(τ q_i·k_j − a_i − a_j), for fp16/bf16 inputs with fp32 accumulation.
//
// One CTA = 128 rows i (64 for d = 256) of one (group, head) and one ≤MP-wide slice of X.
// For each 64-key tile j it computes the probability tile P = E[i-block, j-tile] once and
// uses it twice:
//   rows:    acc_i += P · X_j            (registers, written once at the end)
//   columns: out_j += Pᵀ · X_i           (Pᵀ staged in shared memory; atomicAdd to fp32)
// When q and k are the same array, S is symmetric and only key tiles at or right of the
// row block are visited: those inside the diagonal block feed the rows only, every other
// tile both directions, and the ½ of ½(E + Eᵀ) cancels (E = Eᵀ). fp32 inputs run two
// SIMT row products instead.
#include <cmath>

#include "launchers.h"
#include "tile_products.cuh"

namespace spectral_kernels {
namespace {

constexpr int kBlockN = 64;  // key columns per tile

// Row warps per CTA (16 rows each): 8 (128 rows) halves the column atomics; d = 256 uses
// 4 so that the double-buffered tiles fit the 163 KiB of shared memory of sm_80.
template <int D>
__host__ __device__ constexpr int row_warps() { return D >= 256 ? 4 : 8; }

struct SymmetricArgs {
  const void* q;
  const void* k;
  const void* x;
  const float* offset;
  ProductShape shape;
  float scale_log2;
  bool same_tensor;
  ProductOutput output;
};

template <int D, int MP, typename T>
constexpr size_t symmetric_smem_bytes() {
  constexpr size_t rows = 16 * row_warps<D>();
  // Q tile, X rows of the Q tile, two K tiles, two X tiles, Pᵀ tile.
  return (rows * (D + 8) + rows * (MP + 8) + 2ull * kBlockN * (D + 8) + 2ull * kBlockN * (MP + 8) +
          static_cast<size_t>(kBlockN) * (rows + 8)) * sizeof(T);
}

template <typename T, int D, int MP>
__global__ void __launch_bounds__(32 * row_warps<D>()) symmetric_kernel(const SymmetricArgs a) {
  constexpr int kWarps = row_warps<D>(), kThreads = 32 * kWarps, kBlockM = 16 * kWarps;
  constexpr int kLdQK = D + 8, kLdX = MP + 8, kLdP = kBlockM + 8;
  constexpr int kScoreTiles = kBlockN / 8, kOutTiles = MP / 8;
  // Column product Pᵀ·X_i (kBlockN × MP): warp w takes 16 key columns and one width slice.
  constexpr int kColGroups = kWarps / 4, kSliceWidth = MP / kColGroups;
  static_assert(kBlockN == 4 * 16 && kSliceWidth % 16 == 0, "column-product warp layout");
  static_assert(kBlockM % kBlockN == 0, "the triangle walk needs whole key tiles per row block");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* xi_s = q_s + kBlockM * kLdQK;
  T* k_s = xi_s + kBlockM * kLdX;
  T* x_s = k_s + 2 * kBlockN * kLdQK;
  T* pt_s = x_s + 2 * kBlockN * kLdX;

  const ProductShape& sh = a.shape;
  const int n = sh.n;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int b = blockIdx.y, head = b % sh.heads, group = b / sh.heads;
  const int row_block = blockIdx.x, row_base = row_block * kBlockM;
  const int x_col0 = blockIdx.z * MP;
  const T* q = static_cast<const T*>(a.q) + static_cast<size_t>(b) * n * sh.d;
  const T* k = static_cast<const T*>(a.k) + static_cast<size_t>(b) * n * sh.d;
  const T* x = static_cast<const T*>(a.x) + static_cast<size_t>(sh.x_heads == 1 ? group : b) * n * sh.width;
  const float* offset = a.offset ? a.offset + static_cast<size_t>(b) * n : nullptr;
  const float* w = a.output.head_weights;
  const float factor = a.output.factor * (w ? w[head] : 1.0f);
  float* out = a.output.out + static_cast<size_t>(w ? group : b) * n * sh.width;

  const int rows[2] = {row_base + 16 * warp + g, row_base + 16 * warp + g + 8};
  float a_row[2];  // a_i in log2 units; rows past the end get +inf so their P row is 0
  for (int h = 0; h < 2; ++h)
    a_row[h] = rows[h] < n ? (offset ? offset[rows[h]] * mma::kLog2e : 0.0f) : INFINITY;

  // With q = k only key tiles at or right of this row block are visited; the ones inside
  // the diagonal block feed the rows only (their transposes are rows of this block too).
  constexpr int kTilesPerBlock = kBlockM / kBlockN;
  const int n_tiles = (n + kBlockN - 1) / kBlockN;
  const int first_tile = a.same_tensor ? row_block * kTilesPerBlock : 0;
  const int first_column_tile = a.same_tensor ? (row_block + 1) * kTilesPerBlock : 0;
  auto load_tile = [&](int tile, int buf) {
    mma::async_tile_load<T, kBlockN, D, kThreads>(k_s + buf * kBlockN * kLdQK, kLdQK, k, n, sh.d, tile * kBlockN,
                                                  0, tid);
    mma::async_tile_load<T, kBlockN, MP, kThreads>(x_s + buf * kBlockN * kLdX, kLdX, x, n, sh.width,
                                                   tile * kBlockN, x_col0, tid);
  };
  mma::async_tile_load<T, kBlockM, D, kThreads>(q_s, kLdQK, q, n, sh.d, row_base, 0, tid);
  mma::async_tile_load<T, kBlockM, MP, kThreads>(xi_s, kLdX, x, n, sh.width, row_base, x_col0, tid);
  load_tile(first_tile, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
  tiles::load_q_fragments<T, D>(qf, q_s, kLdQK, 16 * warp, lane);

  float acc[kOutTiles][4];
#pragma unroll
  for (int i = 0; i < kOutTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  for (int tile = first_tile, step = 0; tile < n_tiles; ++tile, ++step) {
    const int buf = step & 1;
    if (step > 0) {  // the first tile (and Q, X_i) arrived before the loop
      mma::cp_async_wait<0>();
      __syncthreads();
    }
    if (tile + 1 < n_tiles) {  // prefetch the next tile while this one is computed
      load_tile(tile + 1, buf ^ 1);
      mma::cp_async_commit();
    }

    float p[kScoreTiles][4];
    tiles::warp_scores<T, D, kBlockN>(p, qf, k_s + buf * kBlockN * kLdQK, kLdQK, lane);
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = tile * kBlockN + nt * 8 + 2 * t + (e & 1);
        const float a_col = col < n ? (offset ? offset[col] * mma::kLog2e : 0.0f) : INFINITY;
        p[nt][e] = mma::fast_exp2(p[nt][e] * a.scale_log2 - a_row[e >> 1] - a_col);
      }
    }
    tiles::warp_p_times_x<T, kBlockN, MP>(acc, p, x_s + buf * kBlockN * kLdX, kLdX, lane);

    if (tile >= first_column_tile) {
      // Stage Pᵀ (key columns × block rows) for the column product.
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          pt_s[(nt * 8 + 2 * t + (e & 1)) * kLdP + 16 * warp + g + 8 * (e >> 1)] = mma::Traits<T>::from_float(p[nt][e]);
      __syncthreads();
      const int col_warp = warp % 4, slice = warp / 4;
      float col_acc[kSliceWidth / 8][4];
#pragma unroll
      for (int i = 0; i < kSliceWidth / 8; ++i) col_acc[i][0] = col_acc[i][1] = col_acc[i][2] = col_acc[i][3] = 0.0f;
      tiles::warp_smem_times_x<T, kBlockM, kSliceWidth>(col_acc, pt_s, kLdP, 16 * col_warp,
                                                        xi_s + slice * kSliceWidth, kLdX, lane);
      const float col_scale[2] = {factor, factor};
      tiles::warp_write_rows<kSliceWidth>(col_acc, out, n, sh.width, tile * kBlockN + 16 * col_warp,
                                          x_col0 + slice * kSliceWidth, col_scale, true, lane);
    }
    __syncthreads();  // the K/X buffer (next prefetch) and Pᵀ are rewritten next iteration
  }

  const float row_scale[2] = {factor, factor};
  tiles::warp_write_rows<MP>(acc, out, n, sh.width, row_base + 16 * warp, x_col0, row_scale, true, lane);
}

template <typename T, int D, int MP>
cudaError_t launch_symmetric_tc(const SymmetricArgs& args, cudaStream_t stream) {
  constexpr size_t smem = symmetric_smem_bytes<D, MP, T>();
  constexpr int kBlockM = 16 * row_warps<D>();
  auto kernel = symmetric_kernel<T, D, MP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const ProductShape& sh = args.shape;
  const dim3 grid((sh.n + kBlockM - 1) / kBlockM, sh.groups * sh.heads, (sh.width + MP - 1) / MP);
  kernel<<<grid, 32 * row_warps<D>(), smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int MP>
cudaError_t dispatch_head_dim(const SymmetricArgs& args, cudaStream_t stream) {
  const int d = args.shape.d;
  if (d <= 32) return launch_symmetric_tc<T, 32, MP>(args, stream);
  if (d <= 64) return launch_symmetric_tc<T, 64, MP>(args, stream);
  if (d <= 128) return launch_symmetric_tc<T, 128, MP>(args, stream);
  if (d <= kMaxHeadDim) return launch_symmetric_tc<T, 256, MP>(args, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_symmetric(const SymmetricArgs& args, cudaStream_t stream) {
  if (args.shape.width <= 32) return dispatch_head_dim<T, 32>(args, stream);
  return dispatch_head_dim<T, 64>(args, stream);
}

}  // namespace

cudaError_t launch_affinity_symmetric(ElementType dtype, const void* q, const void* k, const void* x,
                                      const float* offset, const ProductShape& shape, float scale, bool same_tensor,
                                      const ProductOutput& output, cudaStream_t stream) {
  const ProductShape& sh = shape;
  if (sh.n != sh.m_keys || sh.n <= 0 || sh.width <= 0 || sh.d <= 0 || sh.d > kMaxHeadDim ||
      sh.groups * sh.heads > 65535)
    return cudaErrorInvalidValue;
  ProductOutput half = output;
  half.accumulate = true;
  if (dtype == ElementType::kFloat32) {
    // E·X, then (unless E is symmetric) Eᵀ·X as the row product with q and k swapped.
    half.factor = same_tensor ? output.factor : 0.5f * output.factor;
    const float* qf = static_cast<const float*>(q);
    const float* kf = static_cast<const float*>(k);
    const float* xf = static_cast<const float*>(x);
    cudaError_t err = launch_affinity_rows_simt(qf, kf, xf, offset, offset, sh, scale, false, true, half, stream);
    if (err != cudaSuccess || same_tensor) return err;
    return launch_affinity_rows_simt(kf, qf, xf, offset, offset, sh, scale, false, true, half, stream);
  }
  if (sh.d % 8 != 0 || sh.width % 8 != 0) return cudaErrorInvalidValue;
  half.factor = same_tensor ? output.factor : 0.5f * output.factor;
  const SymmetricArgs args{q, k, x, offset, sh, scale * mma::kLog2e, same_tensor, half};
  return dtype == ElementType::kFloat16 ? dispatch_symmetric<__half>(args, stream)
                                        : dispatch_symmetric<__nv_bfloat16>(args, stream);
}

}  // namespace spectral_kernels
