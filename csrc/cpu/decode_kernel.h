// Forward for short queries (decoding: Lq of 1 to a few rows over a long key
// cache).  The blocked forward (attention_kernel.h) packs K^T and V of a head
// before its first query block; with one query row that copy costs as much as
// the product itself, and B * H work items may be fewer than the threads.
// Here every query row of a kv head's group is served by one pass over the
// keys, straight from the input:
//   s[r][j] = scale * q_r . k_j      (dot products over E, one key row at a time)
//   mask, then per row m = max s, l = sum exp(s - m), p = exp(s - m)
//   o_r = sum_j p[r][j] v_j          (the blocked kernel's P V product, V read in place)
// The keys are cut into splits of at least kSplitMin keys, so that B * Hkv
// items become up to kDecodeItems; each split keeps its own (o, m, l) and a
// last pass merges them by log-sum-exp in split order.  The split count is a
// function of the shape only, so results do not depend on the thread count.
#pragma once
#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

constexpr int64_t kDecodeRows = 16;    // query rows per kv head (group * Lq) served here
constexpr int64_t kSplitMin = 512;     // keys per split, at least
constexpr int64_t kDecodeItems = 8;    // work items aimed at (a fixed number: see above)

inline bool decode_fits(const AttnParams& p) {
  return p.Lq * (p.Hq / p.Hkv) <= kDecodeRows && p.Lk > 0;
}

inline int64_t decode_splits(const AttnParams& p) {
  const int64_t heads = p.B * p.Hkv;
  const int64_t want = imax(1, kDecodeItems / imax(1, heads));
  return imax(1, imin(want, p.Lk / kSplitMin));
}

// Pointer to row j of a (row, column) slice as A values: the row itself when it
// already is (T == A, unit column stride) and whole vectors stay in bounds,
// else a converted copy in tmp (n values, zero-padded to whole vectors).
template <typename T, typename A>
const A* row_as(const T* base, int64_t rs, int64_t cs, int64_t j, int64_t n, bool direct, A* tmp) {
  if (direct) return reinterpret_cast<const A*>(base + j * rs);
  load_rows(base, rs, cs, j, 1, n, tmp, n);
  return tmp;
}

// sum_e q[e] * k[e] for e < n; q is padded with zeros to whole vectors, k is
// read in whole vectors only below n (the rest one value at a time).
inline float dot_row(const float* q, const float* k, int64_t n) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  V acc = V{};
  int64_t e = 0;
  for (; e + W <= n; e += W)
    acc += *reinterpret_cast<const V*>(q + e) * *reinterpret_cast<const V*>(k + e);
  float tail = 0.f;
  for (; e < n; ++e) tail += q[e] * k[e];
  return hsum(acc) + tail;
}
// The same sum with k in bfloat16, widened in registers (a bfloat16 is the top
// half of a float32): no converted copy of the key row.
inline float dot_row(const float* q, const bf16_t* k, int64_t n) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  typedef uint16_t U16 __attribute__((vector_size(W * 2), aligned(2)));
  typedef uint32_t U32 __attribute__((vector_size(W * 4)));
  V acc = V{};
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    U16 h;
    std::memcpy(&h, k + e, sizeof(h));
    const U32 u = __builtin_convertvector(h, U32) << 16;
    V kv;
    std::memcpy(&kv, &u, sizeof(kv));
    acc += *reinterpret_cast<const V*>(q + e) * kv;
  }
  float tail = 0.f;
  for (; e < n; ++e) tail += q[e] * Elem<bf16_t>::load(k + e);
  return hsum(acc) + tail;
}
template <typename A>
inline A dot_row(const A* q, const A* k, int64_t n) {
  A s = A(0);
  for (int64_t e = 0; e < n; ++e) s += q[e] * k[e];
  return s;
}

// o[r][0:n] = sum_{j<d} p[r][j] * v[j][0:n] for r < rows: the blocked
// kernel's P V product (same KC chunks), in tiles of 2 rows by 4 vectors, so
// that one row still has 4 independent sums (the 6 x 2 tile left a single row
// with 2 dependent FMA chains).  v is read in whole tiles of kDecodeNR columns
// (a caller reading V in place checks n % kDecodeNR == 0); o is padded so.
constexpr int kDecodeNV = 4;
template <typename A>
void pv_rows(const A* p, int64_t lds, int64_t rows, int64_t d, const A* v, int64_t ldv, int64_t n, A* o,
             int64_t ldo) {
  constexpr int64_t NR = kDecodeNV * Vec<A>::kWidth;
  for (int64_t j = 0; j < n; j += NR) {
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2)
      micro_tile<A, 2, kKCSeq, Epi::kStore, false, kDecodeNV>(p + r * lds, lds, v + j, ldv, d, A(1), nullptr,
                                                              o + r * ldo + j, ldo);
    if (r < rows)
      micro_tile<A, 1, kKCSeq, Epi::kStore, false, kDecodeNV>(p + r * lds, lds, v + j, ldv, d, A(1), nullptr,
                                                              o + r * ldo + j, ldo);
  }
}

template <typename T>
void decode_impl(const FwdParams& p) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using W = typename Elem<T>::wide;
  constexpr int64_t NR = kDecodeNV * Vec<A>::kWidth;
  const Visibility vis(p);
  const int64_t group = p.Hq / p.Hkv, rows = group * p.Lq;
  const int64_t E = p.E, Ev = p.Ev, lde = pad_up(E), ldv = cdiv(Ev, NR) * NR;
  const int64_t nsplit = decode_splits(p), heads = p.B * p.Hkv;
  const int64_t chunk = cdiv(p.Lk, nsplit);
  const int64_t lds = pad_up(chunk);
  const A scale = static_cast<A>(p.scale);
  const A ninf = -std::numeric_limits<A>::infinity();
  constexpr bool same = std::is_same<T, A>::value;
  const bool k_direct = same && p.k_st.c == 1;
  // V rows feed the product as its B operand, read in whole register tiles.
  const bool v_direct = same && p.v_st.c == 1 && Ev % NR == 0;
  // Per split and row: the unnormalised output (ldv) and m, l.
  Buffer<A> part(nsplit > 1 ? heads * nsplit * rows * ldv : 0);
  Buffer<L> part_ml(nsplit > 1 ? heads * nsplit * rows * 2 : 0);

  run_parallel(p, heads * nsplit, [&](int64_t begin, int64_t end) {
    Buffer<A> qbuf(rows * lde), s(rows * lds), o(nsplit > 1 ? 0 : rows * ldv), ktmp(lde);
    Buffer<A> vbuf(v_direct ? 0 : chunk * ldv);
    Buffer<A> fac(p.dropout_p > 0.f ? rows * lds : 0), mrow(rows);
    Buffer<L> lrow(rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sp = item % nsplit, bk = item / nsplit;
      const int64_t hk = bk % p.Hkv, b = bk / p.Hkv;
      const int64_t j0 = sp * chunk, nk = imin(chunk, p.Lk - j0);
      const int64_t nkp = pad_up(nk);
      for (int64_t g = 0; g < group; ++g) {
        const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + (hk * group + g) * p.q_st.h;
        load_rows(q, p.q_st.r, p.q_st.c, 0, p.Lq, E, qbuf.data() + g * p.Lq * lde, lde);
      }
      const T* k = head_of<T>(p.k, p.k_st, b, hk);
      for (int64_t j = 0; j < nk; ++j) {
        if constexpr (std::is_same<T, bf16_t>::value && std::is_same<A, float>::value) {
          if (p.k_st.c == 1) {  // widened in registers
            const bf16_t* kr = k + (j0 + j) * p.k_st.r;
            for (int64_t r = 0; r < rows; ++r) s[r * lds + j] = dot_row(qbuf.data() + r * lde, kr, E) * scale;
            continue;
          }
        }
        const A* kr = row_as<T, A>(k, p.k_st.r, p.k_st.c, j0 + j, E, k_direct, ktmp.data());
        for (int64_t r = 0; r < rows; ++r) s[r * lds + j] = dot_row(qbuf.data() + r * lde, kr, E) * scale;
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        A* sg = s.data() + g * p.Lq * lds;
        mask_tile<T, A>(p, vis, b, h, 0, p.Lq, j0, nk, sg, lds, TileMask::kMixed);
        if (p.dropout_p > 0.f) dropout_factors(p, b, h, 0, p.Lq, j0, nk, fac.data() + g * p.Lq * lds, lds);
      }
      L* ml = nsplit > 1 ? part_ml.data() + (bk * nsplit + sp) * rows * 2 : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        A* row = s.data() + r * lds;
        for (int64_t j = nk; j < nkp; ++j) row[j] = ninf;  // padding lanes give exp = 0
        const A m = row_max(row, nkp);
        A l = A(0);
        if (m == ninf) {
          for (int64_t j = 0; j < nkp; ++j) row[j] = A(0);
        } else {
          l = row_exp_sum(row, nkp, m);
        }
        mrow[r] = m;
        lrow[r] = static_cast<L>(l);
        if (p.dropout_p > 0.f)
          for (int64_t j = 0; j < nk; ++j) row[j] *= fac[r * lds + j];
      }
      const T* v = head_of<T>(p.v, p.v_st, b, hk);
      const A* vb;
      int64_t ldb;
      if (v_direct) {
        vb = reinterpret_cast<const A*>(v + j0 * p.v_st.r);
        ldb = p.v_st.r;
      } else {
        load_rows(v, p.v_st.r, p.v_st.c, j0, nk, Ev, vbuf.data(), ldv);
        vb = vbuf.data();
        ldb = ldv;
      }
      A* od = nsplit > 1 ? part.data() + (bk * nsplit + sp) * rows * ldv : o.data();
      pv_rows(s.data(), lds, rows, nk, vb, ldb, Ev, od, ldv);
      if (nsplit > 1) {
        for (int64_t r = 0; r < rows; ++r) {
          ml[2 * r] = static_cast<L>(mrow[r]);
          ml[2 * r + 1] = lrow[r];
        }
        continue;
      }
      for (int64_t r = 0; r < rows; ++r)
        store_out_row<T>(p, b, hk * group + r / p.Lq, r % p.Lq, od + r * ldv, mrow[r], lrow[r]);
    }
  });
  if (nsplit == 1) return;

  // Merge the splits of each row in split order: M = max m_s,
  // l = sum l_s exp(m_s - M), out = sum o_s exp(m_s - M) / l.
  run_parallel(p, heads, [&](int64_t begin, int64_t end) {
    Buffer<L> w(nsplit), acc(Ev);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t hk = bk % p.Hkv, b = bk / p.Hkv;
      for (int64_t r = 0; r < rows; ++r) {
        const L* ml = part_ml.data() + bk * nsplit * rows * 2 + 2 * r;
        L M = -std::numeric_limits<L>::infinity();
        bool nan = false;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const L m = ml[sp * rows * 2], l = ml[sp * rows * 2 + 1];
          nan |= m != m || l != l;
          if (l > L(0) && m > M) M = m;
        }
        L l = L(0);
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const L ms = ml[sp * rows * 2], ls = ml[sp * rows * 2 + 1];
          w[sp] = ls > L(0) ? static_cast<L>(std::exp(static_cast<W>(ms) - static_cast<W>(M))) : L(0);
          l += ls * w[sp];
        }
        if (nan) l = std::numeric_limits<L>::quiet_NaN();
        for (int64_t c = 0; c < Ev; ++c) acc[c] = L(0);
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          if (w[sp] == L(0)) continue;
          const A* os = part.data() + ((bk * nsplit + sp) * rows + r) * ldv;
          for (int64_t c = 0; c < Ev; ++c) acc[c] += static_cast<L>(os[c]) * w[sp];
        }
        store_out_row<T>(p, b, hk * group + r / p.Lq, r % p.Lq, acc.data(), M, l);
      }
    }
  });
}

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
