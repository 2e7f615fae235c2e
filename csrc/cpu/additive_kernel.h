// Fused additive (Bahdanau) attention on projected queries and keys, float32:
//   s[i][j] = sum_d va[d] * tanh(qp[i][d] + kp[j][d]),  p = softmax_j(s + mask),
//   out[i] = sum_j p[i][j] v[j].
// Never stores the (Lq, Lk, Da) tanh tensor nor the (Lq, Lk) scores: key
// blocks of kBlock are streamed with an online softmax (forward) and the
// scores are recomputed from the saved lse (backward).  Built once per ISA
// (isa_build.h) like the other kernels; everything here but the two entry
// points has internal linkage.
//
// Vectorised over keys: a key block is packed transposed, (Da, kBlock), so
// qp[i][d] + kp[j..j+W][d] is one broadcast and one vector add, and tanh is
// evaluated on whole vectors (tanh_vec).  The tanh evaluations, Lq*Lk*Da of
// them (x2 in the backward), are the cost; everything else is O(Lq*Lk*Ev).
#pragma once
#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

constexpr int64_t kAddBlockK = 64;  // keys per block (a multiple of every vector width)
constexpr int64_t kAddBlockQ = 16;  // query rows per forward work item

// tanh in float32, branch-free, about 1.3 ulp.  |x| < 0.625: x + x^3 P(x^2),
// P of degree 5 fitted (weighted least squares, refined towards minimax) to
// (tanh(x) - x) / x^3 on [0, 0.625]; there the exp form below would lose
// relative accuracy (1 - e cancels).  Elsewhere 1 - 2 / (exp(2|x|) + 1) with
// the sign of x (exp_vec clamps, so large |x| gives exactly +-1).  A first
// version that used the exp form everywhere had ~4x the absolute error of
// torch.tanh for small x and broke the parity rule in about 1 seed in 4.
template <typename V>
inline V tanh_near0(V x) {
  const V z = x * x;
  V y = V{} + 2.2252146154642105e-3f;
  y = y * z - 8.268703706562519e-3f;
  y = y * z + 2.1738363429903984e-2f;
  y = y * z - 5.395381152629852e-2f;
  y = y * z + 1.3333263993263245e-1f;
  y = y * z - 3.333333134651184e-1f;
  return x + x * z * y;
}

template <typename V>
inline V tanh_vec(V x) {
  const V ax = x < 0.f ? -x : x;
  const V big = 1.0f - 2.0f / (exp_vec<V>(ax * 2.0f) + 1.0f);
  return ax < 0.625f ? tanh_near0(x) : (x < 0.f ? -big : big);
}

// tanh(x) and its derivative 1 - tanh(x)^2, both in float32.  For |x| >= 0.625 the
// derivative is 4 / (e + 2 + 1/e), e = exp(2|x|), not 1 - t*t: near |t| = 1 that
// difference cancels.  Relative error against float64 (x in [0.625, 9], float32):
// 1 - t*t up to 1.2e-6 at |x| in [1, 2], 6e-5 in [2, 4], ~1 beyond; this form at most
// 2.3e-7 everywhere (torch's 1 - y*y from a 0.5-ulp y: 1.8e-6, 7.6e-5, ~1).
// Returned by value: V as deduced here is the naturally aligned vector type
// (the element-aligned typedef's attribute does not survive deduction), and a
// reference to it bound to the caller's element-aligned locals is misaligned.
template <typename V>
struct TanhDtanh {
  V t, dt;
};
template <typename V>
inline TanhDtanh<V> tanh_dtanh_vec(V x) {
  const V ax = x < 0.f ? -x : x;
  const V small = tanh_near0(x);
  const V e = exp_vec<V>(ax * 2.0f);
  const V big = 1.0f - 2.0f / (e + 1.0f);
  const auto near0 = ax < 0.625f;
  return {near0 ? small : (x < 0.f ? -big : big), near0 ? 1.0f - small * small : 4.0f / (e + 2.0f + 1.0f / e)};
}

// kt[d][j] = kp[j0 + j][d] for j < n, 0 for the padding up to kAddBlockK.
inline void pack_keys_t(const float* kp, int64_t Da, int64_t j0, int64_t n, float* kt) {
  for (int64_t d = 0; d < Da; ++d) {
    float* row = kt + d * kAddBlockK;
    for (int64_t j = 0; j < n; ++j) row[j] = kp[(j0 + j) * Da + d];
    for (int64_t j = n; j < kAddBlockK; ++j) row[j] = 0.f;
  }
}

// s[j] = sum_d va[d] tanh(q[d] + kt[d][j]) for the kAddBlockK keys of a packed block,
// summed in double (tanh in float): float sums over d left the scores, and through P every
// output and gradient, with up to 6x the error of the naive float32 form.
inline void additive_row(const float* q, const float* kt, const float* va, int64_t Da, float* s) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  typedef double VD __attribute__((vector_size(ATTNFAST_VEC_BYTES), aligned(sizeof(double))));
  typedef float VH __attribute__((vector_size(ATTNFAST_VEC_BYTES / 2), aligned(sizeof(float))));
  constexpr int H2 = W / 2;
  for (int64_t j = 0; j < kAddBlockK; j += W) {
    VD lo = VD{}, hi = VD{};
    for (int64_t d = 0; d < Da; ++d) {
      const V x = *reinterpret_cast<const V*>(kt + d * kAddBlockK + j) + q[d];
      const V t = tanh_vec(x);
      VH tl, th;
      std::memcpy(&tl, &t, sizeof(tl));
      std::memcpy(&th, reinterpret_cast<const float*>(&t) + H2, sizeof(th));
      const double vad = va[d];
      lo += __builtin_convertvector(tl, VD) * vad;
      hi += __builtin_convertvector(th, VD) * vad;
    }
    for (int l = 0; l < H2; ++l) {
      s[j + l] = static_cast<float>(lo[l]);
      s[j + H2 + l] = static_cast<float>(hi[l]);
    }
  }
}

// Mask one score row in place: keys past Lk or (causal) past row i, and the float bias.
inline void additive_mask_row(const AdditiveParams& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
                              float* s) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t hi = p.causal ? imin(n, i - j0 + 1) : n;  // visible keys: j < hi
  if (p.mask != nullptr) {
    const float* m = p.mask + b * p.mask_st.b + h * p.mask_st.h + i * p.mask_st.r + j0 * p.mask_st.c;
    for (int64_t j = 0; j < imax(hi, 0); ++j) s[j] += m[j * p.mask_st.c];
  }
  for (int64_t j = imax(hi, 0); j < kAddBlockK; ++j) s[j] = ninf;
}

// Keys [0, key_end(i)) can be visible from row i.
inline int64_t key_end(const AdditiveParams& p, int64_t i) { return p.causal ? imin(p.Lk, i + 1) : p.Lk; }

void additive_fwd_impl(const AdditiveParams& p) {
  const int64_t Da = p.Da, Ev = p.Ev, nqb = cdiv(p.Lq, kAddBlockQ);
  run_parallel(p, p.B * p.H * nqb, [&](int64_t begin, int64_t end) {
    Buffer<float> kt(Da * kAddBlockK), s(kAddBlockK);
    Buffer<double> m(kAddBlockQ), l(kAddBlockQ), acc(kAddBlockQ * Ev);  // P V summed in double: O(L Ev), cheap
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % nqb, bh = item / nqb, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = qb * kAddBlockQ, nq = imin(kAddBlockQ, p.Lq - i0);
      const float* kp = p.kp + bh * p.Lk * Da;
      const float* v = p.v + bh * p.Lk * Ev;
      const float* va = p.va + h * Da;
      acc.zero();
      for (int64_t i = 0; i < nq; ++i) {
        m[i] = -std::numeric_limits<double>::infinity();
        l[i] = 0.0;
      }
      const int64_t jend = key_end(p, i0 + nq - 1);
      for (int64_t j0 = 0; j0 < jend; j0 += kAddBlockK) {
        const int64_t n = imin(kAddBlockK, p.Lk - j0);
        pack_keys_t(kp, Da, j0, n, kt.data());
        for (int64_t i = 0; i < nq; ++i) {
          if (p.causal && j0 > i0 + i) continue;  // this row sees none of the block
          additive_row(p.qp + (bh * p.Lq + i0 + i) * Da, kt.data(), va, Da, s.data());
          additive_mask_row(p, b, h, i0 + i, j0, n, s.data());
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < n; ++j) mx = (s[j] > mx || s[j] != s[j]) ? s[j] : mx;
          if (mx == -std::numeric_limits<float>::infinity()) continue;  // nothing visible here
          const double m_new = mx != mx || mx > m[i] ? static_cast<double>(mx) : m[i];  // NaN stays
          const double alpha = std::exp(m[i] - m_new);
          double* a = acc.data() + i * Ev;
          double sum = 0.0;
          if (alpha != 1.0)
            for (int64_t e = 0; e < Ev; ++e) a[e] *= alpha;
          for (int64_t j = 0; j < n; ++j) {
            const double pj = std::exp(static_cast<double>(s[j]) - m_new);
            if (pj == 0.0) continue;
            sum += pj;
            const float* vj = v + (j0 + j) * Ev;
            for (int64_t e = 0; e < Ev; ++e) a[e] += pj * vj[e];
          }
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        float* o = p.out + (bh * p.Lq + i0 + i) * Ev;
        const bool dead = l[i] == 0.0;  // no visible key: out 0, lse -inf
        for (int64_t e = 0; e < Ev; ++e) o[e] = dead ? 0.f : static_cast<float>(acc[i * Ev + e] / l[i]);
        p.lse[bh * p.Lq + i0 + i] = dead ? -std::numeric_limits<double>::infinity() : m[i] + std::log(l[i]);
      }
    }
  });
}

// One work item per (batch, head): it owns that head's dkp, dv and dva partial
// (double accumulators: float sums over long rows broke the parity rule).
// Per query row, two sweeps over the visible key blocks:
//   1. P = exp(S - lse) and dP = dO V^T into row panels, delta = rowsum(P * dP);
//   2. dS = P (dP - delta);  dV += P^T dO;  with t = tanh(qp + kp),
//      g = dS (1 - t^2):  dqp[i] += va * sum_j g,  dkp[j] += va * g,  dva += sum_j dS t.
// delta comes from the same P and dP that dS uses (as in attention_kernel.h), not from
// the stored output: with rowsum(dO * O) about 1 seed in 30 broke the parity rule.
void additive_bwd_impl(const AdditiveParams& p) {
  using V = Vec<float>::type;
  constexpr int W = Vec<float>::kWidth;
  const int64_t Da = p.Da, Ev = p.Ev, nkb = cdiv(p.Lk, kAddBlockK), Lkp = nkb * kAddBlockK;
  run_parallel(p, p.B * p.H, [&](int64_t begin, int64_t end) {
    Buffer<float> kt(nkb * Da * kAddBlockK), s(kAddBlockK), pp(Lkp), dpp(Lkp), ds(kAddBlockK), g(kAddBlockK);
    Buffer<double> dk_all(Lkp * Da), dv_all(p.Lk * Ev), dva(Da), dq(Da);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const float* kp = p.kp + bh * p.Lk * Da;
      const float* v = p.v + bh * p.Lk * Ev;
      const float* va = p.va + h * Da;
      for (int64_t t = 0; t < nkb; ++t)
        pack_keys_t(kp, Da, t * kAddBlockK, imin(kAddBlockK, p.Lk - t * kAddBlockK), kt.data() + t * Da * kAddBlockK);
      dk_all.zero();
      dv_all.zero();
      dva.zero();
      for (int64_t i = 0; i < p.Lq; ++i) {
        const double lse = p.lse[bh * p.Lq + i];
        float* dqp = p.dqp + (bh * p.Lq + i) * Da;
        const int64_t jend = key_end(p, i);
        if (lse == -std::numeric_limits<double>::infinity() || jend == 0) {  // sees no key: P = 0
          for (int64_t d = 0; d < Da; ++d) dqp[d] = 0.f;
          continue;
        }
        const float* q = p.qp + (bh * p.Lq + i) * Da;
        const float* dout = p.dout + (bh * p.Lq + i) * Ev;
        // Sweep 1: P and dP panels, delta.
        double delta = p.dlse != nullptr ? -p.dlse[bh * p.Lq + i] : 0.0;
        for (int64_t j0 = 0; j0 < jend; j0 += kAddBlockK) {
          const int64_t n = imin(kAddBlockK, p.Lk - j0);
          additive_row(q, kt.data() + (j0 / kAddBlockK) * Da * kAddBlockK, va, Da, s.data());
          additive_mask_row(p, b, h, i, j0, n, s.data());
          for (int64_t j = 0; j < kAddBlockK; ++j) {
            const float pj = j < n ? static_cast<float>(std::exp(static_cast<double>(s[j]) - lse)) : 0.f;
            float dpj = 0.f;
            if (pj != 0.f) {
              const float* vj = v + (j0 + j) * Ev;
              double acc = 0.0;
              for (int64_t e = 0; e < Ev; ++e) acc += static_cast<double>(dout[e]) * vj[e];
              dpj = static_cast<float>(acc);
              delta += static_cast<double>(pj) * dpj;
            }
            pp[j0 + j] = pj;
            dpp[j0 + j] = dpj;
          }
        }
        // Sweep 2: gradients.
        dq.zero();
        for (int64_t j0 = 0; j0 < jend; j0 += kAddBlockK) {
          const float* ktb = kt.data() + (j0 / kAddBlockK) * Da * kAddBlockK;
          bool any = false;
          for (int64_t j = 0; j < kAddBlockK; ++j) {
            const float pj = pp[j0 + j];
            ds[j] = static_cast<float>(pj * (static_cast<double>(dpp[j0 + j]) - delta));
            if (pj == 0.f) continue;
            any = true;
            double* dvj = dv_all.data() + (j0 + j) * Ev;
            for (int64_t e = 0; e < Ev; ++e) dvj[e] += static_cast<double>(pj) * dout[e];
          }
          if (!any) continue;
          for (int64_t d = 0; d < Da; ++d) {
            V gq = V{}, gv = V{};
            for (int64_t j = 0; j < kAddBlockK; j += W) {
              const V x = *reinterpret_cast<const V*>(ktb + d * kAddBlockK + j) + q[d];
              const auto [t, dt] = tanh_dtanh_vec(x);
              const V dsv = *reinterpret_cast<const V*>(ds.data() + j);
              const V gj = dsv * dt;
              gq += gj;
              gv += dsv * t;
              *reinterpret_cast<V*>(g.data() + j) = gj;
            }
            const double vad = va[d];
            double* dk = dk_all.data() + d * Lkp + j0;
            for (int64_t j = 0; j < kAddBlockK; ++j) dk[j] += vad * g[j];
            double sq = 0.0, sv = 0.0;
            for (int l2 = 0; l2 < W; ++l2) {
              sq += gq[l2];
              sv += gv[l2];
            }
            dq[d] += sq * vad;
            dva[d] += sv;
          }
        }
        for (int64_t d = 0; d < Da; ++d) dqp[d] = static_cast<float>(dq[d]);
      }
      float* dkp = p.dkp + bh * p.Lk * Da;
      for (int64_t j = 0; j < p.Lk; ++j) {
        for (int64_t d = 0; d < Da; ++d) dkp[j * Da + d] = static_cast<float>(dk_all[d * Lkp + j]);
        for (int64_t e = 0; e < Ev; ++e) p.dv[(bh * p.Lk + j) * Ev + e] = static_cast<float>(dv_all[j * Ev + e]);
      }
      for (int64_t d = 0; d < Da; ++d) p.dva[bh * Da + d] = static_cast<float>(dva[d]);
    }
  });
}

}  // namespace

void additive_fwd(const AdditiveParams& p) { additive_fwd_impl(p); }
void additive_bwd(const AdditiveParams& p) { additive_bwd_impl(p); }

}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
