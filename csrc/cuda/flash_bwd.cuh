// FlashAttention-2-style backward on tensor cores (sm80+).
//
// Three launches:
//   1. preprocess: delta = rowsum(dO * O) (or the caller's delta_in) - dlse per query row (fp32), and
//      zero the fp32 dQ accumulator;
//   2. main: one CTA per block of kBlockN keys of one (batch, kv head).  It
//      keeps K, V and its dK, dV accumulators for the whole pass and walks
//      every query block (of every query head of its GQA group) that can see
//      its keys.  Each warp owns 16 keys and computes S^T = K Q^T and
//      dP^T = V dO^T for them, so P^T and dS^T come out of the accumulators
//      already in the A-fragment layout of dV += P^T dO and dK += dS^T Q.
//      dS^T goes through shared memory for dQ += dS K, which is added to the
//      fp32 accumulator with atomics (several key blocks share a query row);
//   3. convert: dQ = scale * accumulator in the input dtype.
// P is recomputed from the saved lse: P = exp2(s * scale * log2e - lse * log2e).
#pragma once
#include "band.cuh"
#include "flash.h"
#include "mma.cuh"
#include "switch.h"

namespace attnfast {
namespace cuda {

template <int kHeadDim_, int kBlockM_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kBlockN = 16 * kNWarps;  // 16 keys per warp
  static constexpr int kBlockM = kBlockM_;      // query rows per step
  static constexpr int kStride = kHeadDim + 8;  // smem row stride of Q, dO, K, V (elements)
  static constexpr int kStrideS = kBlockM + 8;  // smem row stride of dS^T
  static constexpr int kNTilesM = kBlockM / 8;  // n8 tiles of S^T per warp
  static constexpr int kNTilesD = kHeadDim / 8;  // n8 tiles of dK, dV per warp
  // dQ (kBlockM x kHeadDim) over the warps: kBlockM / 16 row groups x the rest as column groups.
  static constexpr int kDqRowGroups = kBlockM / 16;
  static constexpr int kDqColGroups = kNWarps / kDqRowGroups;
  static constexpr int kDqCols = kHeadDim / kDqColGroups;
  static constexpr int kNTilesDq = kDqCols / 8;
  static constexpr int kSmemKV = kBlockN * kStride;
  static constexpr int kSmemQ = kBlockM * kStride;
  static constexpr int kSmemS = kBlockN * kStrideS;
  static constexpr int kSmemBytes = (2 * kSmemKV + 2 * kSmemQ + kSmemS) * 2 + 2 * kBlockM * 4;

  static_assert(kHeadDim % 16 == 0 && kBlockM % 16 == 0, "k-steps of 16");
  static_assert(kNWarps % kDqRowGroups == 0 && kHeadDim % (8 * kDqColGroups) == 0,
                "dQ must split into whole n8 tiles over the warps");
  static_assert(kBlockM <= kNThreads, "one thread per query row loads lse and delta");
  static_assert((kStride * 2) % 16 == 0 && (kStrideS * 2) % 16 == 0, "smem rows must be 16-byte aligned");
  static_assert(kSmemBytes <= 163 * 1024, "shared memory must fit sm80");
};

// Per head dim of BwdHeadDims (flash.h), the query step: 64 rows at D=64; 32
// above, so that the dK and dV accumulators (kHeadDim floats per thread) plus
// S^T and dP^T (kBlockM floats) stay in registers without spills (compile check).
template <int D>
struct BwdConfig {
  static_assert(bwd_supports_head_dim(D), "a backward config for a head dim BwdHeadDims (flash.h) does not list");
  using Traits = BwdTraits<D, D <= 64 ? 64 : 32>;
};

template <typename T>
__global__ void flash_bwd_preprocess_kernel(const BwdParams p) {
  // One warp per query row.
  // One warp per query row.  (varlen: rows (b, h, i) with i < the longest Lq; those past
  // sequence b's end have no row.)
  const int lane = threadIdx.x % 32;
  const int64_t x = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (x >= static_cast<int64_t>(p.B) * p.Hq * p.Lq) return;
  const int i = static_cast<int>(x % p.Lq);
  const int h = static_cast<int>((x / p.Lq) % p.Hq);
  const int b = static_cast<int>(x / (static_cast<int64_t>(p.Lq) * p.Hq));
  const Seq sq = seq_of(p, b);
  if (i >= sq.Lq) return;
  const int64_t row = lse_row(p, b, h, sq) + i, r = sq.q0 + i;
  const T* o = static_cast<const T*>(p.out) + b * p.out_st.b + h * p.out_st.h + r * p.out_st.r;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + r * p.dout_st.r;
  float* dq = p.dq_accum + row * p.D;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) {
    acc += ElemOps<T>::to_float(o[d]) * ElemOps<T>::to_float(dout[d]);
    dq[d] = 0.f;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0)
    p.delta[row] = (p.delta_in != nullptr ? p.delta_in[row] : acc) - (p.dlse != nullptr ? p.dlse[row] : 0.f);
}

// (batches, rows per head) of dq_accum: (B, Lq) dense, (1, total_q) varlen.
__host__ __device__ __forceinline__ void dq_accum_shape(const BwdParams& p, int64_t& nb, int64_t& nr) {
  nb = p.cu_q != nullptr ? 1 : p.B;
  nr = p.cu_q != nullptr ? p.total_q : p.Lq;
}

template <typename T>
__global__ void flash_bwd_convert_dq_kernel(const BwdParams p) {
  int64_t nb, nr;
  dq_accum_shape(p, nb, nr);
  const int64_t n = nb * p.Hq * nr * p.D;
  T* dq = static_cast<T*>(p.dq);
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = x % p.D, r = (x / p.D) % nr, h = (x / (p.D * nr)) % p.Hq, b = x / (p.D * nr * p.Hq);
    dq[b * p.dq_st.b + h * p.dq_st.h + r * p.dq_st.r + d] = ElemOps<T>::from_float(p.dq_accum[x] * p.scale);
  }
}

template <typename T, typename Tr, bool kHasMask>
__global__ void __launch_bounds__(Tr::kNThreads, 1) flash_bwd_kernel(const BwdParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, S = Tr::kStride, SS = Tr::kStrideS;
  extern __shared__ __align__(16) char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + Tr::kSmemKV;
  T* sQ = sV + Tr::kSmemKV;
  T* sdO = sQ + Tr::kSmemQ;
  T* sdS = sdO + Tr::kSmemQ;  // dS^T: (BN keys, BM queries)
  float* sLse = reinterpret_cast<float*>(sdS + Tr::kSmemS);  // lse * log2e; +inf for dead rows
  float* sDelta = sLse + BM;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * BN;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = p.Hq / p.Hkv;
  const Seq sq = seq_of(p, b);
  if (n0 >= sq.Lk) return;  // (varlen: the grid covers the longest sequence)
  const int Lq = sq.Lq, Lk = sq.Lk;
  const Band band(p, sq);
  const int wkey = warp * 16;  // this warp's keys: n0 + wkey + g (+ 8)

  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + hk * p.k_st.h + sq.k0 * p.k_st.r;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + hk * p.v_st.h + sq.k0 * p.v_st.r;
  load_tile_async<BN, D, Tr::kNThreads>(sK, k + static_cast<int64_t>(n0) * p.k_st.r, p.k_st.r, 0, Lk - n0, tid);
  load_tile_async<BN, D, Tr::kNThreads>(sV, v + static_cast<int64_t>(n0) * p.v_st.r, p.v_st.r, 0, Lk - n0, tid);
  cp_async_commit();

  float acc_dk[Tr::kNTilesD][4], acc_dv[Tr::kNTilesD][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  const int m_lo = band.query_lo(n0), m_hi = band.query_hi(min(n0 + BN, Lk));
  const int mb_lo = m_lo / BM, mb_hi = m_hi > m_lo ? (m_hi + BM - 1) / BM : mb_lo;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h + sq.q0 * p.q_st.r;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_st.b + h * p.dout_st.h + sq.q0 * p.dout_st.r;
    const int64_t row_base = lse_row(p, b, h, sq);
    float* dq_accum = p.dq_accum + row_base * D;
    float* dmask = p.dmask != nullptr ? p.dmask + row_base * Lk : nullptr;  // (dense calls only)
    const MaskReader<T> mask = kHasMask ? MaskReader<T>(p, b, h) : MaskReader<T>{};

    for (int mb = mb_lo; mb < mb_hi; ++mb) {
      const int m0 = mb * BM;
      load_tile_async<BM, D, Tr::kNThreads>(sQ, q + static_cast<int64_t>(m0) * p.q_st.r, p.q_st.r, 0, Lq - m0, tid);
      load_tile_async<BM, D, Tr::kNThreads>(sdO, dout + static_cast<int64_t>(m0) * p.dout_st.r, p.dout_st.r, 0,
                                            Lq - m0, tid);
      cp_async_commit();
      if (tid < BM) {
        const int i = m0 + tid;
        float l = i < Lq ? p.lse[row_base + i] : INFINITY;
        sLse[tid] = l == -INFINITY ? INFINITY : l * kLog2e;  // rows that saw nothing: P = 0
        sDelta[tid] = i < Lq ? p.delta[row_base + i] : 0.f;
      }
      cp_async_wait<0>();
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
      float acc_s[Tr::kNTilesM][4], acc_dp[Tr::kNTilesM][4];
      zero_acc(acc_s);
      zero_acc(acc_dp);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        ldmatrix_x4(ak, sK + (wkey + (lane & 15)) * S + kk * 16 + (lane >> 4) * 8);
        ldmatrix_x4(av, sV + (wkey + (lane & 15)) * S + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          const int off = (np * 16 + (lane >> 4) * 8 + (lane & 7)) * S + kk * 16 + ((lane >> 3) & 1) * 8;
          uint32_t bq[4], bo[4];
          ldmatrix_x4(bq, sQ + off);
          ldmatrix_x4(bo, sdO + off);
          mma_n16<T>(acc_s + 2 * np, ak, bq);
          mma_n16<T>(acc_dp + 2 * np, av, bo);
        }
      }

      // P^T and dS^T = P^T (dP^T - delta), elementwise; element e of tile j is
      // key n0 + wkey + g (+8 for e >= 2), query m0 + 8j + 2t + (e & 1).
      const bool inside = !kHasMask && band.tile_inside(m0, m0 + BM, n0, n0 + BN);
#pragma unroll
      for (int j = 0; j < Tr::kNTilesM; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = 8 * j + 2 * t + (e & 1);
          const int key = n0 + wkey + g + (e >= 2 ? 8 : 0), i = m0 + qc;
          float s2 = acc_s[j][e] * p.scale_log2;
          if (!inside) {
            if (!band.visible(i, key)) s2 = -INFINITY;
            else if (kHasMask) s2 = mask.apply(s2, i, key);
          }
          const float pr = exp2f(s2 - sLse[qc]);  // hidden: exp2(-inf) = 0; dead rows: exp2(-inf) = 0
          const float ds = pr * (acc_dp[j][e] - sDelta[qc]);
          acc_s[j][e] = pr;
          acc_dp[j][e] = ds;
          if (dmask != nullptr && i < Lq && key < Lk) dmask[static_cast<int64_t>(i) * Lk + key] = ds;
        }

      // dV += P^T dO and dK += dS^T Q (k = queries), and dS^T -> smem for dQ.
#pragma unroll
      for (int kq = 0; kq < BM / 16; ++kq) {
        uint32_t ap[4], as[4];
        acc_to_a<T>(acc_s + 2 * kq, ap);
        acc_to_a<T>(acc_dp + 2 * kq, as);
        // dS^T rows (keys) wkey + g and + 8, columns (queries) 16 kq + 2t (+8).
        *reinterpret_cast<uint32_t*>(sdS + (wkey + g) * SS + kq * 16 + 2 * t) = as[0];
        *reinterpret_cast<uint32_t*>(sdS + (wkey + g + 8) * SS + kq * 16 + 2 * t) = as[1];
        *reinterpret_cast<uint32_t*>(sdS + (wkey + g) * SS + kq * 16 + 8 + 2 * t) = as[2];
        *reinterpret_cast<uint32_t*>(sdS + (wkey + g + 8) * SS + kq * 16 + 8 + 2 * t) = as[3];
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          const int off = (kq * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * S + dp * 16 + (lane >> 4) * 8;
          uint32_t bo[4], bq[4];
          ldmatrix_x4_trans(bo, sdO + off);
          ldmatrix_x4_trans(bq, sQ + off);
          mma_n16<T>(acc_dv + 2 * dp, ap, bo);
          mma_n16<T>(acc_dk + 2 * dp, as, bq);
        }
      }
      __syncthreads();  // dS^T complete

      // dQ[rows qm0.., cols dc0..] += dS K, split over the warps by row and column groups.
      {
        const int qm0 = (warp % Tr::kDqRowGroups) * 16, dc0 = (warp / Tr::kDqRowGroups) * Tr::kDqCols;
        float acc_dq[Tr::kNTilesDq][4];
        zero_acc(acc_dq);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          const int mi = lane >> 3;
          ldmatrix_x4_trans(a, sdS + (kk * 16 + (mi >> 1) * 8 + (lane & 7)) * SS + qm0 + (mi & 1) * 8);
          const T* krow = sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * S + dc0;
#pragma unroll
          for (int dp = 0; dp < Tr::kNTilesDq / 2; ++dp) {
            uint32_t bk[4];
            ldmatrix_x4_trans(bk, krow + dp * 16 + (lane >> 4) * 8);
            mma_n16<T>(acc_dq + 2 * dp, a, bk);
          }
          if constexpr (Tr::kNTilesDq % 2 == 1) {  // odd n8 tile: two matrices
            uint32_t bk[2];
            ldmatrix_x2_trans(bk, krow + (Tr::kNTilesDq - 1) * 8);
            ElemOps<T>::mma(acc_dq[Tr::kNTilesDq - 1], a, bk);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = m0 + qm0 + g + 8 * r;
          if (i >= Lq) continue;
          float* dst = dq_accum + static_cast<int64_t>(i) * D + dc0 + 2 * t;
#pragma unroll
          for (int d = 0; d < Tr::kNTilesDq; ++d) {
            atomicAdd(dst + d * 8, acc_dq[d][2 * r]);
            atomicAdd(dst + d * 8 + 1, acc_dq[d][2 * r + 1]);
          }
        }
      }
      __syncthreads();  // before the next step overwrites Q, dO, dS^T
    }
  }

  cp_async_wait<0>();  // K/V copies are still in flight when no query block saw these keys

  // dK = scale * sum dS^T Q, dV = sum P^T dO; keys past Lk are not written.
  // (The first key row read again rather than kept live through the loop: registers.)
  const int k0 = p.cu_k != nullptr ? p.cu_k[b] : 0;
  T* dk = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h + k0 * p.dk_st.r;
  T* dv = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h + k0 * p.dv_st.r;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + wkey + g + 8 * r;
    if (key >= Lk) continue;
#pragma unroll
    for (int d = 0; d < Tr::kNTilesD; ++d) {
      const int c = d * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk + key * p.dk_st.r + c) =
          ElemOps<T>::pack(acc_dk[d][2 * r] * p.scale, acc_dk[d][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv + key * p.dv_st.r + c) = ElemOps<T>::pack(acc_dv[d][2 * r], acc_dv[d][2 * r + 1]);
    }
  }
}

// Grids and launches of one backward instance (preprocess, main, convert),
// queued in order by `launch` (see launch_fwd).
template <typename T, int D, bool kHasMask, typename Launch>
int launch_bwd(const BwdParams& p, const Launch& launch) {
  using Tr = typename BwdConfig<D>::Traits;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  constexpr int kRowsPerBlock = 8;  // one warp per row
  int e = launch(flash_bwd_preprocess_kernel<T>, dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)),
                 32 * kRowsPerBlock, 0, p);
  if (e != 0) return e;
  e = launch(flash_bwd_kernel<T, Tr, kHasMask>, dim3((p.Lk + Tr::kBlockN - 1) / Tr::kBlockN, p.Hkv, p.B),
             Tr::kNThreads, Tr::kSmemBytes, p);
  if (e != 0) return e;
  int64_t nb, nr;
  dq_accum_shape(p, nb, nr);
  const int64_t blocks = (nb * p.Hq * nr * D + 255) / 256;  // grid-stride loop beyond 2^19 blocks
  return launch(flash_bwd_convert_dq_kernel<T>, dim3(static_cast<unsigned>(blocks < (1 << 19) ? blocks : (1 << 19))),
                256, 0, p);
}

// The one place turning (dtype, head dim, mask or not) into a bwd instance.
// A head dim without a kernel returns 1 (cudaErrorInvalidValue).
template <typename Launch>
int dispatch_bwd(const BwdParams& p, const Launch& launch) {
  return ATTNFAST_ELEM_SWITCH(p.elem, T, [&] {
    return ATTNFAST_BWD_HEADDIM_SWITCH(p.D, kD, [&] {
      return ATTNFAST_BOOL_SWITCH(p.mask_kind != MaskKind::none, kHasMask,
                                  [&] { return launch_bwd<T, kD, kHasMask>(p, launch); });
    });
  });
}

}  // namespace cuda
}  // namespace attnfast
