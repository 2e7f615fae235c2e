// Warp-level building blocks for sm80+: cp.async copies, ldmatrix loads and
// the m16n8k16 tensor-core product, with the fragment layouts spelled out.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row):  a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                    a[2] = A[g][2t+8..+9]    a[3] = A[g+8][2t+8..+9]
//   B (16x8, col):   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..+9][g]
//   C (16x8, fp32):  c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]
// ldmatrix.x4 loads four 8x8 matrices; lanes 8i..8i+7 give the row addresses
// of matrix i, and lane l receives, of matrix i, row l/4, columns 2(l%4)..+1
// in register i (with .trans: rows 2(l%4)..+1 of column l/4).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#ifdef ATTNFAST_CUDA_EMULATION
// Host build for the tests: fibers stand in for threads and the primitives
// below are computed from their documented fragment layouts (tools/emu.h).
#include "tools/emu.h"
#endif

namespace attnfast {
namespace cuda {

#ifndef ATTNFAST_CUDA_EMULATION
// c += a * b on tensor cores, fp32 accumulation.
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// Two 8x8 matrices, transposed; lanes 0-15 give the row addresses.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t* r, const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem_row)));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 2^x on the special-function unit, one instruction (ex2.approx.ftz: relative error below
// 2^-22, results below 2^-126 flushed to 0; -inf -> 0, NaN -> NaN): what exp2f becomes under
// --use_fast_math, without making the rest of the kernel fast-math.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#else

inline float fast_exp2(float x) { return std::exp2(x); }  // the emulator: the exact 2^x

#endif  // ATTNFAST_CUDA_EMULATION

template <typename T>
struct ElemOps;

template <>
struct ElemOps<__nv_bfloat16> {
  // Two floats -> one 32-bit register of two bf16 (lo = first).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    mma_bf16(c, a, b);
  }
};

template <>
struct ElemOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
    mma_f16(c, a, b);
  }
};

// c[0] += a b[0..1] and c[1] += a b[2..3]: a 16x16 (k16) product as two
// m16n8k16, with the B fragments of two n8 tiles as one ldmatrix.x4 loads them.
template <typename T>
__device__ __forceinline__ void mma_n16(float (*c)[4], const uint32_t* a, const uint32_t* b) {
  ElemOps<T>::mma(c[0], a, b);
  ElemOps<T>::mma(c[1], a, b + 2);
}

// The A fragment (16x16, row) of the accumulators of two n8 tiles c[0], c[1]
// side by side, rounded to T: each accumulator is one half of the A layout, so
// a product's fp32 result feeds the next product without shared memory.
template <typename T>
__device__ __forceinline__ void acc_to_a(const float (*c)[4], uint32_t* a) {
  a[0] = ElemOps<T>::pack(c[0][0], c[0][1]);
  a[1] = ElemOps<T>::pack(c[0][2], c[0][3]);
  a[2] = ElemOps<T>::pack(c[1][0], c[1][1]);
  a[3] = ElemOps<T>::pack(c[1][2], c[1][3]);
}

// Zeroes n8-tile accumulators (N tiles of 4 fp32 values per thread, the C layout above).
template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
}

// max that propagates NaN (fmaxf drops it): a NaN score must make its row NaN,
// not look like a row with no visible key.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float quad_max(float x) {
  x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return nan_max(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Copy a (rows x D) tile of 16-bit elements, rows [row0, row0 + ROWS) of a
// row-major global operand (row stride `ld` elements), into shared memory with
// row stride D + kPad; rows >= n_rows are zero-filled.
template <int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile_async(void* smem, const void* gmem, int64_t ld, int row0,
                                                int n_rows, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPad = 8;
  constexpr int kTotal = ROWS * kChunks;
  const uint16_t* g = static_cast<const uint16_t*>(gmem);
  uint16_t* s = static_cast<uint16_t*>(smem);
#pragma unroll
  for (int i = 0; i < (kTotal + NTHREADS - 1) / NTHREADS; ++i) {
    const int idx = i * NTHREADS + tid;
    if (kTotal % NTHREADS != 0 && idx >= kTotal) break;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = row0 + r;
    const bool valid = row < n_rows;
    // An invalid row reads nothing; its address is clamped to the first row anyway.
    const uint16_t* src = g + (valid ? static_cast<int64_t>(row) * ld : 0) + c * 8;
    cp_async_16(s + r * (D + kPad) + c * 8, src, valid);
  }
}

}  // namespace cuda
}  // namespace attnfast
