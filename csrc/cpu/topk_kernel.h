// Fused hard (top-k) attention: each query row attends to its top_k highest
// visible scores only, softmax over those.
//
//   forward : per query block, the score tiles of the dense forward (the
//             same packed K^T, micro-kernel and mask_tile) stream through a
//             per-row candidate list of at most 2 top_k (score, key) pairs:
//             a score enters only if it beats the row's current k-th best,
//             and a full list is cut back to its top_k (keep_best), so no
//             row ever holds more than 2 top_k scores.  The kept entries are
//             then the row's softmax.  The chosen keys are saved, (B, Hq, Lq, top_k) int32
//             (-1 in unused slots): O(Lq * top_k) memory instead of the
//             (Lq, Lk) score matrix.
//   backward: straight-through, over the saved keys only: P = exp(s - lse)
//             recomputed per chosen key (and normalised over them), dS = P (dP - rowsum(P dP)), then dQ
//             and the scattered dK, dV.  O(Lq * top_k * (E + Ev)) work.
// Ordering: a higher score first; equal scores, the lower key index first (the
// order of a stable descending sort); NaN ranks above everything, so a NaN
// score is chosen and makes its row NaN, as in the dense softmax.  Hidden keys
// (-inf) are never chosen; a row with fewer visible keys keeps them all.
// Built once per ISA (isa_build.h); everything here but the two entry points
// has internal linkage.
#pragma once
#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// (s1, j1) comes before (s2, j2) in the selection order.
template <typename A>
inline bool ranks_before(A s1, int32_t j1, A s2, int32_t j2) {
  const bool n1 = s1 != s1, n2 = s2 != s2;
  if (n1 || n2) return n1 && (!n2 || j1 < j2);
  return s1 > s2 || (s1 == s2 && j1 < j2);
}

// Does any of the vector of scores at row beat t (or is NaN)?
template <typename A>
inline bool any_passes(const A* row, A t) {
  using V = typename Vec<A>::type;
  const V r = *reinterpret_cast<const V*>(row);
  const auto m = (r > t) | (r != r);
  bool any = false;
  for (int l = 0; l < Vec<A>::kWidth; ++l) any |= m[l] != 0;
  return any;
}

template <typename A>
struct Entry {
  A s;
  int32_t j;
};

template <typename A>
inline bool ranks_before(const Entry<A>& a, const Entry<A>& b) { return ranks_before(a.s, a.j, b.s, b.j); }

// Keeps the top_k entries of a row's candidate list cand[0, n) at its front, the k-th best at
// cand[top_k - 1], and returns how many there are.  Quickselect (median-of-three pivots, Hoare
// partition): O(n) expected; the order is strict and total (keys differ), so no entry equals
// the pivot but itself.  (Written here rather than std::nth_element so that it is compiled for
// this file's ISA with the comparison inlined.)
template <typename A>
inline int64_t keep_best(Entry<A>* a, int64_t n, int64_t top_k) {
  if (n <= top_k) return n;
  const int64_t want = top_k - 1;
  int64_t lo = 0, hi = n - 1;
  auto swap = [a](int64_t x, int64_t y) {
    const Entry<A> t = a[x];
    a[x] = a[y];
    a[y] = t;
  };
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ranks_before(a[mid], a[lo])) swap(mid, lo);
    if (ranks_before(a[hi], a[lo])) swap(hi, lo);
    if (ranks_before(a[hi], a[mid])) swap(hi, mid);
    const Entry<A> pivot = a[mid];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (ranks_before(a[i], pivot)) ++i;
      while (ranks_before(pivot, a[j])) --j;
      if (i <= j) swap(i++, j--);
    }
    // [lo, j] ranks before the pivot, [i, hi] after it, anything between is the pivot.
    if (want <= j) hi = j;
    else if (want >= i) lo = i;
    else break;
  }
  return top_k;
}

template <typename T>
void topk_fwd_impl(const TopkParams& p) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using W = typename Elem<T>::wide;
  const Visibility vis(p);
  const int64_t nqb = cdiv(p.Lq, kBlockQ), group = p.Hq / p.Hkv;
  const int64_t E = p.E, Ev = p.Ev, Lk = p.Lk, K = p.top_k, nkb = cdiv(Lk, kBlockK);
  constexpr int64_t VW = Vec<A>::kWidth;
  const A scale = static_cast<A>(p.scale);
  const A ninf = -std::numeric_limits<A>::infinity();

  run_parallel(p, p.B * p.Hq * nqb, [&](int64_t begin, int64_t end) {
    // Per row: up to 2 top_k candidates and the score a new key must beat.  Once a row has
    // top_k entries that is the k-th best score: an equal later score ranks after it (higher
    // index), so the test is strict and most scores fail it at one compare.
    Buffer<A> kt(nkb * E * kBlockK), vbuf(Lk * Ev), qbuf(kBlockQ * E), sc(kBlockQ * kBlockK), thr(kBlockQ),
        acc(Ev), pe(K);
    Buffer<Entry<A>> cand(kBlockQ * 2 * K);
    Buffer<int64_t> count(kBlockQ);
    int64_t packed = -1;  // b * Hkv + hk of the packed K^T and V
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, bh = item / nqb;
      const int64_t h = bh % p.Hq, b = bh / p.Hq, hk = h / group;
      const int64_t i0 = qb * kBlockQ, nq = imin(kBlockQ, p.Lq - i0);
      if (packed != b * p.Hkv + hk) {
        pack_kt_v<T>(p, b, hk, kt.data(), vbuf.data(), Ev);
        packed = b * p.Hkv + hk;
      }
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
      load_rows(q, p.q_st.r, p.q_st.c, i0, nq, E, qbuf.data(), E);
      for (int64_t i = 0; i < nq; ++i) {
        count[i] = 0;
        thr[i] = ninf;  // hidden keys (-inf) never pass
      }
      int64_t jlo, jhi;
      vis.block_cols(i0, nq, jlo, jhi);
      // Pass 1: every visible score of the block, tile by tile, filtered into the candidate lists.
      for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += kBlockK) {
        const int64_t nk = imin(kBlockK, jhi - j0);
        const TileMask tm = classify_tile<T>(p, b, h, i0, nq, j0, nk);
        if (tm == TileMask::kHidden) continue;
        matmul_tile<kKCHead>(qbuf.data(), E, nq, E, kt.data() + j0 * E, kBlockK, nk, scale, sc.data(), kBlockK);
        mask_tile<T, A>(p, vis, b, h, i0, nq, j0, nk, sc.data(), kBlockK, tm);
        for (int64_t i = 0; i < nq; ++i) {
          Entry<A>* c = cand.data() + i * 2 * K;
          const A* row = sc.data() + i * kBlockK;
          A t = thr[i];
          int64_t n = count[i];
          for (int64_t x0 = 0; x0 < nk; x0 += VW) {
            const int64_t x1 = imin(nk, x0 + VW);
            if (x1 - x0 == VW && !any_passes(row + x0, t)) continue;  // the common case at large L
            for (int64_t x = x0; x < x1; ++x) {
              if (!(row[x] > t) && row[x] == row[x]) continue;  // NaN ranks first: always a candidate
              c[n++] = Entry<A>{row[x], static_cast<int32_t>(j0 + x)};
              if (n == 2 * K) {
                n = keep_best(c, n, K);
                t = c[K - 1].s;  // keep_best put the k-th best there
              }
            }
          }
          thr[i] = t;
          count[i] = n;
        }
      }
      // Pass 2: softmax over each row's kept entries, out = P V.
      T* out = static_cast<T*>(p.out) + (b * p.Hq + h) * p.Lq * Ev;
      L* lse = static_cast<L*>(p.lse) + (b * p.Hq + h) * p.Lq;
      int32_t* idx = p.idx + (b * p.Hq + h) * p.Lq * K;
      for (int64_t i = 0; i < nq; ++i) {
        Entry<A>* c = cand.data() + i * 2 * K;
        const int64_t n = keep_best(c, count[i], K);
        int32_t* irow = idx + (i0 + i) * K;
        for (int64_t t = 0; t < K; ++t) irow[t] = t < n ? c[t].j : -1;
        A m = ninf;
        for (int64_t t = 0; t < n; ++t) m = (c[t].s > m || c[t].s != c[t].s) ? c[t].s : m;  // NaN wins
        L l = L(0);
        for (int64_t t = 0; t < n; ++t) {
          pe[t] = static_cast<A>(std::exp(static_cast<W>(c[t].s) - static_cast<W>(m)));
          l += static_cast<L>(pe[t]);
        }
        for (int64_t x = 0; x < Ev; ++x) acc[x] = A(0);
        for (int64_t t = 0; t < n; ++t) {
          const A e = pe[t];
          const A* vr = vbuf.data() + static_cast<int64_t>(c[t].j) * Ev;
#pragma omp simd
          for (int64_t x = 0; x < Ev; ++x) acc[x] += e * vr[x];
        }
        // One rounding: out = acc / l in the lse precision.
        const L inv = l != l ? l : l > L(0) ? L(1) / l : L(0);  // no visible key: out 0; NaN row: NaN
        T* orow = out + (i0 + i) * Ev;
        for (int64_t x = 0; x < Ev; ++x) Elem<T>::store(orow + x, static_cast<A>(static_cast<L>(acc[x]) * inv));
        lse[i0 + i] = l > L(0) ? static_cast<L>(static_cast<W>(m) + std::log(static_cast<W>(l)))
                      : l != l ? l : -std::numeric_limits<L>::infinity();
      }
    }
  });
}

// One work item per (batch, kv head): it owns that head's dK and dV, so the
// rows of every query head of its group scatter into them without atomics.
template <typename T>
void topk_bwd_impl(const TopkParams& p) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using W = typename Elem<T>::wide;
  const int64_t group = p.Hq / p.Hkv, E = p.E, Ev = p.Ev, Lk = p.Lk, K = p.top_k;
  const A scale = static_cast<A>(p.scale);
  const bool bias = p.mask_kind == MaskKind::additive;

  run_parallel(p, p.B * p.Hkv, [&](int64_t begin, int64_t end) {
    Buffer<A> kbuf(Lk * E), vbuf(Lk * Ev), dk(Lk * E), dv(Lk * Ev), qr(E), dor(Ev), dq(E), pr(K), ds(K);
    Buffer<L> ew(K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t hk = item % p.Hkv, b = item / p.Hkv;
      load_rows(head_of<T>(p.k, p.k_st, b, hk), p.k_st.r, p.k_st.c, 0, Lk, E, kbuf.data(), E);
      load_rows(head_of<T>(p.v, p.v_st, b, hk), p.v_st.r, p.v_st.c, 0, Lk, Ev, vbuf.data(), Ev);
      dk.zero();
      dv.zero();
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g, bh = b * p.Hq + h;
        const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
        const T* dout = static_cast<const T*>(p.dout) + bh * p.Lq * Ev;
        const L* lse = static_cast<const L*>(p.lse) + bh * p.Lq;
        const L* dlse = p.dlse != nullptr ? static_cast<const L*>(p.dlse) + bh * p.Lq : nullptr;
        const int32_t* idx = p.idx + bh * p.Lq * K;
        T* dqp = static_cast<T*>(p.dq) + bh * p.Lq * E;
        for (int64_t i = 0; i < p.Lq; ++i) {
          const int32_t* js = idx + i * K;
          int64_t n = 0;
          while (n < K && js[n] >= 0) ++n;
          for (int64_t e = 0; e < E; ++e) dq[e] = A(0);
          if (n > 0) {
            for (int64_t e = 0; e < E; ++e) qr[e] = Elem<T>::load(q + i * p.q_st.r + e * p.q_st.c);
            for (int64_t c = 0; c < Ev; ++c) dor[c] = Elem<T>::load(dout + i * Ev + c);
            // P of each kept entry from the saved lse, normalised over the kept entries (their sum
            // is 1 up to rounding; dividing by it makes a lone key's P exactly 1, so its dS is
            // exactly 0 as in the reference, though s is recomputed in another rounding order),
            // dP = dO . v_j, delta = rowsum(P dP).
            L psum = L(0);
            for (int64_t t = 0; t < n; ++t) {
              const A* kr = kbuf.data() + js[t] * E;
              const A* vr = vbuf.data() + js[t] * Ev;
              A s = A(0), dp = A(0);
#pragma omp simd reduction(+ : s)
              for (int64_t e = 0; e < E; ++e) s += qr[e] * kr[e];
              s *= scale;
              if (bias) {
                const T* m = static_cast<const T*>(p.mask) + b * p.mask_st.b + h * p.mask_st.h +
                             i * p.mask_st.r + js[t] * p.mask_st.c;
                s += static_cast<A>(Elem<T>::load(m));
              }
#pragma omp simd reduction(+ : dp)
              for (int64_t c = 0; c < Ev; ++c) dp += dor[c] * vr[c];
              ew[t] = static_cast<L>(std::exp(static_cast<W>(s) - static_cast<W>(lse[i])));
              psum += ew[t];
              ds[t] = dp;
            }
            A delta = A(0);
            for (int64_t t = 0; t < n; ++t) {
              pr[t] = static_cast<A>(ew[t] / psum);
              delta += pr[t] * ds[t];
            }
            if (dlse != nullptr) delta -= static_cast<A>(dlse[i]);  // d lse / d s = P
            for (int64_t t = 0; t < n; ++t) {
              const A d = pr[t] * (ds[t] - delta) * scale;
              const A* kr = kbuf.data() + js[t] * E;
              A* dkr = dk.data() + js[t] * E;
              A* dvr = dv.data() + js[t] * Ev;
#pragma omp simd
              for (int64_t e = 0; e < E; ++e) {
                dq[e] += d * kr[e];
                dkr[e] += d * qr[e];
              }
              const A pt = pr[t];
#pragma omp simd
              for (int64_t c = 0; c < Ev; ++c) dvr[c] += pt * dor[c];
            }
          }
          store_all(dqp + i * E, dq.data(), E);
        }
      }
      store_kv_grads<T>(p, b, hk, dk.data(), dv.data(), p.E, p.Ev);
    }
  });
}

}  // namespace

ATTNFAST_BY_DTYPE_ENTRY(topk_fwd, TopkParams, topk_fwd_impl)
ATTNFAST_BY_DTYPE_ENTRY(topk_bwd, TopkParams, topk_bwd_impl)

}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
