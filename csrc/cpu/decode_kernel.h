// Forward for short queries (decoding: Lq of 1 to a few rows over a long key
// cache).  The blocked forward (attention_kernel.h) packs K^T and V of a head
// before its first query block; with one query row that copy costs as much as
// the product itself, and B * H work items may be fewer than the threads.
// Here every query row of a kv head's group is served by one pass over the
// keys, straight from the input:
//   s[r][j] = scale * q_r . k_j      (dot products over E, one key row at a time)
//   mask, then per row m = max s, l = sum exp(s - m), p = exp(s - m)
//   o_r = sum_j p[r][j] v_j          (the blocked kernel's P V product, V read in place)
// A split walks its keys in blocks of kDecodeBlock, so that the K and V rows of
// a block are read together (K then V of the whole split was ~10% slower at
// D = 128).  Each block has its own (o, m, l) in the arithmetic type; they
// are merged into the split's (o, m, l) in the lse type (float64 for float32
// inputs): the online softmax's rescale in float32 added a rounding per block,
// enough to push a ring-attention gradient past the parity rule.
// The keys are cut into splits of at least kSplitMin keys, so that B * Hkv
// items become up to kDecodeItems; each split keeps its own (o, m, l) and a
// last pass merges them by log-sum-exp in split order.  The split count is a
// function of the shape only, so results do not depend on the thread count.
#pragma once
#include "seqs.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

constexpr int64_t kDecodeRows = 16;    // query rows per kv head (group * Lq) served here
constexpr int64_t kSplitMin = 512;     // keys per split, at least
constexpr int64_t kDecodeItems = 8;    // work items aimed at (a fixed number: see above)
constexpr int64_t kDecodeBlock = 256;  // keys per block of a split's walk

// Whether the forward of this call (its views: seqs.h) runs here: at most
// kDecodeRows query rows per kv head in every view.  A dense call also needs
// keys (an empty one goes to the blocked kernel); a ragged call's sequences
// may have none (their rows come out 0, lse -inf).
template <typename P>
bool decode_call(const P& call, const std::vector<P>& views) {
  if (call.Hkv == 0) return false;
  for (const P& v : views)
    if (v.Lq * (v.Hq / v.Hkv) > kDecodeRows) return false;
  return is_ragged(call) || call.Lk > 0;
}

// Key splits of view v: enough for kDecodeItems items over the call's
// `heads` kv heads (all views together), at least kSplitMin keys a split; or
// the caller's num_splits.  A function of the shape only.
inline int64_t decode_splits(const AttnParams& v, int64_t heads) {
  if (v.num_splits > 0) return imax(1, imin(v.num_splits, v.Lk));
  const int64_t want = imax(1, kDecodeItems / imax(1, heads));
  return imax(1, imin(want, v.Lk / kSplitMin));
}

// out[r * NK + x] = sum_e q[r * ldq + e] * k[x][e] for e < n, R query rows by
// NK key rows at once: R x NK independent sums the core overlaps (one row at a
// time was a single chain of dependent FMAs), each key vector loaded once for
// the R rows.  q is padded with zeros to whole vectors; k is read in whole
// vectors only below n (the rest one value at a time), bfloat16 keys widened
// in registers.  Each (row, key) sum is the same arithmetic for any R and NK
// (its own FMA chain, then hsum, then the tail), so the backward's rebuilt
// scores (dot_row) are bit for bit the decode's.  R x NK sums stay in
// registers: R = 4 with 32 vector registers, 2 with 16.
constexpr int kDotRows = Vec<float>::kWidth >= 16 ? 4 : 2;
// Keys a pass for the rows left over from kDotRows blocks (every row, with
// one query row per kv head): on AVX2 8, so that a row has 8 independent FMA
// chains (the FMA's latency times its issue width); 4 left it latency-bound,
// at half the AVX-512 rate on keys in L3 (Zen 5).  On AVX-512 4: 8 measured
// 10-20% slower there.
constexpr int kDotKeys = Vec<float>::kWidth >= 16 ? 4 : 8;
template <int R, int NK, typename T>
inline void dot_block(const float* q, int64_t ldq, const T* const* k, int64_t n, float* out) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  V acc[R][NK];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < NK; ++x) acc[r][x] = V{};
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    V kv[NK];
    for (int x = 0; x < NK; ++x) kv[x] = load_vec<V>(k[x] + e);
    for (int r = 0; r < R; ++r) {
      const V qv = *reinterpret_cast<const V*>(q + r * ldq + e);
      for (int x = 0; x < NK; ++x) acc[r][x] += qv * kv[x];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < NK; ++x) {
      float tail = 0.f;
      for (int64_t t = e; t < n; ++t) tail += q[r * ldq + t] * Elem<T>::load(k[x] + t);
      out[r * NK + x] = hsum(acc[r][x]) + tail;
    }
}
template <typename T>
inline float dot_row(const float* q, const T* k, int64_t n) {
  float out;
  dot_block<1, 1>(q, 0, &k, n, &out);
  return out;
}
inline double dot_row(const double* q, const double* k, int64_t n) {
  double s = 0.0;
  for (int64_t e = 0; e < n; ++e) s += q[e] * k[e];
  return s;
}

// o[r][0:n] = sum_{j<d} p[r][j] * v[j][0:n] for r < rows: the blocked
// kernel's P V product (same KC chunks), in tiles of 2 rows by 4 vectors, so
// that one row still has 4 independent sums (the 6 x 2 tile left a single row
// with 2 dependent FMA chains).  v (float, or bfloat16 widened as it is read)
// is read in whole tiles of kDecodeNR columns (a caller reading V in place
// checks n % kDecodeNR == 0); o is padded so.
// On AVX2 a row left over from the pairs takes 8 vectors where n allows (8
// independent sums, as kDotKeys); every column's sum is the same arithmetic
// either way.
constexpr int kDecodeNV = 4;
template <typename A, typename B>
void pv_rows(const A* p, int64_t lds, int64_t rows, int64_t d, const B* v, int64_t ldv, int64_t n, A* o,
             int64_t ldo) {
  constexpr int64_t NR = kDecodeNV * Vec<A>::kWidth;
  const int64_t r1 = rows / 2 * 2;  // the row left over, if any
  for (int64_t j = 0; j < n; j += NR) {
    for (int64_t r = 0; r < r1; r += 2)
      micro_tile<A, 2, kKCSeq, Epi::kStore, false, kDecodeNV, B>(p + r * lds, lds, v + j, ldv, d, A(1),
                                                                 nullptr, o + r * ldo + j, ldo);
    if (r1 == rows) continue;
    if (Vec<A>::kWidth == 8 && n % (2 * NR) == 0) {
      if (j % (2 * NR) == 0)
        micro_tile<A, 1, kKCSeq, Epi::kStore, false, 2 * kDecodeNV, B>(p + r1 * lds, lds, v + j, ldv, d, A(1),
                                                                       nullptr, o + r1 * ldo + j, ldo);
    } else {
      micro_tile<A, 1, kKCSeq, Epi::kStore, false, kDecodeNV, B>(p + r1 * lds, lds, v + j, ldv, d, A(1),
                                                                 nullptr, o + r1 * ldo + j, ldo);
    }
  }
}

// Adds a block's (o_b, m_b, l_b) of one row into the running (o, m, l), all
// kept in L: with M = max(m, m_b), o = o exp(m - M) + o_b exp(m_b - M), the
// same for l.  The exponentials are taken in the wide type.  A NaN m_b makes
// the row NaN (l), as in the blocked kernel.
template <typename A, typename L, typename W>
inline void merge_block(const A* ob, A mb, A lb, int64_t n, L* o, L& m, L& l) {
  if (mb != mb) {
    m = l = std::numeric_limits<L>::quiet_NaN();
    return;
  }
  if (l != l || lb == A(0)) return;  // row already NaN, or nothing visible in the block
  L w = L(1);
  if (static_cast<L>(mb) > m) {
    const L f = l > L(0) ? static_cast<L>(std::exp(static_cast<W>(m) - static_cast<W>(mb))) : L(0);
    for (int64_t c = 0; c < n; ++c) o[c] *= f;
    l *= f;
    m = static_cast<L>(mb);
  } else if (static_cast<L>(mb) < m) {
    w = static_cast<L>(std::exp(static_cast<W>(mb) - static_cast<W>(m)));
  }
  for (int64_t c = 0; c < n; ++c) o[c] += static_cast<L>(ob[c]) * w;
  l += static_cast<L>(lb) * w;
}

// Scratch of one thread's range of decode items, sized for the call's longest sequence.
template <typename T>
struct DecodeScratch {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  Buffer<A> qbuf, s, ob, ktmp, vbuf, fac, mb, lb;
  Buffer<L> o, mrow, lrow;
  DecodeScratch(int64_t rows, int64_t lde, int64_t lds, int64_t ldv, bool v_direct, bool drop)
      : qbuf(rows * lde), s(rows * lds), ob(rows * ldv), ktmp(lde), vbuf(v_direct ? 0 : lds * ldv),
        fac(drop ? rows * lds : 0), mb(rows), lb(rows), o(rows * ldv), mrow(rows), lrow(rows) {}
};

// One view's decode layout: splits, keys per split, score row stride, and
// where its splits' partials start in the call's buffers.
struct DecodeView {
  int64_t nsplit, chunk, lds, part, ml;
};

template <typename T>
void decode_impl(const FwdParams& call, const std::vector<FwdParams>& views) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using W = typename Elem<T>::wide;
  constexpr int64_t NR = kDecodeNV * Vec<A>::kWidth;
  const int64_t group = call.Hq / call.Hkv, rows_max = group * call.Lq;
  const int64_t E = call.E, Ev = call.Ev, lde = pad_up(E), ldv = cdiv(Ev, NR) * NR;
  const A scale = static_cast<A>(call.scale);
  const A ninf = -std::numeric_limits<A>::infinity();
  // float32 and bfloat16 (widened as loaded) key and value rows are read in
  // place; V rows feed the product as its B operand, in whole register tiles.
  constexpr bool kInPlace = std::is_same<A, float>::value && (std::is_same<T, A>::value ||
                                                              std::is_same<T, bf16_t>::value);
  const bool k_direct = kInPlace && call.k_st.c == 1;
  const bool v_direct = kInPlace && call.v_st.c == 1 && Ev % NR == 0;
  int64_t heads = 0;
  for (const FwdParams& v : views) heads += v.B * v.Hkv;
  // Per view: its splits; per split and row, the unnormalised output (ldv) and m, l.
  std::vector<DecodeView> dv(views.size());
  int64_t part_n = 0, ml_n = 0, lds_max = 0;
  bool any_split = false;
  for (size_t x = 0; x < views.size(); ++x) {
    const FwdParams& v = views[x];
    const int64_t nsplit = decode_splits(v, heads), chunk = cdiv(v.Lk, nsplit);
    dv[x] = DecodeView{nsplit, chunk, imin(kDecodeBlock, pad_up(chunk)), part_n, ml_n};
    lds_max = imax(lds_max, dv[x].lds);
    if (nsplit > 1) {
      any_split = true;
      part_n += v.B * v.Hkv * nsplit * group * v.Lq * ldv;
      ml_n += v.B * v.Hkv * nsplit * group * v.Lq * 2;
    }
  }
  Buffer<L> part(part_n, Init::kUninit), part_ml(ml_n, Init::kUninit);
  const std::vector<int64_t> start = item_starts(views, [&](const FwdParams& v) {
    return v.Lq == 0 ? 0 : v.B * v.Hkv * dv[&v - views.data()].nsplit;
  });

  std::vector<double> cost;  // of one item of each view of a ragged call: its rows x keys of a split
  for (size_t x = 0; x < views.size(); ++x)
    cost.push_back(static_cast<double>(group * views[x].Lq) * (dv[x].chunk + 16));
  run_views(call, start, [&] {
    return DecodeScratch<T>(rows_max, lde, lds_max, ldv, v_direct, call.dropout_p > 0.f);
  }, [&](DecodeScratch<T>& sc, int64_t x, int64_t begin, int64_t end) {
    const FwdParams& p = views[x];
    const Visibility vis(p);
    const int64_t rows = group * p.Lq, nsplit = dv[x].nsplit, chunk = dv[x].chunk, lds = dv[x].lds;
    const Span<A> qbuf(sc.qbuf), s(sc.s), ob(sc.ob), ktmp(sc.ktmp), vbuf(sc.vbuf), fac(sc.fac), mb(sc.mb), lb(sc.lb);
    const Span<L> mrow(sc.mrow), lrow(sc.lrow);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sp = item % nsplit, bk = item / nsplit;
      const int64_t hk = bk % p.Hkv, b = bk / p.Hkv;
      const int64_t j0 = sp * chunk, nk = imax(0, imin(chunk, p.Lk - j0));
      for (int64_t g = 0; g < group; ++g) {
        const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + (hk * group + g) * p.q_st.h;
        load_rows(q, p.q_st.r, p.q_st.c, 0, p.Lq, E, qbuf.data() + g * p.Lq * lde, lde);
      }
      const T* k = head_of<T>(p.k, p.k_st, b, hk);
      const T* v = head_of<T>(p.v, p.v_st, b, hk);
      L* od = nsplit > 1 ? part.data() + dv[x].part + (bk * nsplit + sp) * rows * ldv : sc.o.data();
      for (int64_t r = 0; r < rows; ++r) {
        mrow[r] = -std::numeric_limits<L>::infinity();
        lrow[r] = L(0);
        for (int64_t c = 0; c < ldv; ++c) od[r * ldv + c] = L(0);
      }
      // The split's keys in blocks of kDecodeBlock: scores, the block's
      // softmax, P V, then the block merged into the split's (o, m, l).
      for (int64_t c0 = 0, nc = 0; c0 < nk; c0 += nc) {
        const int64_t jb = j0 + c0;
        nc = imin(kDecodeBlock, nk - c0);
        // The block's first key and value rows; a paged cache's blocks end at its page ends.
        const T* kb = k + jb * p.k_st.r;
        const T* vb = v + jb * p.v_st.r;
        if (p.block_table != nullptr) {
          const int64_t page = p.block_table[jb / p.page_size], in = jb % p.page_size;
          nc = imin(nc, p.page_size - in);
          kb = k + page * p.k_st.b + in * p.k_st.r;
          vb = v + page * p.v_st.b + in * p.v_st.r;
        }
        const int64_t ncp = pad_up(nc);
        int64_t j = 0;
        if constexpr (kInPlace) {
          if (k_direct) {  // key rows read in place, kDotKeys at a time
            for (; j + kDotKeys <= nc; j += kDotKeys) {
              const T* kr[kDotKeys];
              for (int y = 0; y < kDotKeys; ++y) kr[y] = kb + (j + y) * p.k_st.r;
              int64_t r = 0;
              for (; r + kDotRows <= rows; r += kDotRows)
                for (int y0 = 0; y0 < kDotKeys; y0 += 4) {
                  float d[kDotRows * 4];
                  dot_block<kDotRows, 4>(qbuf.data() + r * lde, lde, kr + y0, E, d);
                  for (int i = 0; i < kDotRows; ++i)
                    for (int y = 0; y < 4; ++y) s[(r + i) * lds + j + y0 + y] = d[i * 4 + y] * scale;
                }
              for (; r < rows; ++r) {
                float dk[kDotKeys];
                dot_block<1, kDotKeys>(qbuf.data() + r * lde, lde, kr, E, dk);
                for (int y = 0; y < kDotKeys; ++y) s[r * lds + j + y] = dk[y] * scale;
              }
            }
            for (; j < nc; ++j) {
              const T* kr = kb + j * p.k_st.r;
              for (int64_t r = 0; r < rows; ++r) s[r * lds + j] = dot_row(qbuf.data() + r * lde, kr, E) * scale;
            }
          }
        }
        for (; j < nc; ++j) {  // other dtypes and strides: a converted copy of the row
          load_rows(kb, p.k_st.r, p.k_st.c, j, 1, E, ktmp.data(), E);
          for (int64_t r = 0; r < rows; ++r)
            s[r * lds + j] = dot_row(qbuf.data() + r * lde, static_cast<const A*>(ktmp.data()), E) * scale;
        }
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          A* sg = s.data() + g * p.Lq * lds;
          mask_tile<T, A>(p, vis, b, h, 0, p.Lq, jb, nc, sg, lds, TileMask::kMixed);
          if (p.dropout_p > 0.f) dropout_factors(p, b, h, 0, p.Lq, jb, nc, fac.data() + g * p.Lq * lds, lds);
        }
        for (int64_t r = 0; r < rows; ++r) {
          A* row = s.data() + r * lds;
          for (int64_t jj = nc; jj < ncp; ++jj) row[jj] = ninf;  // padding lanes give exp = 0
          mb[r] = row_max(row, ncp);
          lb[r] = A(0);
          if (mb[r] == ninf) {  // nothing visible in this block's row
            for (int64_t jj = 0; jj < ncp; ++jj) row[jj] = A(0);
            continue;
          }
          lb[r] = row_exp_sum(row, ncp, mb[r]);
          if (p.dropout_p > 0.f)
            for (int64_t jj = 0; jj < nc; ++jj) row[jj] *= fac[r * lds + jj];
        }
        if constexpr (kInPlace) {
          if (v_direct) pv_rows(s.data(), lds, rows, nc, vb, p.v_st.r, Ev, ob.data(), ldv);
        }
        if (!v_direct) {
          load_rows(vb, p.v_st.r, p.v_st.c, 0, nc, Ev, vbuf.data(), ldv);
          pv_rows(s.data(), lds, rows, nc, static_cast<const A*>(vbuf.data()), ldv, Ev, ob.data(), ldv);
        }
        for (int64_t r = 0; r < rows; ++r)
          merge_block<A, L, W>(ob.data() + r * ldv, mb[r], lb[r], Ev, od + r * ldv, mrow[r], lrow[r]);
      }
      if (nsplit > 1) {
        L* ml = part_ml.data() + dv[x].ml + (bk * nsplit + sp) * rows * 2;
        for (int64_t r = 0; r < rows; ++r) {
          ml[2 * r] = mrow[r];
          ml[2 * r + 1] = lrow[r];
        }
        continue;
      }
      for (int64_t r = 0; r < rows; ++r)
        store_out_row<T>(p, b, hk * group + r / p.Lq, r % p.Lq, od + r * ldv, mrow[r], lrow[r]);
    }
  }, is_ragged(call) ? &cost : nullptr);
  if (!any_split) return;

  // Merge the splits of each row in split order: M = max m_s,
  // l = sum l_s exp(m_s - M), out = sum o_s exp(m_s - M) / l.
  const std::vector<int64_t> heads_at = item_starts(views, [&](const FwdParams& v) {
    return dv[&v - views.data()].nsplit > 1 && v.Lq > 0 ? v.B * v.Hkv : 0;
  });
  int64_t nsplit_max = 1;
  for (const DecodeView& d : dv) nsplit_max = imax(nsplit_max, d.nsplit);
  struct MergeScratch {
    Buffer<L> w, acc;
    MergeScratch(int64_t n, int64_t ev) : w(n), acc(ev) {}
  };
  run_views(call, heads_at, [&] { return MergeScratch(nsplit_max, Ev); },
            [&](MergeScratch& ms, int64_t x, int64_t begin, int64_t end) {
    const FwdParams& p = views[x];
    const int64_t rows = group * p.Lq, nsplit = dv[x].nsplit;
    const Span<L> w(ms.w), acc(ms.acc);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t hk = bk % p.Hkv, b = bk / p.Hkv;
      for (int64_t r = 0; r < rows; ++r) {
        const L* ml = part_ml.data() + dv[x].ml + bk * nsplit * rows * 2 + 2 * r;
        L M = -std::numeric_limits<L>::infinity();
        bool nan = false;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const L m = ml[sp * rows * 2], l = ml[sp * rows * 2 + 1];
          nan |= m != m || l != l;
          if (l > L(0) && m > M) M = m;
        }
        L l = L(0);
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const L ms_ = ml[sp * rows * 2], ls = ml[sp * rows * 2 + 1];
          w[sp] = ls > L(0) ? static_cast<L>(std::exp(static_cast<W>(ms_) - static_cast<W>(M))) : L(0);
          l += ls * w[sp];
        }
        if (nan) l = std::numeric_limits<L>::quiet_NaN();
        for (int64_t c = 0; c < Ev; ++c) acc[c] = L(0);
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          if (w[sp] == L(0)) continue;
          const L* os = part.data() + dv[x].part + ((bk * nsplit + sp) * rows + r) * ldv;
          for (int64_t c = 0; c < Ev; ++c) acc[c] += os[c] * w[sp];
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
