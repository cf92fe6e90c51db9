// Plain C++ interface between the torch binding (binding.cpp) and the CUDA kernels.
//
// No torch headers here: every .cu file that implements these compiles with plain nvcc.
// All pointers are device pointers to contiguous row-major arrays in the canonical layout
// of spectral_kernels/ops/_layout.py, with the leading (G, H) dims flattened to B = G·H:
//
//   q (B, N, d), k (B, M, d)            element type `dtype`
//   x (G·x_heads, M, width)             x_heads is 1 (one X shared by the heads) or H
//   row_offset (B, N), col_offset (B, M) float32 or nullptr
//   head_weights (H,)                   float32 or nullptr
//   out                                 float32; (B, N, width) without head weights,
//                                       (G, N, width) with them
//   lse (B, N)                          float32, written only when normalize is set
//
// Every launcher returns the cudaError_t of its launches (cudaGetLastError after each).
#pragma once

#include <cuda_runtime.h>

namespace spectral_kernels {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest feature dimension the kernels accept (q·k is templated on d padded to 32..256).
constexpr int kMaxHeadDim = 256;

struct ProductShape {
  int groups = 0;   // G
  int heads = 0;    // H
  int n = 0;        // query tokens (rows)
  int m_keys = 0;   // key tokens (columns)
  int d = 0;        // feature dimension (a multiple of 8 for 16-bit inputs)
  int width = 0;    // columns of x (a multiple of 8 for 16-bit inputs)
  int x_heads = 1;  // 1 or heads
};

// Where results go. With `accumulate` (forced when head_weights is given) the kernels
// atomically add factor·w_h·Y into `out`, which the caller must zero first.
struct ProductOutput {
  float* out = nullptr;
  float* lse = nullptr;
  const float* head_weights = nullptr;
  float factor = 1.0f;
  bool accumulate = false;
};

// Y_i = Σ_j exp(τ q_i·k_j − α_i − β_j) X_j   (normalize = false), or
// Y_i = e^{−α_i} Σ_j softmax_j(τ q_i·k_j − β_j) X_j and lse_i (normalize = true).
cudaError_t launch_affinity_rows(ElementType dtype, const void* q, const void* k, const void* x,
                                 const float* row_offset, const float* col_offset,
                                 const ProductShape& shape, float scale, bool normalize,
                                 const ProductOutput& output, cudaStream_t stream);

// lse_i = log Σ_j exp(τ q_i·k_j − β_j), written to lse (B, N).
cudaError_t launch_affinity_logsumexp(ElementType dtype, const void* q, const void* k,
                                      const float* col_offset, const ProductShape& shape,
                                      float scale, float* lse, cudaStream_t stream);

// out += factor·½(E + Eᵀ)X with E_ij = exp(τ q_i·k_j − a_i − a_j) (n == m_keys), in one
// pass over the score tiles; when `same_tensor` (q and k are one array) only the tiles
// on or above the diagonal are visited. `out` must be zeroed by the caller.
cudaError_t launch_affinity_symmetric(ElementType dtype, const void* q, const void* k,
                                      const void* x, const float* offset,
                                      const ProductShape& shape, float scale, bool same_tensor,
                                      const ProductOutput& output, cudaStream_t stream);

// fp32 inputs: SIMT kernels (exact fp32 dot products; accuracy over speed).
cudaError_t launch_affinity_rows_simt(const float* q, const float* k, const float* x,
                                      const float* row_offset, const float* col_offset,
                                      const ProductShape& shape, float scale, bool normalize,
                                      bool with_x, const ProductOutput& output,
                                      cudaStream_t stream);

}  // namespace spectral_kernels
