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

// With 32 vector registers (AVX-512) the C tile stays in registers for the
// whole reduction: each KC chunk's sum is added to it there (the same
// additions, in the same order, as the load-add-store epilogue of the
// 16-register ISAs, which have no room for a second set of accumulators).
constexpr bool kCInRegisters = ATTNFAST_VEC_BYTES >= 64;

// What a product does with its sum S = sum_e a[r][e] * b[e][:] (KC chunks):
//   kStore:      C = scale * S
//   kRescale:    C = alpha[r] * C + S   (the online-softmax rescale of the
//                output accumulator, fused into the product's epilogue)
//   kAccumulate: C = C + scale * S      (gradients summed over tiles; the same
//                additions as a separate C += tile pass, without the tile)
enum class Epi { kStore, kRescale, kAccumulate };

// One MR x (NV * W) register tile of C.  a is (MR, d) with row stride lda, or,
// with kTransA, given transposed: element (r, e) at a[e * lda + r] (P^T and
// dS^T in the backward are read from P and dS so, with no transpose pass).
// The k loop is unrolled by 4: one product step per loop iteration left the
// AVX2 score product at 54% of the FMA peak, unrolled it runs at 88%
// (NOTES.md, v10).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // acc: set by the first chunk (d > 0)
// b may hold a narrower type B than A (bfloat16 for float): its vectors are
// widened as they are loaded (load_vec), with no converted copy of b.
// (memcpy: a vector type passed as a template argument loses its element
// alignment attribute, and a dereference would then assume a whole vector's.)
template <typename V, typename X>
inline V load_vec(const X* p) {  // W values of A's own type
  V x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename A, int MR, int64_t kKC, Epi kEpi, bool kTransA, int NV = kNV, typename B = A>
inline void micro_tile(const A* __restrict a, int64_t lda, const B* __restrict b, int64_t ldb, int64_t d,
                       A scale, const A* __restrict alpha, A* __restrict c, int64_t ldc) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::kWidth;
  // The sum lives in registers (acc) across chunks when there is room for
  // two tiles (AVX-512), and always for kAccumulate (C holds the old value).
  constexpr bool kAcc = kCInRegisters || kEpi == Epi::kAccumulate;
  if (d == 0) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        V* cp = reinterpret_cast<V*>(c + r * ldc + v * W);
        if constexpr (kEpi == Epi::kStore) *cp = V{};
        else if constexpr (kEpi == Epi::kRescale) *cp = *cp * alpha[r];
      }
    return;
  }
  V acc[MR][NV];  // used only when kAcc
  for (int64_t e0 = 0; e0 < d; e0 += kKC) {
    const int64_t e1 = e0 + kKC < d ? e0 + kKC : d;
    V t[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) t[r][v] = V{};
#pragma GCC unroll 4
    for (int64_t e = e0; e < e1; ++e) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = load_vec<V>(b + e * ldb + v * W);
      for (int r = 0; r < MR; ++r) {
        const V av = splat<V>(kTransA ? a[e * lda + r] : a[r * lda + e]);
        for (int v = 0; v < NV; ++v) t[r][v] += av * bv[v];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        V* cp = reinterpret_cast<V*>(c + r * ldc + v * W);
        V s;
        if (e0 == 0) s = kEpi == Epi::kRescale ? *cp * alpha[r] + t[r][v] : t[r][v];
        else if constexpr (kAcc) s = acc[r][v] + t[r][v];
        else s = *cp + t[r][v];
        if constexpr (kAcc) acc[r][v] = s;
        else *cp = e1 >= d && kEpi == Epi::kStore ? s * scale : s;
      }
  }
  if constexpr (kAcc) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        V* cp = reinterpret_cast<V*>(c + r * ldc + v * W);
        if constexpr (kEpi == Epi::kStore) *cp = acc[r][v] * scale;
        else if constexpr (kEpi == Epi::kRescale) *cp = acc[r][v];
        else *cp = *cp + acc[r][v] * scale;
      }
  }
}
#pragma GCC diagnostic pop

// c[i][0:n] (op)= sum_{e<d} a[i][e] * b[e][0:n] for i < m, op as kEpi says
// (`alpha` is used by kRescale only, `scale` by the others).
//   a: (m, d), row stride lda (kTransA: given as (d, m), row stride lda).
//   b: (d, n), row stride ldb.  c: row stride ldc.
// Columns are computed in whole register tiles: b must be readable and c
// writable up to pad_up(n) columns (internal buffers are padded so).  When
// all of b fits in L1 (kL1Panel) row tiles are the outer loop (a tile's rows
// of a and all of b stay in L1); a larger b is walked one column strip at a
// time, which then stays in L1 while the rows of a stream past it.
constexpr int64_t kL1Panel = 32 * 1024;
template <int64_t kKC, Epi kEpi = Epi::kStore, bool kTransA = false, typename A>
void matmul_tile(const A* __restrict a, int64_t lda, int64_t m, int64_t d, const A* __restrict b,
                 int64_t ldb, int64_t n, A scale, A* __restrict c, int64_t ldc,
                 const A* __restrict alpha = nullptr) {
  constexpr int64_t NR = kNV * Vec<A>::kWidth;
  const int64_t mf = m / kMR * kMR;
  auto rows = [&](int64_t i) { return kTransA ? a + i : a + i * lda; };
  auto al = [&](int64_t i) { return kEpi == Epi::kRescale ? alpha + i : nullptr; };
  if (d * n * static_cast<int64_t>(sizeof(A)) <= kL1Panel) {
    for (int64_t i = 0; i < mf; i += kMR)
      for (int64_t j = 0; j < n; j += NR)
        micro_tile<A, kMR, kKC, kEpi, kTransA>(rows(i), lda, b + j, ldb, d, scale, al(i), c + i * ldc + j, ldc);
  } else {
    for (int64_t j = 0; j < n; j += NR)
      for (int64_t i = 0; i < mf; i += kMR)
        micro_tile<A, kMR, kKC, kEpi, kTransA>(rows(i), lda, b + j, ldb, d, scale, al(i), c + i * ldc + j, ldc);
  }
  const int64_t i = mf;
  for (int64_t j = 0; j < n; j += NR) {
    A* ci = c + i * ldc + j;
    switch (m - i) {
#define ATTNFAST_TAIL(mr) \
  case mr: micro_tile<A, mr, kKC, kEpi, kTransA>(rows(i), lda, b + j, ldb, d, scale, al(i), ci, ldc); break;
      ATTNFAST_TAIL(5) ATTNFAST_TAIL(4) ATTNFAST_TAIL(3) ATTNFAST_TAIL(2) ATTNFAST_TAIL(1)
#undef ATTNFAST_TAIL
      default: break;
    }
  }
}

// exp(x) on float vectors, branch-free.  Cody-Waite range reduction
// x = n ln2 + r and a degree-6 polynomial (Cephes expf coefficients): about
// 1 ulp, like the Sleef u10 exp torch uses.  x is clamped to [-88, 88.7] by
// one max and one min (NaN passes through: a > b ? a : b is vmaxps a, b);
// x <= -88 (incl. -inf) gives n = -127, whose scale 2^(n+127 << 23) is the
// bit pattern of +0: exactly 0 with no compare and select (a third of the
// clamping's instructions before).  Between -88 and -87.3 the result is
// subnormal, as exp is.
template <typename V>
inline V exp_vec(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 88.0f, hi = V{} + 88.7f;
  const V xl = lo > x ? lo : x;
  const V xc = hi < xl ? hi : xl;
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
  return y * scale;
}

// Lane reductions as a tree of half-width steps (log2(W) dependent adds, not
// W - 1: the lane-by-lane sums of rows were a latency chain of 16 scalar adds
// per row on AVX-512; NOTES.md, v10).
typedef float F4 __attribute__((vector_size(16), aligned(4)));
typedef float F8 __attribute__((vector_size(32), aligned(4)));
typedef float F16 __attribute__((vector_size(64), aligned(4)));
// max that propagates NaN from either side
inline float max_nan(float a, float b) { return (a > b) | (a != a) ? a : b; }
template <typename V>
inline V max_nan(V a, V b) { return (a > b) | (a != a) ? a : b; }
inline float hsum(F4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }
inline float hmax(F4 v) { return max_nan(max_nan(v[0], v[2]), max_nan(v[1], v[3])); }
#if ATTNFAST_VEC_BYTES >= 32
inline F4 lo_half(F8 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
inline F4 hi_half(F8 v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
inline float hsum(F8 v) { return hsum(lo_half(v) + hi_half(v)); }
inline float hmax(F8 v) { return hmax(max_nan(lo_half(v), hi_half(v))); }
#endif
#if ATTNFAST_VEC_BYTES >= 64
inline F8 lo_half(F16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline F8 hi_half(F16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
inline float hsum(F16 v) { return hsum(lo_half(v) + hi_half(v)); }
inline float hmax(F16 v) { return hmax(max_nan(lo_half(v), hi_half(v))); }
#endif

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
  return hsum(sum);
}

// Row max for the softmax.  NaN scores (a NaN or inf in q or k) are skipped
// by the max (one vmaxps a vector, two independent chains): they reach the
// row's sum through exp(NaN - m) = NaN, which makes the row NaN.  Only a row
// whose every other score is -inf needs them here: its max would say "no
// visible key" (output 0), so then the row is scanned and NaN returned.
inline float rowmax_f32(const float* row, int64_t n) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  V m = V{} - __builtin_inff(), m2 = m;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const V x = *reinterpret_cast<const V*>(row + j), y = *reinterpret_cast<const V*>(row + j + W);
    m = x > m ? x : m;
    m2 = y > m2 ? y : m2;
  }
  for (; j < n; j += W) {
    const V x = *reinterpret_cast<const V*>(row + j);
    m = x > m ? x : m;
  }
  const float mx = hmax(m > m2 ? m : m2);
  if (mx == -__builtin_inff())
    for (int64_t t = 0; t < n; ++t)
      if (row[t] != row[t]) return row[t];
  return mx;
}

// d[i] = exp(a[i] - b[i]) for i < n; whole vectors (a, b, d padded to them).
inline void exp_diff_f32(const float* a, const float* b, int64_t n, float* d) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  for (int64_t i = 0; i < n; i += W)
    *reinterpret_cast<V*>(d + i) = exp_vec(*reinterpret_cast<const V*>(a + i) - *reinterpret_cast<const V*>(b + i));
}

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
