// bfloat16 products by pairs (AVX-512 BF16, vdpbf16ps), for bfloat16 inputs.
//
// vdpbf16ps adds a[2p] * b[2p] + a[2p+1] * b[2p+1] into each float lane: two
// multiply-adds an instruction where the float micro-kernel (simd.h) does one,
// at the same issue rate (measured on a Zen 5 core: 420-480 GFLOP/s against
// 235 for the float FMA).  A product of two bfloat16 values is exact in float,
// so the score products Q K^T and dO V^T, whose operands are the inputs
// themselves, round only where the float kernel rounds: in the sums.  P and dS
// are rounded to bfloat16 first, as FlashAttention does on GPUs (the parity
// rule's baseline, the reference run in bfloat16, rounds them too).
//
// Layouts (elements are bfloat16 bit patterns, uint16_t):
//   A, plain: row r's pair p at a + r * lda + 2p (row-major, pairs adjacent).
//   A, kTransA: (reduction pairs, rows, 2): row r's pair p at a + p * lda + 2r.
//   B: (reduction pairs, columns, 2): column j's pair p at b + p * ldb + 2j.
// The reduction length d is even; an odd one is padded with a zero element in
// both operands by the packing functions below.
#pragma once
#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// The kernels' pair-product steps for element type T; on: whether T takes
// them in this ISA's build (bfloat16 on AVX-512, whose build requires
// AVX-512 BF16).  The kernels call PairPath<T>::... only under
// `if constexpr (PairPath<T>::on)`, so other builds never name them.
template <typename T, bool kOn = ATTNFAST_VEC_BYTES >= 64 && std::is_same<T, bf16_t>::value>
struct PairPath {
  static constexpr bool on = false;
};

#if ATTNFAST_VEC_BYTES >= 64

// The float micro-kernel's C tile (kMR rows, 32 columns), from pairs.  The
// same chunking (kKC elements summed in registers, then added to C) and the
// same epilogues as micro_tile.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // acc: set by the first chunk (d > 0)
template <int MR, int64_t kKC, Epi kEpi, bool kTransA>
inline void micro_tile_pairs(const uint16_t* __restrict a, int64_t lda, const uint16_t* __restrict b, int64_t ldb,
                             int64_t d, float scale, const float* __restrict alpha, float* __restrict c,
                             int64_t ldc) {
  constexpr int NV = 2;
  static_assert(kKC % 2 == 0, "chunks of whole pairs");
  if (d == 0) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        float* cp = c + r * ldc + v * 16;
        if constexpr (kEpi == Epi::kStore) _mm512_storeu_ps(cp, _mm512_setzero_ps());
        else if constexpr (kEpi == Epi::kRescale) _mm512_storeu_ps(cp, _mm512_mul_ps(_mm512_loadu_ps(cp), _mm512_set1_ps(alpha[r])));
      }
    return;
  }
  __m512 acc[MR][NV];
  for (int64_t e0 = 0; e0 < d; e0 += kKC) {
    const int64_t e1 = e0 + kKC < d ? e0 + kKC : d;
    __m512 t[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) t[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int64_t e = e0; e < e1; e += 2) {
      __m512bh bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + (e >> 1) * ldb + v * 32);
      for (int r = 0; r < MR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, kTransA ? a + (e >> 1) * lda + 2 * r : a + r * lda + e, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        for (int v = 0; v < NV; ++v) t[r][v] = _mm512_dpbf16_ps(t[r][v], av, bv[v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        float* cp = c + r * ldc + v * 16;
        __m512 s;
        if (e0 == 0)
          s = kEpi == Epi::kRescale ? _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(cp), _mm512_set1_ps(alpha[r])), t[r][v])
                                    : t[r][v];
        else
          s = _mm512_add_ps(acc[r][v], t[r][v]);
        acc[r][v] = s;
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * 16;
      if constexpr (kEpi == Epi::kStore) _mm512_storeu_ps(cp, _mm512_mul_ps(acc[r][v], _mm512_set1_ps(scale)));
      else if constexpr (kEpi == Epi::kRescale) _mm512_storeu_ps(cp, acc[r][v]);
      else _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), _mm512_mul_ps(acc[r][v], _mm512_set1_ps(scale))));
    }
}
#pragma GCC diagnostic pop

// matmul_tile (simd.h) from pairs: c[i][0:n] (op)= sum_{e<d} a[i][e] * b[e][0:n],
// i < m, d even, layouts as above.  Whole 32-column tiles: b readable and c
// writable up to pad_up(n) columns.
template <int64_t kKC, Epi kEpi = Epi::kStore, bool kTransA = false>
void matmul_tile_pairs(const uint16_t* __restrict a, int64_t lda, int64_t m, int64_t d, const uint16_t* __restrict b,
                       int64_t ldb, int64_t n, float scale, float* __restrict c, int64_t ldc,
                       const float* __restrict alpha = nullptr) {
  constexpr int64_t NR = 32;
  const int64_t mf = m / kMR * kMR;
  auto rows = [&](int64_t i) { return kTransA ? a + 2 * i : a + i * lda; };
  auto al = [&](int64_t i) { return kEpi == Epi::kRescale ? alpha + i : nullptr; };
  if (d * n * 2 <= kL1Panel) {
    for (int64_t i = 0; i < mf; i += kMR)
      for (int64_t j = 0; j < n; j += NR)
        micro_tile_pairs<kMR, kKC, kEpi, kTransA>(rows(i), lda, b + 2 * j, ldb, d, scale, al(i), c + i * ldc + j, ldc);
  } else {
    for (int64_t j = 0; j < n; j += NR)
      for (int64_t i = 0; i < mf; i += kMR)
        micro_tile_pairs<kMR, kKC, kEpi, kTransA>(rows(i), lda, b + 2 * j, ldb, d, scale, al(i), c + i * ldc + j, ldc);
  }
  const int64_t i = mf;
  for (int64_t j = 0; j < n; j += NR) {
    float* ci = c + i * ldc + j;
    switch (m - i) {
#define ATTNFAST_TAIL(mr) \
  case mr: micro_tile_pairs<mr, kKC, kEpi, kTransA>(rows(i), lda, b + 2 * j, ldb, d, scale, al(i), ci, ldc); break;
      ATTNFAST_TAIL(5) ATTNFAST_TAIL(4) ATTNFAST_TAIL(3) ATTNFAST_TAIL(2) ATTNFAST_TAIL(1)
#undef ATTNFAST_TAIL
      default: break;
    }
  }
}

// 16 floats rounded to bfloat16 (nearest even; NaN stays NaN).
inline __m256i bf16_of(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// dst[r][c] = bf16(src[r][c]) for r < nr, c < nc, and dst[r][nc] = 0 when nc
// is odd (the zero partner of the last pair).  Row strides lds, ldd.
inline void rows_to_bf16(const float* src, int64_t lds, int64_t nr, int64_t nc, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < nr; ++r) {
    const float* s = src + r * lds;
    uint16_t* o = dst + r * ldd;
    int64_t c = 0;
    for (; c + 16 <= nc; c += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c), bf16_of(_mm512_loadu_ps(s + c)));
    if (c < nc) {
      const __mmask16 k = static_cast<__mmask16>((1u << (nc - c)) - 1);
      _mm256_mask_storeu_epi16(o + c, k, bf16_of(_mm512_maskz_loadu_ps(k, s + c)));
    }
    if (nc & 1) o[nc] = 0;
  }
}

// The 16 pair words (x[c], y[c]) of 16 columns, x and y bfloat16 bits.
// (Vector extensions: GCC 12 warns on the intrinsics' undefined-vector idiom.)
inline __m512i pair_words(__m256i x, __m256i y) {
  typedef uint16_t U16 __attribute__((vector_size(32)));
  typedef uint32_t U32 __attribute__((vector_size(64)));
  const U32 w = __builtin_convertvector((U16)x, U32) | (__builtin_convertvector((U16)y, U32) << 16);
  return (__m512i)w;
}

// Rows in pairs: dst[(r / 2) * ldd + 2c + r % 2] = bf16(src[r][c]) for
// r < nr, c < nc (the B layout with pairs along rows, or kTransA's A layout);
// when nr is odd the last pair's second row is 0.  src: float (rounded), or
// bfloat16 with unit column stride (copied); row stride lds.
template <typename S>
inline __m256i bf16_row16(const S* s, __mmask16 k) {
  if constexpr (std::is_same<S, float>::value) return bf16_of(_mm512_maskz_loadu_ps(k, s));
  else return _mm256_maskz_loadu_epi16(k, s);
}
template <typename S>
void rows_to_pairs(const S* src, int64_t lds, int64_t nr, int64_t nc, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < nr; r += 2) {
    const S* x = src + r * lds;
    const S* y = r + 1 < nr ? x + lds : nullptr;
    uint16_t* o = dst + (r / 2) * ldd;
    for (int64_t c = 0; c < nc; c += 16) {
      const __mmask16 k = nc - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (nc - c)) - 1);
      const __m256i xv = bf16_row16(x + c, k), yv = y ? bf16_row16(y + c, k) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(o + 2 * c, k, pair_words(xv, yv));
    }
  }
}

// The L rows of a head's (L, ncols) bfloat16 slice, as B operands of the
// product with the columns as the reduction (K^T for S = Q K^T, V^T for
// dP = dO V^T), tile-major like pack_tiles_t: tile t is (even_up(ncols) / 2,
// kBlockK, 2), column pairs of its keys; an odd ncols gets a zero partner.
inline void pack_tiles_pairs(const bf16_t* x, const Strides4& st, int64_t L, int64_t ncols, uint16_t* dst) {
  const int64_t np = even_up(ncols) / 2;
  for (int64_t j = 0; j < L; ++j) {
    const bf16_t* row = x + j * st.r;
    uint32_t* tile = reinterpret_cast<uint32_t*>(dst + (j / kBlockK) * np * 2 * kBlockK) + j % kBlockK;
    for (int64_t p = 0; p < np; ++p) {
      const uint32_t lo = row[2 * p * st.c].bits;
      const uint32_t hi = 2 * p + 1 < ncols ? row[(2 * p + 1) * st.c].bits : 0u;
      tile[p * kBlockK] = lo | (hi << 16);
    }
  }
}

// Rows [r0, r0 + nr) of a (row, col) bfloat16 slice, row-major into dst (row
// stride ld), with the zero partner at column ncols when it is odd.
inline void load_rows_bf16(const bf16_t* base, const Strides4& st, int64_t r0, int64_t nr, int64_t ncols,
                           uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < nr; ++r) {
    const bf16_t* s = base + (r0 + r) * st.r;
    uint16_t* o = dst + r * ld;
    for (int64_t c = 0; c < ncols; ++c) o[c] = s[c * st.c].bits;
    if (ncols & 1) o[ncols] = 0;
  }
}

// Rows [r0, r0 + nr) of a (row, col) bfloat16 slice in pairs (rows_to_pairs's layout).
inline void load_rows_pairs(const bf16_t* base, const Strides4& st, int64_t r0, int64_t nr, int64_t ncols,
                            uint16_t* dst, int64_t ldd) {
  if (st.c == 1) {
    rows_to_pairs(base + r0 * st.r, st.r, nr, ncols, dst, ldd);
    return;
  }
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < ncols; ++c) {
      dst[(r / 2) * ldd + 2 * c + r % 2] = base[(r0 + r) * st.r + c * st.c].bits;
      if (r + 1 == nr && (nr & 1)) dst[(r / 2) * ldd + 2 * c + 1] = 0;
    }
}

// The forward's steps (attention_kernel.h, fwd_items) for bfloat16 inputs.
template <typename T>
struct PairPath<T, true> {
  static constexpr bool on = true;
  // K^T tiles (pack_tiles_pairs) and V in pairs of keys, (Lk / 2, ldv, 2), of kv head (b, hk).
  static void pack_kv(const AttnParams& p, int64_t b, int64_t hk, uint16_t* kt, uint16_t* v, int64_t ldv) {
    pack_tiles_pairs(head_of<bf16_t>(p.k, p.k_st, b, hk), p.k_st, p.Lk, p.E, kt);
    load_rows_pairs(head_of<bf16_t>(p.v, p.v_st, b, hk), p.v_st, 0, p.Lk, p.Ev, v, 2 * ldv);
  }
  // Query rows [i0, i0 + nq) of head h: (nq, even_up(E)).
  static void load_q(const bf16_t* q, const Strides4& st, int64_t i0, int64_t nq, int64_t E, uint16_t* dst) {
    load_rows_bf16(q, st, i0, nq, E, dst, even_up(E));
  }
  // st = scale * Q K^T for the nt keys of the tile starting at key jt.
  static void scores(const uint16_t* q, int64_t nq, int64_t E, const uint16_t* kt, int64_t jt, int64_t nt,
                     float scale, float* st, int64_t ldk) {
    const int64_t e2 = even_up(E);
    matmul_tile_pairs<kKCHead>(q, e2, nq, e2, kt + jt * e2, 2 * kBlockK, nt, scale, st, ldk);
  }
  // P's columns [c0, c0 + nc) of nq rows (row stride ldk) rounded into p2 (same place).
  static void round_p(const float* sc, int64_t nq, int64_t ldk, int64_t c0, int64_t nc, uint16_t* p2) {
    rows_to_bf16(sc + c0, ldk, nq, nc, p2 + c0, ldk);
  }
  // acc = acc * alpha + P V (kRescale) or acc += P V, P's nr columns from
  // column ja (p2), V's rows from key j (v, pairs of keys).
  template <Epi kEpi>
  static void pv(const uint16_t* p2, int64_t ldk, int64_t nq, int64_t nr, const uint16_t* v, int64_t j, int64_t ldv,
                 int64_t Ev, float* acc, const float* alpha) {
    matmul_tile_pairs<kKCSeq, kEpi>(p2, ldk, nq, even_up(nr), v + j * ldv, 2 * ldv, Ev, 1.0f, acc, ldv, alpha);
  }

  // The backward's steps (bwd_items).  Per kv head: K^T and V^T tiles (the
  // score and dP products), K in pairs of keys (dQ = dS K).
  static void pack_bwd(const AttnParams& p, int64_t b, int64_t hk, uint16_t* kt, uint16_t* vt, uint16_t* kp,
                       int64_t lde) {
    const bf16_t* k = head_of<bf16_t>(p.k, p.k_st, b, hk);
    pack_tiles_pairs(k, p.k_st, p.Lk, p.E, kt);
    pack_tiles_pairs(head_of<bf16_t>(p.v, p.v_st, b, hk), p.v_st, p.Lk, p.Ev, vt);
    load_rows_pairs(k, p.k_st, 0, p.Lk, p.E, kp, 2 * lde);
  }
  // Per query block: Q and dO row-major (the score and dP products) and in
  // pairs of queries (dK = dS^T Q, dV = P^T dO).
  static void load_block(const bf16_t* q, const Strides4& q_st, const bf16_t* dout, const Strides4& do_st, int64_t i0,
                         int64_t nq, int64_t E, int64_t Ev, int64_t lde, int64_t ldv, uint16_t* q2, uint16_t* qp,
                         uint16_t* do2, uint16_t* dop) {
    load_rows_bf16(q, q_st, i0, nq, E, q2, even_up(E));
    load_rows_bf16(dout, do_st, i0, nq, Ev, do2, even_up(Ev));
    load_rows_pairs(q, q_st, i0, nq, E, qp, 2 * lde);
    load_rows_pairs(dout, do_st, i0, nq, Ev, dop, 2 * ldv);
  }
  // dpt = dO V^T for the nk keys of the tile starting at key j0.
  static void dp(const uint16_t* do2, int64_t nq, int64_t Ev, const uint16_t* vt, int64_t j0, int64_t nk, float* dpt,
                 int64_t ldp) {
    const int64_t e2 = even_up(Ev);
    matmul_tile_pairs<kKCHead>(do2, e2, nq, e2, vt + j0 * e2, 2 * kBlockK, nk, 1.0f, dpt, ldp);
  }
  // dv += P^T dO, P (nq, nk) float with row stride ldp, rounded into pt (pairs of queries).
  static void dv(const float* pz, int64_t ldp, int64_t nq, int64_t nk, uint16_t* pt, const uint16_t* dop, int64_t Ev,
                 int64_t ldv, float* dv) {
    rows_to_pairs(pz, ldp, nq, nk, pt, 2 * kBlockK);
    matmul_tile_pairs<kKCSeq, Epi::kAccumulate, true>(pt, 2 * kBlockK, nk, even_up(nq), dop, 2 * ldv, Ev, 1.0f, dv,
                                                      ldv);
  }
  // dq += scale dS K and dk += scale dS^T Q, dS (nq, nk) float with row
  // stride ldp rounded into ds (row-major) and dst (pairs of queries); kp:
  // the head's K in pairs of keys, from key j0.
  static void dq_dk(const float* dS, int64_t ldp, int64_t nq, int64_t nk, uint16_t* ds, uint16_t* dst,
                    const uint16_t* kp, int64_t j0, const uint16_t* qp, int64_t E, int64_t lde, float scale, float* dq,
                    float* dk) {
    rows_to_bf16(dS, ldp, nq, nk, ds, kBlockK);
    rows_to_pairs(dS, ldp, nq, nk, dst, 2 * kBlockK);
    matmul_tile_pairs<kKCSeq, Epi::kAccumulate>(ds, kBlockK, nq, even_up(nk), kp + j0 * lde, 2 * lde, E, scale, dq,
                                                lde);
    matmul_tile_pairs<kKCSeq, Epi::kAccumulate, true>(dst, 2 * kBlockK, nk, even_up(nq), qp, 2 * lde, E, scale, dk,
                                                      lde);
  }
};

#endif  // ATTNFAST_VEC_BYTES >= 64

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
