// Warp-level tile products of the 16-bit kernels. Each warp owns 16 rows of the block's
// score tile; fragments follow the layout described in mma_fragments.cuh.
#pragma once

#include "mma_fragments.cuh"

namespace spectral_kernels {
namespace tiles {

// The warp's 16 query rows as A fragments, kept in registers for the whole key loop.
template <typename T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t qf[D / 16][4], const T* q_s, int ld, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) mma::ldmatrix_a(qf[kk], q_s, ld, row0, kk * 16, lane);
}

// s (16 × BlockN, as BlockN/8 C fragments) = Q_warp · K[:BlockN, :D]ᵀ, K row-major in
// shared memory with leading dimension ld.
template <typename T, int D, int BlockN>
__device__ __forceinline__ void warp_scores(float s[BlockN / 8][4], const uint32_t qf[D / 16][4], const T* k_s,
                                            int ld, int lane) {
#pragma unroll
  for (int nt = 0; nt < BlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < BlockN / 16; ++np) {
      uint32_t b[2][2];
      mma::ldmatrix_b_rows(b, k_s, ld, np * 16, kk * 16, lane);
      mma::mma_16816<T>(s[2 * np], qf[kk], b[0]);
      mma::mma_16816<T>(s[2 * np + 1], qf[kk], b[1]);
    }
  }
}

// acc (16 × Width) += P (16 × BlockN, fp32 C fragments, rounded to T) · X[:BlockN, :Width],
// X row-major in shared memory.
template <typename T, int BlockN, int Width>
__device__ __forceinline__ void warp_p_times_x(float acc[Width / 8][4], const float p[BlockN / 8][4],
                                               const T* x_s, int ldx, int lane) {
#pragma unroll
  for (int kk = 0; kk < BlockN / 16; ++kk) {
    uint32_t a[4];
    a[0] = mma::Traits<T>::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = mma::Traits<T>::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = mma::Traits<T>::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = mma::Traits<T>::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int xp = 0; xp < Width / 16; ++xp) {
      uint32_t b[2][2];
      mma::ldmatrix_b_cols(b, x_s, ldx, kk * 16, xp * 16, lane);
      mma::mma_16816<T>(acc[2 * xp], a, b[0]);
      mma::mma_16816<T>(acc[2 * xp + 1], a, b[1]);
    }
  }
}

// acc (16 × Width) += A[row0 : row0+16, :K] · X[:K, :Width] with A (here Pᵀ) and X
// row-major in shared memory.
template <typename T, int K, int Width>
__device__ __forceinline__ void warp_smem_times_x(float acc[Width / 8][4], const T* a_s, int lda, int row0,
                                                  const T* x_s, int ldx, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    mma::ldmatrix_a(a, a_s, lda, row0, kk * 16, lane);
#pragma unroll
    for (int xp = 0; xp < Width / 16; ++xp) {
      uint32_t b[2][2];
      mma::ldmatrix_b_cols(b, x_s, ldx, kk * 16, xp * 16, lane);
      mma::mma_16816<T>(acc[2 * xp], a, b[0]);
      mma::mma_16816<T>(acc[2 * xp + 1], a, b[1]);
    }
  }
}

// Where a 16 × Width fp32 C-fragment block of rows [row0, row0+16) goes: stored or
// atomically added into out (n_rows × width, row-major), with one multiplier per row
// (row_scale[0] for row g, row_scale[1] for row g+8).
template <int Width>
__device__ __forceinline__ void warp_write_rows(const float acc[Width / 8][4], float* out, int n_rows,
                                                int width, int row0, int col0, const float row_scale[2],
                                                bool accumulate, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    if (row >= n_rows) continue;
    float* out_row = out + static_cast<size_t>(row) * width;
#pragma unroll
    for (int xt = 0; xt < Width / 8; ++xt) {
      const int col = col0 + xt * 8 + 2 * t;  // width is a multiple of 8: col < width ⇒ col+1 < width
      if (col >= width) continue;
      const float v0 = acc[xt][2 * half] * row_scale[half];
      const float v1 = acc[xt][2 * half + 1] * row_scale[half];
      if (accumulate) {
        mma::add_pair(out_row + col, v0, v1, true);
      } else {
        *reinterpret_cast<float2*>(out_row + col) = make_float2(v0, v1);
      }
    }
  }
}

}  // namespace tiles
}  // namespace spectral_kernels
