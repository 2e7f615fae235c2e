// FlashAttention-2-style forward on tensor cores (sm80+: cp.async, ldmatrix,
// mma.sync m16n8k16, fp32 accumulation).
//
// One CTA = one block of kBlockM query rows of one (batch, head); each warp
// owns 16 * kMTiles of those rows for the whole pass (FlashAttention-2's split,
// 4 warps x 32 rows, where registers allow: each K and V fragment loaded from
// shared memory then feeds two row tiles' products), and the online softmax needs
// only quad shuffles (a row's values live in the 4 lanes of one quad).  K and V
// tiles of kBlockN keys stream through shared memory: the V copy overlaps
// S = Q K^T, the next K copy overlaps the softmax and O += P V.  Tiles that
// lie entirely inside the causal/window band and inside both sequences skip
// the per-element test; tiles outside the band are never visited.
#pragma once
#include "band.cuh"
#include "flash.h"
#include "mma.cuh"
#include "switch.h"

namespace attnfast {
namespace cuda {

template <int kHeadDim_, int kBlockN_, int kNWarps_, int kMTiles_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kMTiles = kMTiles_;  // m16 row tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kNWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStride = kHeadDim + 8;  // smem row stride (elements): +16 B keeps ldmatrix conflict-free
  static constexpr int kNTilesS = kBlockN / 8;  // n8 tiles of S per warp
  static constexpr int kNTilesO = kHeadDim / 8;  // n8 tiles of O per warp
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemKV = kBlockN * kStride;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kSmemKV) * 2;

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16 (k-steps of the mma)");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16 (ldmatrix.x4 loads two n8 tiles)");
  static_assert((kStride * 2) % 16 == 0, "smem rows must stay 16-byte aligned for cp.async/ldmatrix");
};

// Per head dim of FwdHeadDims (flash.h), (kBlockN, kNWarps, kMTiles): FlashAttention-2's
// 4 warps x 32 rows where the accumulators of O (kMTiles * kHeadDim / 2 fp32 per thread) and
// S (kMTiles * kBlockN / 2) fit the register file without spills (the compile check): D 64
// (64, 4, 2), D 96 (32, 4, 2).  D 128 keeps 8 warps x 16 rows, (64, 8, 1): at 4 x 32 rows
// it spills 12-508 bytes a thread (kBlockN 32 or 64, sm80 and sm90).  D 256: (32, 4, 1).
// Shared memory fits sm80's 163 KB.
template <int D>
struct FwdConfig {
  static_assert(fwd_supports_head_dim(D), "a forward config for a head dim FwdHeadDims (flash.h) does not list");
  static constexpr int kBlockN = D == 64 || D == 128 ? 64 : 32;
  static constexpr int kMTiles = D <= 96 ? 2 : 1;
  using Traits = FwdTraits<D, kBlockN, D == 128 ? 8 : 4, kMTiles>;
};

template <typename T, typename Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, 1) flash_fwd_kernel(const FwdParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, MT = Tr::kMTiles;
  extern __shared__ __align__(16) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tr::kSmemQ;
  T* sV = sK + Tr::kSmemKV;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.x * BM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const Seq sq = seq_of(p, b);
  if (m0 >= sq.Lq) return;  // (varlen: the grid covers the longest sequence)
  const int Lq = sq.Lq, Lk = sq.Lk;
  const Band band(p, sq);

  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + sq.q0 * p.q_st.r;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h + sq.k0 * p.k_st.r;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h + sq.k0 * p.v_st.r;
  T* out = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + sq.q0 * p.out_st.r;
  float* lse = p.lse + lse_row(p, b, h, sq);

  const int n_lo = band.key_lo(m0), n_hi = band.key_hi(min(m0 + BM, Lq));
  const int nb_lo = n_lo / BN, nb_hi = n_hi > n_lo ? (n_hi + BN - 1) / BN : nb_lo;

  // Rows of this warp's row tile mt: r = 0 -> row wrow + 16 mt + g, r = 1 -> that + 8.
  const int wrow = warp * Tr::kWarpRows;
  float acc_o[MT][Tr::kNTilesO][4];
  float row_max[MT][2], row_sum[MT][2];  // row_sum: this lane's share; reduced over the quad at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero_acc(acc_o[mt]);
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  if (nb_lo < nb_hi) {
    load_tile_async<BM, D, Tr::kNThreads>(sQ, q + m0 * p.q_st.r, p.q_st.r, 0, Lq - m0, tid);
    load_tile_async<BN, D, Tr::kNThreads>(sK, k + static_cast<int64_t>(nb_lo) * BN * p.k_st.r, p.k_st.r,
                                          0, Lk - nb_lo * BN, tid);
    cp_async_commit();
  }
  const MaskReader<T> mask = kHasMask ? MaskReader<T>(p, b, h) : MaskReader<T>{};

  for (int nb = nb_lo; nb < nb_hi; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait<0>();
    __syncthreads();  // K[nb] (and Q) landed; every warp is done with V[nb - 1]
    load_tile_async<BN, D, Tr::kNThreads>(sV, v + static_cast<int64_t>(n0) * p.v_st.r, p.v_st.r, 0,
                                          Lk - n0, tid);
    cp_async_commit();

    // S = Q K^T for this warp's row tiles x BN keys: each K fragment feeds every row tile.
    float acc_s[MT][Tr::kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero_acc(acc_s[mt]);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], sQ + (wrow + 16 * mt + (lane & 15)) * S + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4(bf, sK + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * S + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_n16<T>(acc_s[mt] + 2 * np, a[mt], bf);
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V[nb] landed; every warp is done with K[nb]
    if (nb + 1 < nb_hi) {
      load_tile_async<BN, D, Tr::kNThreads>(sK, k + static_cast<int64_t>(n0 + BN) * p.k_st.r, p.k_st.r, 0,
                                            Lk - n0 - BN, tid);
      cp_async_commit();
    }

    // Scores in log2 units; hidden pairs -inf.
    const bool inside = !kHasMask && band.tile_inside(m0, m0 + BM, n0, n0 + BN);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < Tr::kNTilesS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float s2 = acc_s[mt][j][e] * p.scale_log2;
          if (!inside) {
            const int i = m0 + wrow + 16 * mt + g + (e >= 2 ? 8 : 0), key = n0 + j * 8 + 2 * t + (e & 1);
            if (!band.visible(i, key)) s2 = -INFINITY;
            else if (kHasMask) s2 = mask.apply(s2, i, key);
          }
          acc_s[mt][j][e] = s2;
        }

    // Online softmax: rescale O only by how much the row max grew.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int j = 0; j < Tr::kNTilesS; ++j)
          mx = nan_max(mx, nan_max(acc_s[mt][j][2 * r], acc_s[mt][j][2 * r + 1]));
        mx = quad_max(mx);
        const float m_use = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: keep P = 0, no NaN
        const float alpha = fast_exp2(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < Tr::kNTilesS; ++j)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            acc_s[mt][j][e] = fast_exp2(acc_s[mt][j][e] - m_use);
            sum += acc_s[mt][j][e];
          }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int i = 0; i < Tr::kNTilesO; ++i) {
          acc_o[mt][i][2 * r] *= alpha;
          acc_o[mt][i][2 * r + 1] *= alpha;
        }
      }

    // O += P V: P's accumulator layout is the A-fragment layout of the next mma; each V
    // fragment feeds every row tile.
#pragma unroll
    for (int kp = 0; kp < BN / 16; ++kp) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(acc_s[mt] + 2 * kp, a[mt]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, sV + (kp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * S + dp * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_n16<T>(acc_o[mt] + 2 * dp, a[mt], bf);
      }
    }
  }

  // Epilogue: O / l, lse = m ln2 + ln l; rows that saw nothing get O = 0, lse = -inf;
  // rows with a NaN score stay NaN.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_sum[mt][r]);
      const int i = m0 + wrow + 16 * mt + g + 8 * r;
      if (i >= Lq) continue;
      const float inv = l != l ? l : l > 0.f ? 1.f / l : 0.f;  // NaN row stays NaN
      T* orow = out + static_cast<int64_t>(i) * p.out_st.r;
#pragma unroll
      for (int d = 0; d < Tr::kNTilesO; ++d) {
        const uint32_t packed = ElemOps<T>::pack(acc_o[mt][d][2 * r] * inv, acc_o[mt][d][2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + d * 8 + 2 * t) = packed;
      }
      if (t == 0) lse[i] = l > 0.f ? row_max[mt][r] * kLn2 + logf(l) : l != l ? l : -INFINITY;
    }
}

// Grid and launch of one forward instance.  `launch(kernel, grid, threads,
// smem_bytes, params)` queues it: on a GPU (flash_fwd.cu) or on the host
// emulator of the tests (tools/emu.h).
template <typename T, int D, bool kHasMask, typename Launch>
int launch_fwd(const FwdParams& p, const Launch& launch) {
  using Tr = typename FwdConfig<D>::Traits;
  const dim3 grid((p.Lq + Tr::kBlockM - 1) / Tr::kBlockM, p.Hq, p.B);
  return launch(flash_fwd_kernel<T, Tr, kHasMask>, grid, Tr::kNThreads, Tr::kSmemBytes, p);
}

// The one place turning (dtype, head dim, mask or not) into a fwd instance.
// A head dim without a kernel returns 1 (cudaErrorInvalidValue).
template <typename Launch>
int dispatch_fwd(const FwdParams& p, const Launch& launch) {
  return ATTNFAST_ELEM_SWITCH(p.elem, T, [&] {
    return ATTNFAST_FWD_HEADDIM_SWITCH(p.D, kD, [&] {
      return ATTNFAST_BOOL_SWITCH(p.mask_kind != MaskKind::none, kHasMask,
                                  [&] { return launch_fwd<T, kD, kHasMask>(p, launch); });
    });
  });
}

}  // namespace cuda
}  // namespace attnfast
