// Tensor-core building blocks shared by the 16-bit kernels: mma.sync m16n8k16 with fp32
// accumulation, fragment loads from padded shared memory, cp.async 16-byte copies.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane = 4·group + quad_lane:
//   A (16×16, row-major), 4 regs: {A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}
//   B (16×8, k-major),    2 regs: {B[2t..2t+1][g], B[2t+8..2t+9][g]}
//   C (16×8, fp32),       4 vals: {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}
// so the C fragments of two adjacent n8 score tiles are exactly the A fragment of P for
// the next product (no shuffle through shared memory). Fragments are read from shared
// memory with ldmatrix (rows padded by 8 elements, so its 8-row phases are conflict-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace spectral_kernels {
namespace mma {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> struct Traits;
template <> struct Traits<__half> {
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Traits<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// c += a·b on one 16×8×16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8×8 b16 matrices from shared memory; lane l supplies the address of row l%8 of
// matrix l/8 and receives, of matrix i, the pair in row l/4, columns 2(l%4)..+1 (with
// .trans: column l/4, rows 2(l%4)..+1) in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

// A fragment of the 16×16 block at (row0, col0) of a row-major smem matrix, one ldmatrix:
// matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) = a[0..3].
template <typename T>
__device__ __forceinline__ void ldmatrix_a(uint32_t a[4], const T* s, int ld, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = col0 + (lane >> 4) * 8;
  ldmatrix_x4(a, s + row * ld + col);
}

// B fragments of two adjacent n8 tiles (n = rows row0.. and row0+8.. of a row-major smem
// matrix K, k = columns col0..col0+15): the B of S = Q·Kᵀ. b[j] is tile j's fragment.
template <typename T>
__device__ __forceinline__ void ldmatrix_b_rows(uint32_t b[2][2], const T* s, int ld, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + (lane >> 4) * 8;
  const int col = col0 + ((lane >> 3) & 1) * 8;
  uint32_t r[4];
  ldmatrix_x4(r, s + row * ld + col);
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// B fragments of two adjacent n8 tiles read from a row-major smem matrix X with k = rows
// row0..row0+15 and n = columns col0.. and col0+8..: the B of P·X (transposing load).
template <typename T>
__device__ __forceinline__ void ldmatrix_b_cols(uint32_t b[2][2], const T* s, int ld, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = col0 + (lane >> 4) * 8;
  uint32_t r[4];
  ldmatrix_x4_trans(r, s + row * ld + col);
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// 16-byte global→shared copy; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending)); }

// Copy rows [row0, row0 + Rows) and columns [col0, col0 + Cols) of a row-major global
// matrix (n_rows × n_cols, n_cols a multiple of 8, 16-byte aligned rows) into smem
// [Rows][ld]; out-of-range 8-element chunks are zero-filled (so padding never holds NaN).
template <typename T, int Rows, int Cols, int Threads>
__device__ __forceinline__ void async_tile_load(T* s, int ld, const T* g, int n_rows, int n_cols,
                                                int row0, int col0, int tid) {
  constexpr int kChunksPerRow = Cols / 8;
  for (int idx = tid; idx < Rows * kChunksPerRow; idx += Threads) {
    const int r = idx / kChunksPerRow, c = (idx % kChunksPerRow) * 8;
    const bool valid = (row0 + r < n_rows) && (col0 + c < n_cols);
    const T* src = valid ? g + static_cast<size_t>(row0 + r) * n_cols + col0 + c : g;
    cp_async_16(s + r * ld + c, src, valid);
  }
}

// 2^x on the special-function unit (≈2 ulp); 2^-inf = +0, which masks padded columns.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// out[i] (+)= v; two adjacent floats at once where the hardware has vector atomics.
__device__ __forceinline__ void add_pair(float* out, float v0, float v1, bool both) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (both && (reinterpret_cast<uintptr_t>(out) & 7u) == 0) {
    atomicAdd(reinterpret_cast<float2*>(out), make_float2(v0, v1));
    return;
  }
#endif
  atomicAdd(out, v0);
  if (both) atomicAdd(out + 1, v1);
}

}  // namespace mma
}  // namespace spectral_kernels
