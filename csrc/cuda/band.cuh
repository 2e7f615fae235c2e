// Which (query, key) pairs a call may see: the causal/window band, the
// sequence ends and the optional bool/additive mask.  Shared by the forward
// and backward kernels.
#pragma once
#include <cstdint>
#include <cmath>

#include "flash.h"
#include "mma.cuh"

namespace attnfast {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Batch entry b of a call: its first query and key rows in the operands, its
// lengths and diagonal.  A dense call: (0, Lq, 0, Lk, diag_offset) for every b.
struct Seq {
  int q0, Lq, k0, Lk, diag;
};
__host__ __device__ __forceinline__ Seq seq_of(const AttnParams& p, int b) {
  if (p.cu_q == nullptr) return Seq{0, p.Lq, 0, p.Lk, p.diag_offset};
  // Offsets the caller got wrong cannot send a read or write outside the packed tensors (nor
  // past the grid, sized by Lq, Lk): each sequence is clamped inside [0, total) and to Lq, Lk.
  const auto clamp = [](int x, int lo, int hi) { return x < lo ? lo : x > hi ? hi : x; };
  const int q0 = clamp(p.cu_q[b], 0, p.total_q), k0 = clamp(p.cu_k[b], 0, p.total_k);
  const int lq = clamp(p.cu_q[b + 1] - q0, 0, min(p.Lq, p.total_q - q0));
  const int lk = clamp(p.used_k != nullptr ? p.used_k[b] : p.cu_k[b + 1] - k0, 0, min(p.Lk, p.total_k - k0));
  return Seq{q0, lq, k0, lk, p.bottom_right ? lk - lq : 0};
}
// Index of row 0 of (b, h) in the per-row arrays (lse, delta; dq_accum by D).
__host__ __device__ __forceinline__ int64_t lse_row(const AttnParams& p, int b, int h, const Seq& s) {
  return p.cu_q != nullptr ? static_cast<int64_t>(h) * p.total_q + s.q0 : (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
}

struct Band {
  int Lq, Lk, diag, wl, wr;

  __host__ __device__ Band(const AttnParams& p, const Seq& s)
      : Lq(s.Lq), Lk(s.Lk), diag(s.diag), wl(p.window_left), wr(p.window_right) {}

  // Keys [lo, hi) that any query row in [m0, m1) may see.
  __device__ __forceinline__ int key_lo(int m0) const { return wl < 0 ? 0 : max(0, m0 + diag - wl); }
  __device__ __forceinline__ int key_hi(int m1) const {
    return wr < 0 ? Lk : min(Lk, m1 - 1 + diag + wr + 1);
  }
  // Query rows [lo, hi) that may see any key in [n0, n1).
  __device__ __forceinline__ int query_lo(int n0) const { return wr < 0 ? 0 : max(0, n0 - diag - wr); }
  __device__ __forceinline__ int query_hi(int n1) const {
    return wl < 0 ? Lq : min(Lq, n1 - 1 - diag + wl + 1);
  }
  // True when every pair of rows [m0, m1) x keys [n0, n1) is inside the band
  // and inside both sequences (no per-element test needed).
  __device__ __forceinline__ bool tile_inside(int m0, int m1, int n0, int n1) const {
    if (m1 > Lq || n1 > Lk) return false;
    if (wr >= 0 && n1 - 1 > m0 + diag + wr) return false;
    if (wl >= 0 && n0 < m1 - 1 + diag - wl) return false;
    return true;
  }
  __device__ __forceinline__ bool visible(int i, int j) const {
    if (i >= Lq || j >= Lk) return false;
    const int d = i + diag;
    if (wr >= 0 && j > d + wr) return false;
    if (wl >= 0 && j < d - wl) return false;
    return true;
  }
};

// Score (log2 units) of pair (i, j) after the explicit mask: -inf where
// hidden, s + mask * log2(e) for additive masks.  (b, h) select the mask plane.
template <typename T>
struct MaskReader {
  const char* base;  // mask + b * st[0] + h * st[1], in bytes
  int64_t st_r, st_c;  // strides in elements
  MaskKind kind;

  MaskReader() = default;
  __device__ __forceinline__ MaskReader(const AttnParams& p, int b, int h) : kind(p.mask_kind) {
    const int esize = p.mask_kind == MaskKind::boolean ? 1 : 2;
    base = static_cast<const char*>(p.mask) + (b * p.mask_st[0] + h * p.mask_st[1]) * esize;
    st_r = p.mask_st[2];
    st_c = p.mask_st[3];
  }
  __device__ __forceinline__ float apply(float s2, int i, int j) const {
    const int64_t off = static_cast<int64_t>(i) * st_r + static_cast<int64_t>(j) * st_c;
    if (kind == MaskKind::boolean) return base[off] ? s2 : -INFINITY;
    const T m = reinterpret_cast<const T*>(base)[off];
    return s2 + ElemOps<T>::to_float(m) * kLog2e;
  }
};

}  // namespace cuda
}  // namespace attnfast
