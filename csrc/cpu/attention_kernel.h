// Fused attention on the CPU: FlashAttention-2 forward and backward.
//
// Built once per ISA (isa_build.h, included by each kernel_<isa>.cpp with its
// own ATTNFAST_ISA_NS and target flags), so one source serves every ISA.
// Everything here but the entry points has internal linkage: no inline
// function compiled for AVX-512 can leak into the portable object through the
// linker.
//
// Algorithm (Dao, "FlashAttention-2", 2023), per (batch, head):
//   forward : for each query block (kBlockQ rows) walk the visible key blocks
//             (kBlockK columns) once, keeping a running row max m, row sum l and
//             an unnormalised output accumulator; scores never exist beyond one
//             (kBlockQ, kBlockK) tile, so memory is O(L) beyond inputs/outputs.
//   backward: per query block, recompute P = exp(S - lse) tile by tile from
//             the saved lse, take delta = rowsum(P * dP), then accumulate dQ
//             for the block and dK, dV for the whole head (see bwd_impl).
// All arithmetic is in `acc_t` (float, or double for float64 inputs).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "params.h"
#include "philox.h"
#include "simd.h"

#ifndef ATTNFAST_ISA_NS
#error "define ATTNFAST_ISA_NS before including attention_kernel.h"
#endif

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// Tile sizes: a (64, 128) fp32 score tile is 32 KiB and stays in L1/L2.
constexpr int64_t kBlockQ = 192;
constexpr int64_t kBlockK = 128;

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

template <typename T> struct Elem;
// acc: arithmetic type.  lse: storage type of the saved logsumexp.  wide:
// type of the P = exp(s - lse) recompute in the backward.  float32 inputs keep
// lse in float64: a float32 lse (|lse| ~ log L) alone would put ~ulp(lse) of
// relative error on every recomputed P, several times what a naive float32
// softmax makes (measured on the parity sweep); float64 inputs compute
// s - lse in long double for the same reason.
template <> struct Elem<float> {
  using acc = float;
  using lse = double;
  using wide = double;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using acc = double;
  using lse = double;
  using wide = long double;
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};
template <> struct Elem<bf16_t> {
  using acc = float;
  using lse = float;
  using wide = float;
  static float load(const bf16_t* p) {
    const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static void store(bf16_t* p, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
      p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p->bits = static_cast<uint16_t>(u >> 16);
  }
};
template <> struct Elem<f16_t> {
  using acc = float;
  using lse = float;
  using wide = float;
  static float load(const f16_t* p) {
    _Float16 h;
    std::memcpy(&h, &p->bits, sizeof(h));
    return static_cast<float>(h);
  }
  static void store(f16_t* p, float v) {
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(&p->bits, &h, sizeof(h));
  }
};

// f(T{}) for the element type T of dtype.
template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16_t{});
    case DType::f16: return f(f16_t{});
  }
}

// dst[x] = src[x] for x < n, rounded to T.
template <typename T, typename A>
void store_all(T* dst, const A* src, int64_t n) {
  for (int64_t x = 0; x < n; ++x) Elem<T>::store(dst + x, src[x]);
}

// Zero-initialised scratch array.  (No std::vector here: its out-of-line
// members are shared weak symbols, and a copy compiled for AVX-512 could be
// picked by the linker for the portable path.)
template <typename A>
struct Buffer {
  explicit Buffer(int64_t n) : n_(n), p_(n > 0 ? new A[n]() : nullptr) {}
  ~Buffer() { delete[] p_; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  A* data() { return p_; }
  A& operator[](int64_t i) { return p_[i]; }
  void zero() { for (int64_t i = 0; i < n_; ++i) p_[i] = A(0); }

 private:
  int64_t n_;
  A* p_;
};

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Which keys a query row may see (causal / sliding window), as half-open ranges.
struct Visibility {
  int64_t diag, left, right, Lq, Lk;
  explicit Visibility(const AttnParams& p)
      : diag(p.diag_offset), left(p.window_left), right(p.window_right), Lq(p.Lq), Lk(p.Lk) {}
  int64_t col_lo(int64_t i) const { return left < 0 ? 0 : imin(Lk, imax(0, i + diag - left)); }
  int64_t col_hi(int64_t i) const { return right < 0 ? Lk : imin(Lk, imax(0, i + diag + right + 1)); }
  // Rows that see at least one column of [j0, j1).
  int64_t row_lo(int64_t j0) const { return right < 0 ? 0 : imin(Lq, imax(0, j0 - diag - right)); }
  int64_t row_hi(int64_t j1) const { return left < 0 ? Lq : imin(Lq, imax(0, j1 - 1 - diag + left + 1)); }
};

template <typename F>
void run_parallel(const AttnParams& p, int64_t n, F&& f) {
  struct Ctx { F* f; } ctx{&f};
  p.parallel_for(n, 1, &ctx, [](void* c, int64_t begin, int64_t end) {
    (*static_cast<Ctx*>(c)->f)(begin, end);
  });
}

// Loads rows [r0, r0+nr) of a (row, col) slice into dst[r][c] (row stride ld).
template <typename T, typename A>
void load_rows(const T* base, int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t ncols, A* dst,
               int64_t ld) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* src = base + (r0 + r) * rs;
    A* d = dst + r * ld;
    for (int64_t c = 0; c < ncols; ++c) d[c] = Elem<T>::load(src + c * cs);
  }
}

// Loads rows [r0, r0+nr) transposed: dst[c][r] (ld = ld).
template <typename T, typename A>
void load_rows_t(const T* base, int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t ncols,
                 int64_t ld, A* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* src = base + (r0 + r) * rs;
    for (int64_t c = 0; c < ncols; ++c) dst[c * ld + r] = Elem<T>::load(src + c * cs);
  }
}

// y[r][0:n] += x[r][0:n] for r < m (both with row stride ld).
template <typename A>
void add_tile(int64_t m, int64_t n, const A* __restrict x, int64_t ldx, A* __restrict y, int64_t ldy) {
  for (int64_t r = 0; r < m; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[r * ldy + c] += x[r * ldx + c];
  }
}

// dst[c][r] = src[r][c]
template <typename A>
void transpose_tile(const A* __restrict src, int64_t lds, int64_t rows, int64_t cols, A* __restrict dst,
                    int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// What the explicit mask does to the (nq, nk) tile at rows i0.., columns j0..:
// hides all of it (the tile is skipped: no product, no exp), shows all of it
// (a bool mask then needs no per-element pass), or a mix.  Reading the mask
// tile costs nq*nk byte loads against the tile's nq*nk*E FMAs; rows of a mask
// broadcast over rows are read once, and contiguous bool rows 8 bytes a time.
enum class TileMask { kHidden, kVisible, kMixed };

template <typename T>
TileMask classify_tile(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                       int64_t nk) {
  if (p.mask_kind == MaskKind::none) return TileMask::kVisible;
  const Strides4& st = p.mask_st;
  const int64_t rows = st.r == 0 ? 1 : nq;
  const int64_t off = b * st.b + h * st.h + i0 * st.r + j0 * st.c;
  if (p.mask_kind == MaskKind::additive) {
    for (int64_t i = 0; i < rows; ++i) {
      const T* m = static_cast<const T*>(p.mask) + off + i * st.r;
      for (int64_t j = 0; j < nk; ++j)
        if (Elem<T>::load(m + j * st.c) != -std::numeric_limits<float>::infinity()) return TileMask::kMixed;
    }
    return TileMask::kHidden;
  }
  bool any = false, all = true;
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off + i * st.r;
    int64_t j = 0;
    if (st.c == 1) {
      constexpr uint64_t kOnes = 0x0101010101010101ull;  // eight `true` bytes
      for (; j + 8 <= nk; j += 8) {
        uint64_t w;
        std::memcpy(&w, m + j, sizeof(w));
        any |= w != 0;
        all &= w == kOnes;
      }
    }
    for (; j < nk; ++j) {
      any |= m[j * st.c] != 0;
      all &= m[j * st.c] != 0;
    }
    if (any && !all) return TileMask::kMixed;
  }
  return any ? TileMask::kVisible : TileMask::kHidden;
}

// Sets invisible scores to -inf and applies the mask for rows [i0, i0+nq) and
// columns [j0, j0+nk) of head (b, h).
template <typename T, typename A>
void mask_tile(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0, int64_t nq,
               int64_t j0, int64_t nk, A* s, int64_t lds, TileMask tm) {
  const A ninf = -std::numeric_limits<A>::infinity();
  const bool windowed = vis.left >= 0 || vis.right >= 0;
  for (int64_t i = 0; i < nq; ++i) {
    A* row = s + i * lds;
    int64_t lo = 0, hi = nk;
    if (windowed) {
      lo = imin(nk, imax(0, vis.col_lo(i0 + i) - j0));
      hi = imax(lo, imin(nk, vis.col_hi(i0 + i) - j0));
      for (int64_t j = 0; j < lo; ++j) row[j] = ninf;
      for (int64_t j = hi; j < nk; ++j) row[j] = ninf;
    }
    if (p.mask_kind == MaskKind::none || tm == TileMask::kVisible) continue;
    const int64_t off = b * p.mask_st.b + h * p.mask_st.h + (i0 + i) * p.mask_st.r + j0 * p.mask_st.c;
    if (p.mask_kind == MaskKind::boolean) {
      const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
      if (p.mask_st.c == 1) {
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) row[j] = m[j] ? row[j] : ninf;
      } else {
        for (int64_t j = lo; j < hi; ++j) row[j] = m[j * p.mask_st.c] ? row[j] : ninf;
      }
    } else {
      const T* m = static_cast<const T*>(p.mask) + off;
      for (int64_t j = lo; j < hi; ++j) row[j] += static_cast<A>(Elem<T>::load(m + j * p.mask_st.c));
    }
  }
}

// fac[i][j] = dropout factor of element (i0+i, j0+j): 0 if dropped, 1/(1-p) if kept.
template <typename A>
void dropout_factors(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                     int64_t nk, A* fac, int64_t ld) {
  const float prob = static_cast<float>(p.dropout_p);
  const A inv_keep = A(1) / (A(1) - static_cast<A>(p.dropout_p));
  const int64_t bh = b * p.Hq + h;
  for (int64_t i = 0; i < nq; ++i) {
    A* row = fac + i * ld;
    const int64_t n0 = (i0 + i) * p.Lk + j0;
    for (int64_t j = 0; j < nk; ++j)
      row[j] = philox::dropout_uniform(p.seed, p.offset, bh, n0 + j) >= prob ? inv_keep : A(0);
  }
}

// ----------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------
// Softmax pieces, specialised for float (vectorised) and generic (double).
template <typename A>
inline A row_max(const A* row, int64_t n) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = (row[j] > mx || row[j] != row[j]) ? row[j] : mx;  // NaN wins
  return mx;
}
inline float row_max(const float* row, int64_t n) { return rowmax_f32(row, n); }
template <typename A>
inline A row_exp_sum(A* row, int64_t n, A m) {
  A rs = A(0);
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - m);
    rs += row[j];
  }
  return rs;
}
inline float row_exp_sum(float* row, int64_t n, float m) { return softmax_row_f32(row, n, m); }

// Backward P recompute: row[j] = exp(row[j] - lse) for j < n.  s - lse is
// formed in the lse precision (double for float32 inputs), so the only
// rounding before the exp is that of the difference itself, the same one a
// naive softmax makes on s - max.  (With a float32 lse, P carried an extra
// ulp of log L of error: several times a naive float32 softmax's.)
template <typename A, typename L>
inline void recompute_p(A* row, int64_t n, L lse) {
  using W = typename std::conditional<sizeof(A) == 8, long double, L>::type;
  for (int64_t j = 0; j < n; ++j) row[j] = static_cast<A>(std::exp(static_cast<W>(row[j]) - static_cast<W>(lse)));
}
inline void recompute_p(float* row, int64_t n, double lse) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = static_cast<float>(static_cast<double>(row[j]) - lse);
  softmax_row_f32(row, n, 0.0f);
}

template <typename T>
void fwd_impl(const FwdParams& p) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using W = typename Elem<T>::wide;
  const Visibility vis(p);
  const int64_t nqb = cdiv(p.Lq, kBlockQ);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t E = p.E, Ev = p.Ev, Lk = p.Lk, ldv = pad_up(Ev);
  const int64_t nkb = cdiv(Lk, kBlockK);
  const A scale = static_cast<A>(p.scale);
  const A ninf = -std::numeric_limits<A>::infinity();

  run_parallel(p, p.B * p.Hq * nqb, [&](int64_t begin, int64_t end) {
    // K^T (E, Lk) and V (Lk, Ev) of one kv head, packed once and reused by
    // every query block of that head this thread runs (items come in order).
    // K^T is stored tile-major, (nkb, E, kBlockK): one key tile is one
    // contiguous 32 KiB block (E = 64).  A plain (E, Lk) layout put the E rows
    // of a tile 4 * Lk bytes apart, a power-of-two-ish stride that fought the
    // cache's associativity: forward fp32 fell to 0.62-0.75x torch at L >= 4096
    // while it was 0.9x at L = 1024-2048.
    Buffer<A> kt(nkb * E * kBlockK), vbuf((nkb * kBlockK) * ldv);
    int64_t packed = -1;  // b * Hkv + hk of the current packs
    Buffer<A> qbuf(kBlockQ * E), sc(kBlockQ * kBlockK), acc(kBlockQ * ldv), mrow(kBlockQ),
        alpha(kBlockQ);
    // Row sums in the lse precision: the saved lse = m + log(l) is what the
    // backward rebuilds P from, so its error lands on every gradient.
    Buffer<L> lrow(kBlockQ);
    Buffer<A> fac(p.dropout_p > 0.f ? kBlockQ * kBlockK : 0);
    for (int64_t item = begin; item < end; ++item) {
      // Query blocks of a head in the order 0, n-1, 1, n-2, ...: under a causal
      // or windowed rule the work per block grows with its index, and
      // parallel_for hands each thread a contiguous range of items; this way
      // each range holds light and heavy blocks alike.
      const int64_t j = item % nqb, bh = item / nqb;
      const int64_t qb = (j % 2 == 0) ? j / 2 : nqb - 1 - j / 2;
      const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / group;
      const int64_t i0 = qb * kBlockQ, nq = imin(kBlockQ, p.Lq - i0);

      if (packed != b * p.Hkv + hk) {
        const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
        const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
        for (int64_t t = 0; t < nkb; ++t)  // (nkb, E, kBlockK)
          load_rows_t(k, p.k_st.r, p.k_st.c, t * kBlockK, imin(kBlockK, Lk - t * kBlockK), E, kBlockK,
                      kt.data() + t * E * kBlockK);
        load_rows(v, p.v_st.r, p.v_st.c, 0, Lk, Ev, vbuf.data(), ldv);  // (Lk, Ev)
        packed = b * p.Hkv + hk;
      }
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
      load_rows(q, p.q_st.r, p.q_st.c, i0, nq, E, qbuf.data(), E);  // (nq, E)
      for (int64_t i = 0; i < nq; ++i) { mrow[i] = ninf; lrow[i] = L(0); }
      acc.zero();

      // Keys visible to any row of this block.
      int64_t jlo = Lk, jhi = 0;
      for (int64_t i = i0; i < i0 + nq; ++i) {
        const int64_t lo = vis.col_lo(i), hi = vis.col_hi(i);
        if (lo < hi) { jlo = imin(jlo, lo); jhi = imax(jhi, hi); }
      }
      // Tiles are aligned to the packing; columns of the first tile left of
      // jlo are invisible to every row and get -inf from mask_tile.
      for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += kBlockK) {
        const int64_t nk = imin(kBlockK, jhi - j0);
        const int64_t nkp = imin(kBlockK, pad_up(nk));  // whole vectors
        const TileMask tm = classify_tile<T>(p, b, h, i0, nq, j0, nk);
        if (tm == TileMask::kHidden) continue;
        matmul_tile<kKCHead>(qbuf.data(), E, nq, E, kt.data() + j0 * E, kBlockK, nk, scale, sc.data(), kBlockK);
        mask_tile<T, A>(p, vis, b, h, i0, nq, j0, nk, sc.data(), kBlockK, tm);

        // Online softmax: P = exp(S - m_new), l = l * alpha + rowsum(P).
        for (int64_t i = 0; i < nq; ++i) {
          A* row = sc.data() + i * kBlockK;
          for (int64_t j = nk; j < nkp; ++j) row[j] = ninf;  // padding lanes give exp = 0
          const A mx = row_max(row, nkp);
          const A m_new = (mx > mrow[i] || mx != mx) ? mx : mrow[i];  // a NaN row stays NaN
          if (m_new == ninf) {  // nothing visible in this row yet
            for (int64_t j = 0; j < nkp; ++j) row[j] = A(0);
            alpha[i] = A(1);
            continue;
          }
          alpha[i] = std::exp(mrow[i] - m_new);  // exp(-inf) = 0 on the first block
          const A rs = row_exp_sum(row, nkp, m_new);
          lrow[i] = lrow[i] * static_cast<L>(alpha[i]) + static_cast<L>(rs);
          mrow[i] = m_new;
        }
        if (p.dropout_p > 0.f) {
          dropout_factors(p, b, h, i0, nq, j0, nk, fac.data(), kBlockK);
          for (int64_t x = 0; x < nq * kBlockK; ++x) sc[x] *= fac[x];
        }
        // acc = acc * alpha + P V, the rescale fused into the product's epilogue.
        matmul_tile<kKCSeq>(sc.data(), kBlockK, nq, nk, vbuf.data() + j0 * ldv, ldv, Ev, A(1), acc.data(), ldv,
                    alpha.data());
      }

      T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h;
      L* lse = static_cast<L*>(p.lse) + (b * p.Hq + h) * p.Lq;
      for (int64_t i = 0; i < nq; ++i) {
        const L l = lrow[i];
        // One rounding: out = acc / l in the lse precision.  (acc * float(1/l)
        // rounds twice.)
        const L inv = l != l ? l : l > L(0) ? L(1) / l : L(0);  // fully masked row: output 0; NaN row: NaN
        T* orow = out + (i0 + i) * p.out_st.r;
        for (int64_t c = 0; c < Ev; ++c)
          Elem<T>::store(orow + c * p.out_st.c, static_cast<A>(static_cast<L>(acc[i * ldv + c]) * inv));
        lse[i0 + i] = l > L(0) ? static_cast<L>(static_cast<W>(mrow[i]) + std::log(static_cast<W>(l)))
                      : l != l ? l : -std::numeric_limits<L>::infinity();
      }
    }
  });
}

// ----------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------
// One work item per (batch, kv head): it owns dK and dV of that head outright
// (full-length accumulators), so the q heads of a GQA group add into them
// without atomics.  Per query block it makes two sweeps over the visible keys:
//   1. P = exp(S - lse) and dP = dO V^T into (kBlockQ, Lk) panels, and
//      delta = rowsum(P * dP);
//   2. dS = P * (dP - delta); dV += P^T dO, dQ = scale dS K, dK += scale dS^T Q.
// delta is taken from the same rounded P and dP that dS uses, not from
// FlashAttention-2's rowsum(dO * O): with the stored O, float32 gradients had
// up to 4x the error of a naive float32 softmax backward (measured: about 1
// case in 300 broke the parity rule).  The panels cost O(kBlockQ * Lk) memory
// per thread and no extra matmul.
template <typename T>
void bwd_impl(const BwdParams& p) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  const Visibility vis(p);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t E = p.E, Ev = p.Ev, Lk = p.Lk;
  // K^T, V^T and the P / dP panels are stored tile-major, one contiguous
  // block per key tile (see fwd_impl for why); ldp is a tile's row stride.
  const int64_t nkb = cdiv(Lk, kBlockK), ldp = kBlockK, tq_sz = kBlockQ * kBlockK;
  const int64_t lde = pad_up(E), ldv = pad_up(Ev);
  const A scale = static_cast<A>(p.scale);
  const L inf = std::numeric_limits<L>::infinity();
  const bool drop = p.dropout_p > 0.f;

  run_parallel(p, p.B * p.Hkv, [&](int64_t begin, int64_t end) {
    // Whole-head packs of K and V, reused by every query block of the group.
    Buffer<A> kt(nkb * E * kBlockK), kbuf(Lk * lde), vt(nkb * Ev * kBlockK), dk(Lk * E), dv(Lk * Ev);
    Buffer<A> qbuf(kBlockQ * lde), dobuf(kBlockQ * ldv), dq(kBlockQ * E), tq(kBlockQ * lde),
        tk(kBlockK * lde), tv(kBlockK * ldv), tt(kBlockK * kBlockQ), delta(kBlockQ);
    Buffer<A> pp(nkb * tq_sz), dpp(nkb * tq_sz);  // P and dP panels, (nkb, kBlockQ, kBlockK)
    Buffer<A> fac(drop ? nkb * tq_sz : 0);
    Buffer<L> lse(kBlockQ);
    Buffer<uint8_t> skip(nkb);  // key tiles the mask hides entirely
    for (int64_t item = begin; item < end; ++item) {
      const int64_t hk = item % p.Hkv, b = item / p.Hkv;
      const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h;
      const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h;
      for (int64_t t = 0; t < nkb; ++t) {  // (nkb, E, kBlockK) and (nkb, Ev, kBlockK)
        const int64_t n = imin(kBlockK, Lk - t * kBlockK);
        load_rows_t(k, p.k_st.r, p.k_st.c, t * kBlockK, n, E, kBlockK, kt.data() + t * E * kBlockK);
        load_rows_t(v, p.v_st.r, p.v_st.c, t * kBlockK, n, Ev, kBlockK, vt.data() + t * Ev * kBlockK);
      }
      load_rows(k, p.k_st.r, p.k_st.c, 0, Lk, E, kbuf.data(), lde);   // (Lk, E)
      dk.zero();
      dv.zero();

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g, bh = b * p.Hq + h;
        const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
        const T* dout = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h;
        T* dqp = static_cast<T*>(p.dq) + bh * p.Lq * E;
        for (int64_t i0 = 0; i0 < p.Lq; i0 += kBlockQ) {
          const int64_t nq = imin(kBlockQ, p.Lq - i0);
          dq.zero();
          int64_t jlo = Lk, jhi = 0;
          for (int64_t i = i0; i < i0 + nq; ++i) {
            const int64_t lo = vis.col_lo(i), hi = vis.col_hi(i);
            if (lo < hi) { jlo = imin(jlo, lo); jhi = imax(jhi, hi); }
          }
          if (jlo < jhi) {
            load_rows(q, p.q_st.r, p.q_st.c, i0, nq, E, qbuf.data(), lde);              // (nq, E)
            load_rows(dout, p.dout_st.r, p.dout_st.c, i0, nq, Ev, dobuf.data(), ldv);  // (nq, Ev)
            for (int64_t i = 0; i < nq; ++i) {
              const L l = static_cast<const L*>(p.lse)[bh * p.Lq + i0 + i];
              // A fully masked row (lse = -inf) has P = 0: exp(s - inf) = 0.
              lse[i] = l == -inf ? inf : l;
              delta[i] = A(0);
            }
            // Sweep 1: P, dP panels and delta.  Tiles are aligned to the packing;
            // columns left of jlo are invisible to every row (-inf from mask_tile).
            for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += kBlockK) {
              const int64_t nk = imin(kBlockK, jhi - j0), t = j0 / kBlockK;
              A* pt = pp.data() + t * tq_sz;
              A* dpt = dpp.data() + t * tq_sz;
              const TileMask tm = classify_tile<T>(p, b, h, i0, nq, j0, nk);
              skip[t] = tm == TileMask::kHidden;
              if (skip[t]) continue;
              matmul_tile<kKCHead>(qbuf.data(), lde, nq, E, kt.data() + t * E * kBlockK, kBlockK, nk, scale, pt, ldp);
              mask_tile<T, A>(p, vis, b, h, i0, nq, j0, nk, pt, ldp, tm);
              for (int64_t i = 0; i < nq; ++i) recompute_p(pt + i * ldp, nk, lse[i]);
              matmul_tile<kKCHead>(dobuf.data(), ldv, nq, Ev, vt.data() + t * Ev * kBlockK, kBlockK, nk, A(1), dpt, ldp);
              if (drop) {
                // dP passes back through the forward's dropout mask, regenerated
                // from the counter.  delta = rowsum(P * Z * dP) = rowsum(dO * O).
                A* ft = fac.data() + t * tq_sz;
                dropout_factors(p, b, h, i0, nq, j0, nk, ft, ldp);
                for (int64_t i = 0; i < nq; ++i)
                  for (int64_t j = 0; j < nk; ++j) dpt[i * ldp + j] *= ft[i * ldp + j];
              }
              if (p.delta != nullptr) continue;  // the caller's delta replaces the row sums
              for (int64_t i = 0; i < nq; ++i) {
                const A* pr = pt + i * ldp;
                const A* dr = dpt + i * ldp;
                A sum = A(0);
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < nk; ++j) sum += pr[j] * dr[j];
                delta[i] += sum;
              }
            }
            if (p.delta != nullptr) {
              for (int64_t i = 0; i < nq; ++i)
                delta[i] = static_cast<A>(static_cast<const L*>(p.delta)[bh * p.Lq + i0 + i]);
            }
            if (p.dlse != nullptr) {
              // d lse / d s = P, so a gradient on lse only shifts delta.
              for (int64_t i = 0; i < nq; ++i)
                delta[i] -= static_cast<A>(static_cast<const L*>(p.dlse)[bh * p.Lq + i0 + i]);
            }
            // Sweep 2: gradients, one key tile at a time.
            for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += kBlockK) {
              const int64_t nk = imin(kBlockK, jhi - j0), t = j0 / kBlockK;
              if (skip[t]) continue;
              A* pt = pp.data() + t * tq_sz;
              A* dst = dpp.data() + t * tq_sz;
              // dV += (P * Z)^T dO
              for (int64_t i = 0; i < nq; ++i)
                for (int64_t j = 0; j < nk; ++j)
                  tt[j * kBlockQ + i] = drop ? pt[i * ldp + j] * fac[t * tq_sz + i * ldp + j] : pt[i * ldp + j];
              matmul_tile<kKCSeq>(tt.data(), kBlockQ, nk, nq, dobuf.data(), ldv, Ev, A(1), tv.data(), ldv);
              add_tile(nk, Ev, tv.data(), ldv, dv.data() + j0 * Ev, Ev);
              // dS = P * (dP - delta), over the dP panel.
              for (int64_t i = 0; i < nq; ++i) {
                A* d = dst + i * ldp;
                const A* pr = pt + i * ldp;
                const A di = delta[i];
#pragma omp simd
                for (int64_t j = 0; j < nk; ++j) d[j] = pr[j] * (d[j] - di);
              }
              if (p.dmask != nullptr) {
                for (int64_t i = 0; i < nq; ++i) {
                  A* dm = static_cast<A*>(p.dmask) + (bh * p.Lq + i0 + i) * Lk + j0;
                  for (int64_t j = 0; j < nk; ++j) dm[j] = dst[i * ldp + j];
                }
              }
              // dQ += scale * dS K
              matmul_tile<kKCSeq>(dst, ldp, nq, nk, kbuf.data() + j0 * lde, lde, E, scale, tq.data(), lde);
              add_tile(nq, E, tq.data(), lde, dq.data(), E);
              // dK += scale * dS^T Q
              transpose_tile(dst, ldp, nq, nk, tt.data(), kBlockQ);
              matmul_tile<kKCSeq>(tt.data(), kBlockQ, nk, nq, qbuf.data(), lde, E, scale, tk.data(), lde);
              add_tile(nk, E, tk.data(), lde, dk.data() + j0 * E, E);
            }
          }
          store_all(dqp + i0 * E, dq.data(), nq * E);
        }
      }
      store_all(static_cast<T*>(p.dk) + (b * p.Hkv + hk) * Lk * E, dk.data(), Lk * E);
      store_all(static_cast<T*>(p.dv) + (b * p.Hkv + hk) * Lk * Ev, dv.data(), Lk * Ev);
    }
  });
}

}  // namespace

void attention_fwd(const FwdParams& p) {
  by_dtype(p.dtype, [&](auto t) { fwd_impl<decltype(t)>(p); });
}

void attention_bwd(const BwdParams& p) {
  by_dtype(p.dtype, [&](auto t) { bwd_impl<decltype(t)>(p); });
}

}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast

#include "additive_kernel.h"
#include "topk_kernel.h"
