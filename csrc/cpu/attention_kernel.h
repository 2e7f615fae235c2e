// Fused attention on the CPU: FlashAttention-2 forward and backward.
//
// Built once per ISA (isa_build.h) from the pieces of tile_ops.h and simd.h;
// everything here but the two entry points has internal linkage.
//
// Algorithm (Dao, "FlashAttention-2", 2023), per (batch, head):
//   forward : for each query block (kBlockQ rows) walk the visible key blocks
//             (kBlockK columns) once, keeping a running row max m, row sum l and
//             an unnormalised output accumulator; scores never exist beyond one
//             (kBlockQ, kBlockK) tile, so memory is O(L) beyond inputs/outputs.
//   backward: per query block, recompute P = exp(S - lse) tile by tile from
//             the saved lse, take delta = rowsum(P * dP), then accumulate dQ
//             for the block and dK, dV for the whole head (see bwd_impl).
// All arithmetic is in Elem<T>::acc (float, or double for float64 inputs).
#pragma once
#include "decode_kernel.h"
#include "pair_products.h"
#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// ----------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------
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
// bf16 and f16 inputs keep lse in float: s - lse in float and the vector exp
// (its error, a few float ulp, is far below these inputs' rounding).  The
// generic loop above took libm's scalar expf here: a quarter of the bf16
// backward's time.
inline void recompute_p(float* row, int64_t n, float lse) { softmax_row_f32(row, n, lse); }

// Scratch of one thread's range of forward items, sized for the call's
// longest sequence (p.Lq, p.Lk), so that it serves every view of the call.
// K^T (E, Lk) and V (Lk, Ev) of one kv head are packed once and reused by
// every query block of that head the range runs (items come in order).  K^T
// is stored tile-major, (nkb, E, kBlockK): one key tile is one contiguous
// 32 KiB block (E = 64; see pack_tiles_t).  Not zeroed (Init::kUninit): what
// the products read beyond the packed keys, values and queries lands only in
// padding lanes, which are set to -inf before the softmax (scores) or never
// stored (output columns past Ev); acc is zeroed per item.
template <typename T>
struct FwdScratch {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  Buffer<A> kt, vbuf, qbuf, sc, acc, mrow, mnew, alpha;
  // Row sums in the lse precision: the saved lse = m + log(l) is what the
  // backward rebuilds P from, so its error lands on every gradient.
  Buffer<L> lrow;
  Buffer<A> fac;
  // bfloat16 on AVX-512 (PairPath<T>::on): K^T, V, the query block and P as
  // the pair products read them, in place of kt, vbuf and qbuf.
  Buffer<uint16_t> kt2, v2, q2, p2;
  static constexpr bool kPairs = PairPath<T>::on;
  explicit FwdScratch(const FwdParams& p)
      : kt(kPairs ? 0 : cdiv(p.Lk, kBlockK) * p.E * kBlockK, Init::kUninit),
        vbuf(kPairs ? 0 : cdiv(p.Lk, kBlockK) * kBlockK * pad_up(p.Ev), Init::kUninit),
        qbuf(kPairs ? 0 : imin(kBlockQ, p.Lq) * p.E, Init::kUninit),
        sc(imin(kBlockQ, p.Lq) * fwd_key_tiles() * kBlockK, Init::kUninit),
        acc(imin(kBlockQ, p.Lq) * pad_up(p.Ev), Init::kUninit),
        mrow(pad_up(imin(kBlockQ, p.Lq))),
        mnew(pad_up(imin(kBlockQ, p.Lq))),
        alpha(pad_up(imin(kBlockQ, p.Lq))),
        lrow(imin(kBlockQ, p.Lq)),
        fac(p.dropout_p > 0.f ? imin(kBlockQ, p.Lq) * fwd_key_tiles() * kBlockK : 0),
        kt2(kPairs ? cdiv(p.Lk, kBlockK) * even_up(p.E) * kBlockK : 0, Init::kUninit),
        v2(kPairs ? cdiv(p.Lk, kBlockK) * kBlockK * pad_up(p.Ev) : 0, Init::kUninit),
        q2(kPairs ? imin(kBlockQ, p.Lq) * even_up(p.E) : 0, Init::kUninit),
        p2(kPairs ? imin(kBlockQ, p.Lq) * fwd_key_tiles() * kBlockK : 0, Init::kUninit) {}
};

inline int64_t fwd_items_of(const AttnParams& p) { return p.B * p.Hq * cdiv(p.Lq, kBlockQ); }

// Forward items [begin, end) of one dense problem p: item = (batch, head, query block).
template <typename T>
void fwd_items(const FwdParams& p, TileTable<T>& table, FwdScratch<T>& s, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using PP = PairPath<T>;
  const Visibility vis(p);
  const int64_t nqb = cdiv(p.Lq, kBlockQ);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t E = p.E, Ev = p.Ev, ldv = pad_up(Ev);
  const A scale = static_cast<A>(p.scale);
  const A ninf = -std::numeric_limits<A>::infinity();
  // Key blocks of the softmax: ntile packed tiles (fwd_key_tiles), ldk keys.
  const int64_t ntile = fwd_key_tiles(), ldk = ntile * kBlockK;
  const Span<A> kt(s.kt), vbuf(s.vbuf), qbuf(s.qbuf), sc(s.sc), acc(s.acc), mrow(s.mrow), mnew(s.mnew),
      alpha(s.alpha), fac(s.fac);
  const Span<L> lrow(s.lrow);
  int64_t packed = -1;  // b * Hkv + hk of the current packs
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
      if constexpr (PP::on) PP::pack_kv(p, b, hk, s.kt2.data(), s.v2.data(), ldv);
      else pack_kt_v<T>(p, b, hk, kt.data(), vbuf.data(), ldv);  // (nkb, E, kBlockK) and (Lk, Ev)
      packed = b * p.Hkv + hk;
    }
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
    if constexpr (PP::on) PP::load_q(q, p.q_st, i0, nq, E, s.q2.data());
    else load_rows(q, p.q_st.r, p.q_st.c, i0, nq, E, qbuf.data(), E);  // (nq, E)
    for (int64_t i = 0; i < nq; ++i) { mrow[i] = ninf; lrow[i] = L(0); }
    std::fill(acc.data(), acc.data() + nq * ldv, A(0));  // the rows this block uses

    int64_t jlo, jhi;  // keys visible to any row of this block
    vis.block_cols(i0, nq, jlo, jhi);
    // Blocks of ntile key tiles, aligned to the packing; columns of the first
    // tile left of jlo are invisible to every row and get -inf from mask_tile.
    for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += ldk) {
      const int64_t nk = imin(ldk, jhi - j0);
      // Scores tile by tile; a tile the mask hides entirely gets no product
      // and no P V term, and the softmax covers only the columns from the
      // first to the last shown tile (hidden ones between them are -inf).
      TileMask tms[kFwdTilesMax];
      int64_t tds[kFwdTilesMax] = {};
      int64_t t_lo = -1, t_hi = 0;
      for (int64_t t = 0; t * kBlockK < nk; ++t) {
        if (table.active()) {
          tms[t] = table.at(b, h, qb, j0 / kBlockK + t);
          tds[t] = table.lower_d(b, h, qb, j0 / kBlockK + t);
        } else {
          tms[t] = classify_tile<T>(p, b, h, i0, nq, j0 + t * kBlockK, imin(kBlockK, nk - t * kBlockK));
        }
        if (tms[t] != TileMask::kHidden) {
          if (t_lo < 0) t_lo = t;
          t_hi = t + 1;
        }
      }
      if (t_lo < 0) continue;
      for (int64_t t = t_lo; t < t_hi; ++t) {
        const int64_t jt = j0 + t * kBlockK, nt = imin(kBlockK, nk - t * kBlockK);
        A* st = sc.data() + t * kBlockK;
        if (tms[t] == TileMask::kHidden) {
          for (int64_t i = 0; i < nq; ++i)
            for (int64_t j = 0; j < kBlockK; ++j) st[i * ldk + j] = ninf;
          continue;
        }
        if constexpr (PP::on) PP::scores(s.q2.data(), nq, E, s.kt2.data(), jt, nt, scale, st, ldk);
        else matmul_tile<kKCHead>(qbuf.data(), E, nq, E, kt.data() + jt * E, kBlockK, nt, scale, st, ldk);
        mask_tile<T, A>(p, vis, b, h, i0, nq, jt, nt, st, ldk, tms[t], tds[t]);
      }
      // The softmax's columns [c0, c1): whole vectors, padding lanes -inf.
      const int64_t c0 = t_lo * kBlockK, c1 = imin(t_hi * kBlockK, nk);
      const int64_t nc = imin(ldk, pad_up(c1)) - c0;

      // Online softmax: P = exp(S - m_new), l = l * alpha + rowsum(P), with
      // alpha = exp(m - m_new) taken for all rows at once (vectorised).
      for (int64_t i = 0; i < nq; ++i) {
        A* row = sc.data() + i * ldk + c0;
        for (int64_t j = c1 - c0; j < nc; ++j) row[j] = ninf;  // padding lanes give exp = 0
        const A mx = row_max(row, nc);
        mnew[i] = (mx > mrow[i] || mx != mx) ? mx : mrow[i];  // a NaN row stays NaN
      }
      exp_diff(mrow.data(), mnew.data(), nq, alpha.data());  // exp(-inf) = 0 on the first block
      for (int64_t i = 0; i < nq; ++i) {
        A* row = sc.data() + i * ldk + c0;
        if (mnew[i] == ninf) {  // nothing visible in this row yet
          for (int64_t j = 0; j < nc; ++j) row[j] = A(0);
          alpha[i] = A(1);
          continue;
        }
        const A rs = row_exp_sum(row, nc, mnew[i]);
        lrow[i] = lrow[i] * static_cast<L>(alpha[i]) + static_cast<L>(rs);
        mrow[i] = mnew[i];
      }
      if (p.dropout_p > 0.f) {
        dropout_factors(p, b, h, i0, nq, j0, nk, fac.data(), ldk);
        for (int64_t x = 0; x < nq * ldk; ++x) sc[x] *= fac[x];
      }
      if constexpr (PP::on) PP::round_p(sc.data(), nq, ldk, c0, nc, s.p2.data());
      // acc = acc * alpha + P V, the rescale fused into the product's epilogue
      // of the first run of shown tiles; later runs (past a hidden tile) add.
      bool first = true;
      for (int64_t t = t_lo; t < t_hi;) {
        if (tms[t] == TileMask::kHidden) { ++t; continue; }
        int64_t t1 = t + 1;
        while (t1 < t_hi && tms[t1] != TileMask::kHidden) ++t1;
        const int64_t ja = t * kBlockK, nr = imin(t1 * kBlockK, nk) - ja;
        const A* pa = sc.data() + ja;
        const A* vb = vbuf.data() + (j0 + ja) * ldv;
        if constexpr (PP::on) {
          if (first)
            PP::template pv<Epi::kRescale>(s.p2.data() + ja, ldk, nq, nr, s.v2.data(), j0 + ja, ldv, Ev, acc.data(),
                                           alpha.data());
          else
            PP::template pv<Epi::kAccumulate>(s.p2.data() + ja, ldk, nq, nr, s.v2.data(), j0 + ja, ldv, Ev,
                                              acc.data(), nullptr);
        } else if (first) {
          matmul_tile<kKCSeq, Epi::kRescale>(pa, ldk, nq, nr, vb, ldv, Ev, A(1), acc.data(), ldv, alpha.data());
        } else {
          matmul_tile<kKCSeq, Epi::kAccumulate>(pa, ldk, nq, nr, vb, ldv, Ev, A(1), acc.data(), ldv);
        }
        first = false;
        t = t1;
      }
    }

    for (int64_t i = 0; i < nq; ++i) store_out_row<T>(p, b, h, i0 + i, acc.data() + i * ldv, mrow[i], lrow[i]);
  }
}

template <typename T>
void fwd_impl(const FwdParams& call) {
  const std::vector<FwdParams> views = views_of(call);
  if (decode_call(call, views)) return decode_impl<T>(call, views);  // short queries: decode_kernel.h
  // Tile classes shared by the heads and batches that share the mask (a ragged call has none).
  TileTable<T> table(call, cdiv(call.Lq, kBlockQ));
  const std::vector<int64_t> start = item_starts(views, fwd_items_of);
  std::vector<double> cost;  // of one item of each view of a ragged call: its query rows x keys
  for (const FwdParams& v : views) cost.push_back(static_cast<double>(imin(kBlockQ, v.Lq)) * (v.Lk + 16));
  run_views(call, start, [&] { return FwdScratch<T>(call); },
            [&](FwdScratch<T>& s, int64_t v, int64_t begin, int64_t end) {
              fwd_items<T>(views[v], table, s, begin, end);
            }, is_ragged(call) ? &cost : nullptr);
}

// ----------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------
// Slices of a kv head's backward: enough for kBwdItems work items when B * Hkv
// is below that, at most kSliceUnits units (query head, query block) a slice
// (the float32 sum of a slice's dK, dV runs over that many contributions: a
// GQA group of 512 heads summed in one accumulator broke the parity rule in
// about 1 draw in 2), at least one unit a slice, and the slices' dK, dV partials
// within kBwdPartBytes.  A function of the shape only: results are the same
// for any thread count.
constexpr int64_t kBwdItems = 8;
constexpr int64_t kSliceUnits = 32;
constexpr int64_t kBwdPartBytes = int64_t(256) << 20;
inline int64_t bwd_slices(int64_t heads, int64_t units, int64_t bytes_per_slice) {
  int64_t n = imin(units, imax(cdiv(kBwdItems, heads), cdiv(units, kSliceUnits)));
  while (n > 1 && heads * n * bytes_per_slice > kBwdPartBytes) --n;
  return imax(1, n);
}

// One work item per (batch, kv head, slice of its query blocks): it owns dK and
// dV of that head (or its slice's partial sums) outright, full-length
// accumulators, so the q heads of a GQA group add into them without atomics.  Per query block it makes two sweeps over the visible keys:
//   1. P = exp(S - lse) and dP = dO V^T into (kBlockQ, Lk) panels, and
//      delta = rowsum(P * dP);
//   2. dS = P * (dP - delta); dV += P^T dO, dQ = scale dS K, dK += scale dS^T Q.
// delta is taken from the same rounded P and dP that dS uses, not from
// FlashAttention-2's rowsum(dO * O): with the stored O, float32 gradients had
// up to 4x the error of a naive float32 softmax backward (measured: about 1
// case in 300 broke the parity rule).  The panels cost O(kBlockQ * Lk) memory
// per thread and no extra matmul.
// Scratch of one thread's range of backward items, sized for the call's
// longest sequence.  Whole-head packs of K and V, reused by every query block
// of the slice; dK, dV and dQ have padded rows (lde, ldv): the products add
// whole vectors into them.
template <typename T>
struct BwdScratch {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  Buffer<A> kt, kbuf, vt, dk_own, dv_own, qbuf, dobuf, dq, delta, tt, pp, dpp, fac;
  Buffer<L> lse;
  Buffer<uint8_t> skip;
  // bfloat16 on AVX-512 (PairPath<T>::on): the operands of the pair products
  // (K^T and V^T tiles, K, Q and dO in pairs, Q and dO row-major, one tile's
  // P^T, dS and dS^T), in place of kt and vt.
  static constexpr bool kPairs = PairPath<T>::on;
  Buffer<uint16_t> kt2, vt2, kp2, q2, qp2, do2, dop2, pt2, ds2, dst2;
  // own: some view sums its dK, dV in one slice (dk_own, dv_own), not in the call's partials.
  BwdScratch(const BwdParams& p, bool own)
      : kt(kPairs ? 0 : cdiv(p.Lk, kBlockK) * p.E * kBlockK), kbuf(p.Lk * pad_up(p.E)),
        vt(kPairs ? 0 : cdiv(p.Lk, kBlockK) * p.Ev * kBlockK),
        dk_own(own ? p.Lk * pad_up(p.E) : 0), dv_own(own ? p.Lk * pad_up(p.Ev) : 0), qbuf(bq(p) * pad_up(p.E)),
        dobuf(bq(p) * pad_up(p.Ev)), dq(bq(p) * pad_up(p.E)), delta(bq(p)),
        tt(p.dropout_p > 0.f ? bq(p) * kBlockK : 0),  // P * Z of one tile
        pp(cdiv(p.Lk, kBlockK) * bq(p) * kBlockK), dpp(cdiv(p.Lk, kBlockK) * bq(p) * kBlockK),  // (nkb, bq, kBlockK)
        fac(p.dropout_p > 0.f ? cdiv(p.Lk, kBlockK) * bq(p) * kBlockK : 0), lse(bq(p)),
        skip(cdiv(p.Lk, kBlockK)),  // key tiles the mask hides entirely
        kt2(kPairs ? cdiv(p.Lk, kBlockK) * even_up(p.E) * kBlockK : 0),
        vt2(kPairs ? cdiv(p.Lk, kBlockK) * even_up(p.Ev) * kBlockK : 0),
        kp2(kPairs ? cdiv(p.Lk, kBlockK) * kBlockK * pad_up(p.E) : 0), q2(kPairs ? bq(p) * even_up(p.E) : 0),
        qp2(kPairs ? even_up(bq(p)) * pad_up(p.E) : 0), do2(kPairs ? bq(p) * even_up(p.Ev) : 0),
        dop2(kPairs ? even_up(bq(p)) * pad_up(p.Ev) : 0), pt2(kPairs ? even_up(bq(p)) * kBlockK : 0),
        ds2(kPairs ? bq(p) * kBlockK : 0), dst2(kPairs ? even_up(bq(p)) * kBlockK : 0) {}
  static int64_t bq(const BwdParams& p) { return imin(kBlockQ, p.Lq); }  // rows of a query block, at most
};

// Backward items [begin, end) of one dense problem p: item = (batch, kv head,
// slice).  The (query head of the group, query block) units of a kv head are
// cut into nsl contiguous slices; with more than one, each slice sums its own
// dK, dV into part_dk, part_dv ((B * Hkv, nsl, Lk, lde / ldv)) and bwd_merge
// adds them.  decoded: the call's forward ran decode_impl, and P is rebuilt
// from the same score arithmetic (dot_row), so that a row's one visible key
// gets P = 1 exactly (and dS = 0), as the forward's lse says.
template <typename T>
void bwd_items(const BwdParams& p, TileTable<T>& table, BwdScratch<T>& s, int64_t nsl, bool decoded,
               typename Elem<T>::acc* part_dk, typename Elem<T>::acc* part_dv, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  using L = typename Elem<T>::lse;
  using PP = PairPath<T>;
  const Visibility vis(p);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t E = p.E, Ev = p.Ev, Lk = p.Lk;
  // K^T, V^T and the P / dP panels are stored tile-major, one contiguous
  // block per key tile (see pack_tiles_t for why); ldp is a tile's row stride.
  const int64_t ldp = kBlockK, tq_sz = BwdScratch<T>::bq(p) * kBlockK;
  const int64_t lde = pad_up(E), ldv = pad_up(Ev);
  const A scale = static_cast<A>(p.scale);
  const L inf = std::numeric_limits<L>::infinity();
  const bool drop = p.dropout_p > 0.f;
  const int64_t nqb = cdiv(p.Lq, kBlockQ), units = group * nqb;
  const Span<A> kt(s.kt), kbuf(s.kbuf), vt(s.vt), dk_own(s.dk_own), dv_own(s.dv_own), qbuf(s.qbuf),
      dobuf(s.dobuf), dq(s.dq), delta(s.delta), tt(s.tt), pp(s.pp), dpp(s.dpp), fac(s.fac);
  const Span<L> lse(s.lse);
  const Span<uint8_t> skip(s.skip);
  int64_t packed = -1;  // b * Hkv + hk of the current packs
  for (int64_t item = begin; item < end; ++item) {
    const int64_t sl = item % nsl, bk = item / nsl;
    const int64_t hk = bk % p.Hkv, b = bk / p.Hkv;
    if (packed != bk) {
      const T* k = head_of<T>(p.k, p.k_st, b, hk);
      if constexpr (PP::on) {
        PP::pack_bwd(p, b, hk, s.kt2.data(), s.vt2.data(), s.kp2.data(), lde);
      } else {
        pack_tiles_t(k, p.k_st, Lk, E, kt.data());                                    // (nkb, E, kBlockK)
        pack_tiles_t(head_of<T>(p.v, p.v_st, b, hk), p.v_st, Lk, Ev, vt.data());     // (nkb, Ev, kBlockK)
      }
      if (decoded || !PP::on) load_rows(k, p.k_st.r, p.k_st.c, 0, Lk, E, kbuf.data(), lde);  // (Lk, E)
      packed = bk;
    }
    A* dk = nsl > 1 ? part_dk + (bk * nsl + sl) * Lk * lde : dk_own.data();
    A* dv = nsl > 1 ? part_dv + (bk * nsl + sl) * Lk * ldv : dv_own.data();
    for (int64_t x = 0; x < Lk * lde; ++x) dk[x] = A(0);
    for (int64_t x = 0; x < Lk * ldv; ++x) dv[x] = A(0);

    for (int64_t u = sl * units / nsl; u < (sl + 1) * units / nsl; ++u) {
      const int64_t g = u / nqb, h = hk * group + g, bh = b * p.Hq + h;
      const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
      const T* dout = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h;
      T* dqp = static_cast<T*>(p.dq) + b * p.dq_st.b + h * p.dq_st.h;
      const int64_t lrow = b * p.lse_sb + h * p.lse_sh;  // this head's lse (and dlse, delta) row
      {
        const int64_t i0 = (u % nqb) * kBlockQ, nq = imin(kBlockQ, p.Lq - i0);
        std::fill(dq.data(), dq.data() + nq * lde, A(0));
        int64_t jlo, jhi;
        vis.block_cols(i0, nq, jlo, jhi);
        if (jlo < jhi) {
          if constexpr (PP::on)
            PP::load_block(q, p.q_st, dout, p.dout_st, i0, nq, E, Ev, lde, ldv, s.q2.data(), s.qp2.data(),
                           s.do2.data(), s.dop2.data());
          if (decoded || !PP::on) {
            load_rows(q, p.q_st.r, p.q_st.c, i0, nq, E, qbuf.data(), lde);              // (nq, E)
            load_rows(dout, p.dout_st.r, p.dout_st.c, i0, nq, Ev, dobuf.data(), ldv);  // (nq, Ev)
          }
          for (int64_t i = 0; i < nq; ++i) {
            const L l = static_cast<const L*>(p.lse)[lrow + i0 + i];
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
            const TileMask tm = table.active() ? table.at(b, h, u % nqb, t) : classify_tile<T>(p, b, h, i0, nq, j0, nk);
            const int64_t td = table.active() ? table.lower_d(b, h, u % nqb, t) : 0;
            skip[t] = tm == TileMask::kHidden;
            if (skip[t]) continue;
            if (decoded) {  // the scores exactly as decode_impl formed them
              for (int64_t i = 0; i < nq; ++i)
                for (int64_t j = 0; j < nk; ++j)
                  pt[i * ldp + j] = dot_row(qbuf.data() + i * lde, kbuf.data() + (j0 + j) * lde, E) * scale;
            } else if constexpr (PP::on) {
              PP::scores(s.q2.data(), nq, E, s.kt2.data(), j0, nk, scale, pt, ldp);
            } else {
              matmul_tile<kKCHead>(qbuf.data(), lde, nq, E, kt.data() + t * E * kBlockK, kBlockK, nk, scale, pt, ldp);
            }
            mask_tile<T, A>(p, vis, b, h, i0, nq, j0, nk, pt, ldp, tm, td);
            for (int64_t i = 0; i < nq; ++i) recompute_p(pt + i * ldp, nk, lse[i]);
            if constexpr (PP::on) PP::dp(s.do2.data(), nq, Ev, s.vt2.data(), j0, nk, dpt, ldp);
            else matmul_tile<kKCHead>(dobuf.data(), ldv, nq, Ev, vt.data() + t * Ev * kBlockK, kBlockK, nk, A(1), dpt, ldp);
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
              delta[i] = static_cast<A>(static_cast<const L*>(p.delta)[lrow + i0 + i]);
          }
          if (p.dlse != nullptr) {
            // d lse / d s = P, so a gradient on lse only shifts delta.
            for (int64_t i = 0; i < nq; ++i)
              delta[i] -= static_cast<A>(static_cast<const L*>(p.dlse)[lrow + i0 + i]);
          }
          // Sweep 2: gradients, one key tile at a time.
          for (int64_t j0 = jlo / kBlockK * kBlockK; j0 < jhi; j0 += kBlockK) {
            const int64_t nk = imin(kBlockK, jhi - j0), t = j0 / kBlockK;
            if (skip[t]) continue;
            A* pt = pp.data() + t * tq_sz;
            A* dst = dpp.data() + t * tq_sz;
            // dV += (P * Z)^T dO, P^T read in place (kTransA).
            const A* pz = pt;
            if (drop) {
              const A* ft = fac.data() + t * tq_sz;
              for (int64_t i = 0; i < nq; ++i)
                for (int64_t j = 0; j < nk; ++j) tt[i * ldp + j] = pt[i * ldp + j] * ft[i * ldp + j];
              pz = tt.data();
            }
            if constexpr (PP::on)
              PP::dv(pz, ldp, nq, nk, s.pt2.data(), s.dop2.data(), Ev, ldv, dv + j0 * ldv);
            else
              matmul_tile<kKCSeq, Epi::kAccumulate, true>(pz, ldp, nk, nq, dobuf.data(), ldv, Ev, A(1),
                                                          dv + j0 * ldv, ldv);
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
            // dQ += scale * dS K;  dK += scale * dS^T Q, dS^T read in place.
            if constexpr (PP::on) {
              PP::dq_dk(dst, ldp, nq, nk, s.ds2.data(), s.dst2.data(), s.kp2.data(), j0, s.qp2.data(), E, lde, scale,
                        dq.data(), dk + j0 * lde);
            } else {
              matmul_tile<kKCSeq, Epi::kAccumulate>(dst, ldp, nq, nk, kbuf.data() + j0 * lde, lde, E, scale,
                                                    dq.data(), lde);
              matmul_tile<kKCSeq, Epi::kAccumulate, true>(dst, ldp, nk, nq, qbuf.data(), lde, E, scale,
                                                          dk + j0 * lde, lde);
            }
          }
        }
        for (int64_t i = 0; i < nq; ++i) store_all(dqp + (i0 + i) * p.dq_st.r, dq.data() + i * lde, E);
      }
    }
    if (nsl == 1) store_kv_grads<T>(p, b, hk, dk, dv, lde, ldv);
  }
}

// dK, dV of view p = its slices' sums added in slice order; items (batch * kv head, key tile).
template <typename T>
void bwd_merge(const BwdParams& p, int64_t nsl, const typename Elem<T>::acc* part_dk,
               const typename Elem<T>::acc* part_dv, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  const int64_t Lk = p.Lk, E = p.E, Ev = p.Ev, lde = pad_up(E), ldv = pad_up(Ev), nkb = cdiv(Lk, kBlockK);
  Buffer<A> sk(kBlockK * lde), sv(kBlockK * ldv);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t t = item % nkb, bk = item / nkb, hk = bk % p.Hkv, b = bk / p.Hkv;
    const int64_t j0 = t * kBlockK, nk = imin(kBlockK, Lk - j0);
    for (int64_t x = 0; x < nk * lde; ++x) sk[x] = A(0);
    for (int64_t x = 0; x < nk * ldv; ++x) sv[x] = A(0);
    for (int64_t sl = 0; sl < nsl; ++sl) {
      const A* pk = part_dk + ((bk * nsl + sl) * Lk + j0) * lde;
      const A* pv = part_dv + ((bk * nsl + sl) * Lk + j0) * ldv;
      for (int64_t x = 0; x < nk * lde; ++x) sk[x] += pk[x];
      for (int64_t x = 0; x < nk * ldv; ++x) sv[x] += pv[x];
    }
    T* dkp = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h + j0 * p.dk_st.r;
    T* dvp = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h + j0 * p.dv_st.r;
    for (int64_t j = 0; j < nk; ++j) {
      store_all(dkp + j * p.dk_st.r, sk.data() + j * lde, E);
      store_all(dvp + j * p.dv_st.r, sv.data() + j * ldv, Ev);
    }
  }
}

template <typename T>
void bwd_impl(const BwdParams& call) {
  using A = typename Elem<T>::acc;
  const std::vector<BwdParams> views = views_of(call);
  const bool decoded = decode_call(call, views);
  // Slices per view (bwd_slices over the call's kv heads, all views together),
  // and where each view's slice partials start.
  int64_t heads = 0;
  for (const BwdParams& v : views) heads += v.B * v.Hkv;
  const int64_t lde = pad_up(call.E), ldv = pad_up(call.Ev);
  std::vector<int64_t> nsl(views.size()), part_at(views.size() + 1, 0);
  for (size_t x = 0; x < views.size(); ++x) {
    const BwdParams& v = views[x];
    const int64_t units = (v.Hq / v.Hkv) * cdiv(v.Lq, kBlockQ);
    nsl[x] = bwd_slices(heads, units, v.Lk * (lde + ldv) * static_cast<int64_t>(sizeof(A)));
    part_at[x + 1] = part_at[x] + (nsl[x] > 1 ? v.B * v.Hkv * nsl[x] * v.Lk : 0);
  }
  Buffer<A> part_dk(part_at.back() * lde), part_dv(part_at.back() * ldv);
  // Tile classes shared by the heads and batches that share the mask (as in the forward).
  TileTable<T> table(call, cdiv(call.Lq, kBlockQ));
  const std::vector<int64_t> start = item_starts(views, [&](const BwdParams& v) {
    return v.B * v.Hkv * nsl[&v - views.data()];
  });
  std::vector<double> cost;  // of one item of each view of a ragged call: its slice's query rows x keys
  for (size_t x = 0; x < views.size(); ++x)
    cost.push_back(static_cast<double>(views[x].Hq / views[x].Hkv) * views[x].Lq / nsl[x] * (views[x].Lk + 16) + 1);
  const bool own = std::find(nsl.begin(), nsl.end(), int64_t(1)) != nsl.end();
  run_views(call, start, [&] { return BwdScratch<T>(call, own); },
            [&](BwdScratch<T>& s, int64_t x, int64_t begin, int64_t end) {
              bwd_items<T>(views[x], table, s, nsl[x], decoded, part_dk.data() + part_at[x] * lde,
                           part_dv.data() + part_at[x] * ldv, begin, end);
            }, is_ragged(call) ? &cost : nullptr);
  if (part_at.back() == 0) return;
  const std::vector<int64_t> merge_at = item_starts(views, [&](const BwdParams& v) {
    return nsl[&v - views.data()] > 1 ? v.B * v.Hkv * cdiv(v.Lk, kBlockK) : 0;
  });
  run_views(call, merge_at, [] { return 0; }, [&](int, int64_t x, int64_t begin, int64_t end) {
    bwd_merge<T>(views[x], nsl[x], part_dk.data() + part_at[x] * lde, part_dv.data() + part_at[x] * ldv, begin, end);
  });
}

}  // namespace

ATTNFAST_BY_DTYPE_ENTRY(attention_fwd, FwdParams, fwd_impl)
ATTNFAST_BY_DTYPE_ENTRY(attention_bwd, BwdParams, bwd_impl)

}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
