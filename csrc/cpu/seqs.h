// A call's batch as a list of dense problems ("views").
//
// A dense call is one view: the call itself.  A ragged call (packed
// variable-length sequences, or a KV cache with per-entry lengths: see the
// cu_q ... batch_k fields of AttnParams) is one view per batch entry, each a
// dense problem with B = 1 whose pointers start at that sequence's first row
// and whose Lq, Lk and diagonal are its own.  The kernels run the work items
// of all views in one parallel loop (`run_views`): item x of the call is item
// x - start[v] of the view v with start[v] <= x < start[v + 1].
#pragma once
#include <algorithm>
#include <vector>

#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

inline bool is_ragged(const AttnParams& p) {
  return p.cu_q != nullptr || p.cu_k != nullptr || p.used_k != nullptr || p.batch_k != nullptr ||
         p.block_table != nullptr;
}

template <typename X>
inline X* at_row(X* base, int64_t elements) {
  using Byte = typename std::conditional<std::is_const<X>::value, const char, char>::type;
  return base == nullptr ? nullptr : reinterpret_cast<X*>(reinterpret_cast<Byte*>(base) + elements);
}

// Sequence b of a ragged call as a dense problem (B = 1), the fields shared by
// every params type.  q0 and k0: its first query and key rows; kb: its key batch.
inline void view_common(const AttnParams& p, int64_t b, AttnParams& v, int64_t& q0, int64_t& k0, int64_t& kb,
                        int64_t esize) {
  q0 = p.cu_q != nullptr ? p.cu_q[b] : 0;
  k0 = p.cu_k != nullptr ? p.cu_k[b] : 0;
  kb = p.block_table != nullptr ? 0 : p.batch_k != nullptr ? p.batch_k[b] : b;  // (paged: the pool)
  v.B = 1;
  v.Lq = p.cu_q != nullptr ? p.cu_q[b + 1] - q0 : p.Lq;
  v.Lk = p.used_k != nullptr ? p.used_k[b] : p.cu_k != nullptr ? p.cu_k[b + 1] - k0 : p.Lk;
  v.q = at_row(p.q, (b * p.q_st.b + q0 * p.q_st.r) * esize);
  v.k = at_row(p.k, (kb * p.k_st.b + k0 * p.k_st.r) * esize);
  v.v = at_row(p.v, (kb * p.v_st.b + k0 * p.v_st.r) * esize);
  v.diag_offset = p.bottom_right ? v.Lk - v.Lq : 0;
  v.offset = p.offset + static_cast<uint64_t>(b);
  v.cu_q = v.cu_k = v.used_k = v.batch_k = nullptr;
  if (p.block_table != nullptr) v.block_table = p.block_table + b * p.block_table_stride;
}

inline int64_t elem_size(DType t) { return t == DType::f64 ? 8 : t == DType::f32 ? 4 : 2; }
inline int64_t lse_size(DType t) { return t == DType::f64 || t == DType::f32 ? 8 : 4; }

inline FwdParams view_of(const FwdParams& p, int64_t b) {
  FwdParams v = p;
  int64_t q0, k0, kb;
  const int64_t es = elem_size(p.dtype);
  view_common(p, b, v, q0, k0, kb, es);
  v.out = at_row(p.out, (b * p.out_st.b + q0 * p.out_st.r) * es);
  v.lse = at_row(p.lse, (b * p.lse_sb + q0) * lse_size(p.dtype));
  return v;
}

inline BwdParams view_of(const BwdParams& p, int64_t b) {
  BwdParams v = p;
  int64_t q0, k0, kb;
  const int64_t es = elem_size(p.dtype), ls = lse_size(p.dtype);
  view_common(p, b, v, q0, k0, kb, es);
  v.dout = at_row(p.dout, (b * p.dout_st.b + q0 * p.dout_st.r) * es);
  v.out = at_row(p.out, (b * p.out_st.b + q0 * p.out_st.r) * es);
  v.lse = at_row(p.lse, (b * p.lse_sb + q0) * ls);
  v.dlse = at_row(p.dlse, (b * p.lse_sb + q0) * ls);
  v.delta = at_row(p.delta, (b * p.lse_sb + q0) * ls);
  v.dq = at_row(p.dq, (b * p.dq_st.b + q0 * p.dq_st.r) * es);
  v.dk = at_row(p.dk, (kb * p.dk_st.b + k0 * p.dk_st.r) * es);
  v.dv = at_row(p.dv, (kb * p.dv_st.b + k0 * p.dv_st.r) * es);
  return v;
}

// The views of a call: the call itself, or one per sequence of a ragged call.
template <typename P>
std::vector<P> views_of(const P& p) {
  if (!is_ragged(p)) return {p};
  std::vector<P> views;
  views.reserve(p.B);
  for (int64_t b = 0; b < p.B; ++b) views.push_back(view_of(p, b));
  return views;
}

// Prefix sums of the views' item counts: start[v] is view v's first item.
template <typename P, typename F>
std::vector<int64_t> item_starts(const std::vector<P>& views, F&& items_of) {
  std::vector<int64_t> start(views.size() + 1, 0);
  for (size_t v = 0; v < views.size(); ++v) start[v + 1] = start[v] + items_of(views[v]);
  return start;
}

// f(scratch, v, begin, end) for every view's items, in one parallel loop over
// all of them; each thread's range makes its scratch once (make_scratch()).
// With `cost` (the cost of one item of each view), the items are cut into
// kCostChunks ranges of about equal cost first, and the threads take
// contiguous runs of those: the items of a ragged call differ in cost by the
// square of their sequences' lengths, and equal counts of items per thread
// left one thread with the long sequences (a 16-sequence batch ran 0.87x the
// one-call-per-sequence loop).  Which thread runs an item never changes what
// it computes.
constexpr int64_t kCostChunks = 256;

template <typename P, typename S, typename F>
void run_views(const P& p, const std::vector<int64_t>& start, S&& make_scratch, F&& f,
               const std::vector<double>* cost = nullptr) {
  const int64_t total = start.back();
  const auto run_items = [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    int64_t v = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; begin < end; ++v) {
      const int64_t stop = imin(end, start[v + 1]);
      if (stop > begin) f(scratch, v, begin - start[v], stop - start[v]);
      begin = stop;
    }
  };
  if (cost == nullptr || total <= 1) {
    run_parallel(p, total, [&](int64_t begin, int64_t end) { run_items(begin, end); });
    return;
  }
  // Chunk c is items [cut[c], cut[c + 1]): where the running cost passes c / nc of the whole.
  const int64_t nc = imin(total, kCostChunks);
  double whole = 0.0;
  for (size_t x = 0; x + 1 < start.size(); ++x) whole += (start[x + 1] - start[x]) * (*cost)[x];
  std::vector<int64_t> cut(nc + 1, total);
  cut[0] = 0;
  double run = 0.0;
  int64_t c = 1;
  for (size_t x = 0; x + 1 < start.size() && c < nc; ++x) {
    for (int64_t i = start[x]; i < start[x + 1] && c < nc; ++i) {
      run += (*cost)[x];
      while (c < nc && run >= whole * static_cast<double>(c) / static_cast<double>(nc)) cut[c++] = i + 1;
    }
  }
  run_parallel(p, nc, [&](int64_t c0, int64_t c1) { run_items(cut[c0], cut[c1]); });
}

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
