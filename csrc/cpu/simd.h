// SIMD building blocks of the CPU kernels, written with GCC vector extensions
// so that one source compiles to SSE2, AVX2 or AVX-512 depending on the
// translation unit's target (ATTNFAST_VEC_BYTES = 16, 32 or 64; isa_build.h).
#pragma once
#include <cstdint>
#include <cstring>

#ifndef ATTNFAST_VEC_BYTES
#error "define ATTNFAST_VEC_BYTES (16, 32 or 64) before including simd.h"
#endif

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// Internal buffers pad their leading dimension to a multiple of kPad elements
// so the micro-kernel can always write whole vectors (kPad >= its widest tile).
constexpr int64_t kPad = 32;
inline int64_t pad_up(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

template <typename A>
struct Vec {
  static constexpr int kWidth = ATTNFAST_VEC_BYTES / static_cast<int>(sizeof(A));
  // Element-aligned vector: loads and stores through it may be unaligned.
  typedef A type __attribute__((vector_size(ATTNFAST_VEC_BYTES), aligned(sizeof(A))));
};

// Broadcast.  (V{} + x is not a plain broadcast: x + 0.0 differs from x for
// x = -0.0, so the compiler must keep the add; x - 0.0 is exact.)
template <typename V, typename A>
inline V splat(A x) {
  return x - V{};
}

// Register tile: kMR rows x kNV vectors.  6 x 2 uses 12 accumulators, 2 B
// vectors and 1 broadcast: 15 of the 16 registers of SSE/AVX2.
constexpr int kMR = 6;
constexpr int kNV = 2;
// Products are summed KC at a time in registers and only then added to C:
// a plain running sum over the whole head dim had twice the rounding error
// of torch's matmul (measured; the parity rule sees it in every gradient).
// Reductions over the head dim (S = Q K^T, dP = dO V^T) use 16: with 32 a
// float32 dV broke the parity rule in 1 of 40 cases with Lq = 1, E = 59.
// Reductions over keys or queries (P V, P^T dO, dS K, dS^T Q) use 32, which
// saves half of the C load-add-store epilogues (+5-10% forward).
constexpr int64_t kKCHead = 16;
constexpr int64_t kKCSeq = 32;

// C[r][0:kNV*W] = scale * sum_{e<d} a[r][e] * b[e][0:kNV*W] for r < MR, or,
// when `alpha` is given, C[r] = alpha[r] * C[r] + sum (the online-softmax
// rescale of the output accumulator, fused into the product's epilogue).
template <typename A, int MR, int64_t kKC>
inline void micro_tile(const A* __restrict a, int64_t lda, const A* __restrict b, int64_t ldb, int64_t d,
                       A scale, const A* __restrict alpha, A* __restrict c, int64_t ldc) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::kWidth;
  if (d == 0) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNV; ++v) {
        V* cp = reinterpret_cast<V*>(c + r * ldc + v * W);
        *cp = alpha != nullptr ? *cp * alpha[r] : V{};
      }
    return;
  }
  for (int64_t e0 = 0; e0 < d; e0 += kKC) {
    const int64_t e1 = e0 + kKC < d ? e0 + kKC : d;
    V t[MR][kNV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNV; ++v) t[r][v] = V{};
    for (int64_t e = e0; e < e1; ++e) {
      V bv[kNV];
      for (int v = 0; v < kNV; ++v) bv[v] = *reinterpret_cast<const V*>(b + e * ldb + v * W);
      for (int r = 0; r < MR; ++r) {
        const V av = splat<V>(a[r * lda + e]);
        for (int v = 0; v < kNV; ++v) t[r][v] += av * bv[v];
      }
    }
    const bool last = e1 >= d;
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNV; ++v) {
        V* cp = reinterpret_cast<V*>(c + r * ldc + v * W);
        V s;
        if (alpha != nullptr) {
          s = e0 == 0 ? *cp * alpha[r] + t[r][v] : *cp + t[r][v];
        } else {
          s = e0 == 0 ? t[r][v] : *cp + t[r][v];
          if (last) s *= scale;
        }
        *cp = s;
      }
  }
}

// c[i][0:n] = scale * sum_{e<d} a[i][e] * b[e][0:n]  for i < m, or with
// `alpha`: c[i][0:n] = alpha[i] * c[i][0:n] + sum (scale ignored).
//   a: (m, d), row stride lda.  b: (d, n), row stride ldb.  c: row stride ldc.
// Columns are computed in whole register tiles: b must be readable and c
// writable up to pad_up(n) columns (internal buffers are padded so).
template <int64_t kKC, typename A>
void matmul_tile(const A* __restrict a, int64_t lda, int64_t m, int64_t d, const A* __restrict b,
                 int64_t ldb, int64_t n, A scale, A* __restrict c, int64_t ldc,
                 const A* __restrict alpha = nullptr) {
  constexpr int64_t NR = kNV * Vec<A>::kWidth;
  for (int64_t j = 0; j < n; j += NR) {
    int64_t i = 0;
    for (; i + kMR <= m; i += kMR)
      micro_tile<A, kMR, kKC>(a + i * lda, lda, b + j, ldb, d, scale, alpha ? alpha + i : nullptr, c + i * ldc + j, ldc);
    const A* ai = a + i * lda;
    const A* al = alpha ? alpha + i : nullptr;
    A* ci = c + i * ldc + j;
    switch (m - i) {
      case 5: micro_tile<A, 5, kKC>(ai, lda, b + j, ldb, d, scale, al, ci, ldc); break;
      case 4: micro_tile<A, 4, kKC>(ai, lda, b + j, ldb, d, scale, al, ci, ldc); break;
      case 3: micro_tile<A, 3, kKC>(ai, lda, b + j, ldb, d, scale, al, ci, ldc); break;
      case 2: micro_tile<A, 2, kKC>(ai, lda, b + j, ldb, d, scale, al, ci, ldc); break;
      case 1: micro_tile<A, 1, kKC>(ai, lda, b + j, ldb, d, scale, al, ci, ldc); break;
      default: break;
    }
  }
}

// exp(x) on float vectors, branch-free.  Cody-Waite range reduction
// x = n ln2 + r and a degree-6 polynomial (Cephes expf coefficients): about
// 1 ulp, like the Sleef u10 exp torch uses.  Returns exactly 0 for
// x < -87.3 (incl. -inf), where exp is at most subnormal.
template <typename V>
inline V exp_vec(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.3f, hi = V{} + 88.7f;
  const V xc = x < lo ? lo : (x > hi ? hi : x);
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? V{} : y * scale;
}

// row[j] = exp(row[j] - m) for the m given (the forward's new row max; 0 for
// the backward's rows of s - lse), returns the row sum.  Works in whole
// vectors: row is read and written up to a whole number of vectors past n, and
// the sum covers those lanes (a caller that uses it sets them to -inf first).
inline float softmax_row_f32(float* row, int64_t n, float m) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  V sum = V{};
  for (int64_t j = 0; j < n; j += W) {
    V* pv = reinterpret_cast<V*>(row + j);
    const V e = exp_vec(*pv - m);
    *pv = e;
    sum += e;
  }
  float s = 0.f;
  for (int l = 0; l < W; ++l) s += sum[l];
  return s;
}

// Row max that propagates NaN: a NaN score (a NaN or inf in q or k) must make
// its row NaN, not look like a row with no visible key (which gives 0).
inline float rowmax_f32(const float* row, int64_t n) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  V m = V{} - __builtin_inff();
  for (int64_t j = 0; j < n; j += W) {
    const V x = *reinterpret_cast<const V*>(row + j);
    m = (x > m) | (x != x) ? x : m;
  }
  float r = -__builtin_inff();
  for (int l = 0; l < W; ++l) r = (m[l] > r || m[l] != m[l]) ? m[l] : r;
  return r;
}

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
