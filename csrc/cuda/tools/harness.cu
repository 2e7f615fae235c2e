// Standalone test and timing harness of the CUDA attention kernels (no torch).
//
// Build from the repository root (or `make harness`):
//   mkdir -p build && nvcc -O3 -std=c++17 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -Icsrc/cuda csrc/cuda/tools/harness.cu csrc/cuda/flash_fwd.cu csrc/cuda/flash_bwd.cu -o build/attnfast_harness
//
// Usage:
//   build/attnfast_harness                  every case of the table, bf16 and f16
//   build/attnfast_harness --filter NAME    only cases whose name contains NAME
//   build/attnfast_harness --bench          throughput at B=4, H=16, D=128, L=4096, bf16
//
// Each case runs run_fwd (and run_bwd) on random inputs and compares with a
// double-precision CPU reference computed from the same rounded inputs.
// Exit status: 0 when every case passes, 1 when one fails, 2 on a CUDA error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "flash.h"

using attnfast::cuda::BwdParams;
using attnfast::cuda::Elem;
using attnfast::cuda::FwdParams;
using attnfast::cuda::MaskKind;
using attnfast::cuda::Strides3;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

#define CK(call)                                                                                  \
  do {                                                                                            \
    const cudaError_t ck_err_ = (call);                                                           \
    if (ck_err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,                   \
                   cudaGetErrorString(ck_err_));                                                  \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

// A launcher's own return code, then the sticky error state: a launch can
// fail after the launcher returned (e.g. a bad configuration of a later kernel).
#define CK_LAUNCH(expr)                              \
  do {                                               \
    CK(static_cast<cudaError_t>(expr));              \
    CK(cudaGetLastError());                          \
  } while (0)

// ---------------------------------------------------------------- host numerics

uint16_t to_bits(float x, Elem e) {
  if (e == Elem::bf16) return __nv_bfloat16_raw(__float2bfloat16_rn(x)).x;
  return __half_raw(__float2half_rn(x)).x;
}

float from_bits(uint16_t b, Elem e) {
  if (e == Elem::bf16) {
    __nv_bfloat16_raw r;
    r.x = b;
    return __bfloat162float(__nv_bfloat16(r));
  }
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

const char* elem_name(Elem e) { return e == Elem::bf16 ? "bf16" : "f16"; }

// splitmix64: fixed-seed, platform-independent, so a failing case reproduces.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }  // (0, 1)
  double normal() {
    return std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform());
  }
};

// ---------------------------------------------------------------- cases

enum class Diag { top_left, bottom_right };
enum class MaskSpec { none, key_padding, additive };
enum class Layout { bhld, blhd };  // blhd: heads interleaved in each row, as q.transpose(1, 2) gives

struct Case {
  const char* name;
  int B, Hq, Hkv, Lq, Lk;
  Diag diag;
  int window_left, window_right;  // -1 = unbounded; causal = (-1, 0)
  MaskSpec mask;
  Layout layout;
};

// Lengths are deliberately off the tile sizes (32/64/128 queries, 32/64/128 keys)
// and cover Lq < Lk, Lq > Lk (bottom-right leaves early rows with no key) and
// single rows/keys.  Every case runs for each head dim with a forward kernel
// (FwdHeadDims, flash.h) and both dtypes; the backward runs where a backward
// kernel exists.
const Case kCases[] = {
    // name                  B  Hq Hkv  Lq    Lk   diag               wl  wr  mask                   layout
    {"full",                 2, 2, 2,   203,  203, Diag::top_left,     -1, -1, MaskSpec::none,        Layout::bhld},
    {"full_qlt",             1, 2, 2,   17,   113, Diag::top_left,     -1, -1, MaskSpec::none,        Layout::bhld},
    {"single",               1, 1, 1,   1,    1,   Diag::top_left,     -1, -1, MaskSpec::none,        Layout::bhld},
    {"decode",               2, 4, 4,   1,    1025, Diag::top_left,    -1, -1, MaskSpec::none,        Layout::bhld},
    {"causal_tl",            2, 2, 2,   203,  203, Diag::top_left,     -1, 0,  MaskSpec::none,        Layout::bhld},
    {"causal_tl_qlt",        1, 2, 2,   113,  203, Diag::top_left,     -1, 0,  MaskSpec::none,        Layout::bhld},
    {"causal_br_qlt",        1, 2, 2,   113,  1025, Diag::bottom_right, -1, 0, MaskSpec::none,        Layout::bhld},
    {"causal_br_qgt",        1, 2, 2,   203,  17,  Diag::bottom_right, -1, 0,  MaskSpec::none,        Layout::bhld},
    {"causal_br_qgt_long",   1, 2, 2,   1025, 113, Diag::bottom_right, -1, 0,  MaskSpec::none,        Layout::bhld},
    {"causal_br_1",          1, 2, 2,   1,    203, Diag::bottom_right, -1, 0,  MaskSpec::none,        Layout::bhld},
    {"window_l32",           1, 2, 2,   1025, 1025, Diag::top_left,    32, 0,  MaskSpec::none,        Layout::bhld},
    {"window_l32_br",        1, 2, 2,   113,  1025, Diag::bottom_right, 32, 0, MaskSpec::none,        Layout::bhld},
    {"window_l16_r16",       1, 2, 2,   203,  203, Diag::top_left,     16, 16, MaskSpec::none,        Layout::bhld},
    {"gqa_4_2",              2, 4, 2,   203,  203, Diag::top_left,     -1, -1, MaskSpec::none,        Layout::bhld},
    {"gqa_4_1",              1, 4, 1,   113,  203, Diag::top_left,     -1, -1, MaskSpec::none,        Layout::bhld},
    {"gqa_4_1_causal_br",    1, 4, 1,   203,  113, Diag::bottom_right, -1, 0,  MaskSpec::none,        Layout::bhld},
    {"keypad",               2, 2, 2,   113,  203, Diag::top_left,     -1, -1, MaskSpec::key_padding, Layout::bhld},
    {"keypad_causal_gqa",    2, 4, 2,   203,  203, Diag::top_left,     -1, 0,  MaskSpec::key_padding, Layout::bhld},
    {"additive",             2, 2, 2,   113,  203, Diag::top_left,     -1, -1, MaskSpec::additive,    Layout::bhld},
    {"additive_causal_gqa",  1, 4, 2,   203,  203, Diag::top_left,     -1, 0,  MaskSpec::additive,    Layout::bhld},
    {"strided_blhd_causal",  2, 4, 2,   113,  203, Diag::bottom_right, -1, 0,  MaskSpec::none,        Layout::blhd},
};

// ---------------------------------------------------------------- problem data

// Element (b, h, r, d) of a (B, H, L, D) operand sits at b*st.b + h*st.h + r*st.r + d.
Strides3 layout_strides(Layout l, int H, int L, int D) {
  if (l == Layout::bhld) return Strides3{int64_t(H) * L * D, int64_t(L) * D, D};
  return Strides3{int64_t(L) * H * D, D, int64_t(H) * D};
}

struct Problem {
  Elem elem;
  int B, Hq, Hkv, Lq, Lk, D;
  int diag, wl, wr;
  bool bwd;
  float scale;
  Layout layout;
  // Inputs as the device sees them, widened to float, logical (B, H, L, D) order.
  std::vector<float> q, k, v, dout;
  MaskKind mask_kind = MaskKind::none;
  std::vector<uint8_t> bmask;  // compact broadcast storage, indexed with mask_st
  std::vector<float> amask;    // additive values after rounding to the dtype
  int64_t mask_st[4] = {0, 0, 0, 0};
};

std::vector<float> random_rounded(Rng& rng, size_t n, Elem e) {
  std::vector<float> x(n);
  for (auto& y : x) y = from_bits(to_bits(static_cast<float>(rng.normal()), e), e);
  return x;
}

Problem make_problem(const Case& c, int D, Elem e, uint64_t seed) {
  Problem p;
  p.elem = e;
  p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.Lq = c.Lq, p.Lk = c.Lk, p.D = D;
  p.diag = c.diag == Diag::bottom_right ? c.Lk - c.Lq : 0;
  p.wl = c.window_left, p.wr = c.window_right;
  p.bwd = attnfast::cuda::bwd_supports_head_dim(D);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  p.layout = c.layout;
  Rng rng(seed);
  p.q = random_rounded(rng, size_t(c.B) * c.Hq * c.Lq * D, e);
  p.k = random_rounded(rng, size_t(c.B) * c.Hkv * c.Lk * D, e);
  p.v = random_rounded(rng, size_t(c.B) * c.Hkv * c.Lk * D, e);
  p.dout = random_rounded(rng, size_t(c.B) * c.Hq * c.Lq * D, e);
  if (c.mask == MaskSpec::key_padding) {
    // (B, 1, 1, Lk) broadcast over heads and queries: batch b keeps a prefix
    // of its keys, a different length per batch, at least one key.
    p.mask_kind = MaskKind::boolean;
    p.bmask.assign(size_t(c.B) * c.Lk, 0);
    for (int b = 0; b < c.B; ++b) {
      const int keep = std::max(1, c.Lk - (b + 1) * c.Lk / (c.B + 2));
      for (int j = 0; j < keep; ++j) p.bmask[size_t(b) * c.Lk + j] = 1;
    }
    p.mask_st[0] = c.Lk, p.mask_st[1] = 0, p.mask_st[2] = 0, p.mask_st[3] = 1;
  } else if (c.mask == MaskSpec::additive) {
    // (B, 1, Lq, Lk) broadcast over heads; ~10% -inf entries, and query row 3
    // of batch 0 fully -inf so a row that sees nothing is exercised.
    p.mask_kind = MaskKind::additive;
    p.amask.resize(size_t(c.B) * c.Lq * c.Lk);
    for (int b = 0; b < c.B; ++b)
      for (int i = 0; i < c.Lq; ++i)
        for (int j = 0; j < c.Lk; ++j) {
          float x = static_cast<float>(rng.normal());
          if (rng.uniform() < 0.1 || (b == 0 && i == 3)) x = -std::numeric_limits<float>::infinity();
          p.amask[(size_t(b) * c.Lq + i) * c.Lk + j] = from_bits(to_bits(x, e), e);
        }
    p.mask_st[0] = int64_t(c.Lq) * c.Lk, p.mask_st[1] = 0, p.mask_st[2] = c.Lk, p.mask_st[3] = 1;
  }
  return p;
}

// ---------------------------------------------------------------- CPU reference

struct Reference {
  std::vector<double> out, lse, dq, dk, dv, dmask;
};

bool band_visible(const Problem& p, int i, int j) {
  if (i >= p.Lq || j >= p.Lk) return false;
  const int d = i + p.diag;
  if (p.wr >= 0 && j > d + p.wr) return false;
  if (p.wl >= 0 && j < d - p.wl) return false;
  return true;
}

// One (batch, query head): forward row by row, then the backward of that row
// while P is at hand.  dK/dV go to a per-query-head slice (reduced over the
// GQA group afterwards) so that threads never share an accumulator.
void reference_head(const Problem& p, int b, int h, Reference& r, std::vector<double>& dk_h,
                    std::vector<double>& dv_h) {
  const int D = p.D, Lk = p.Lk;
  const int hk = h / (p.Hq / p.Hkv);
  const double scale = p.scale;
  const float* q = p.q.data() + (size_t(b) * p.Hq + h) * p.Lq * D;
  const float* dout = p.dout.data() + (size_t(b) * p.Hq + h) * p.Lq * D;
  const float* k = p.k.data() + (size_t(b) * p.Hkv + hk) * Lk * D;
  const float* v = p.v.data() + (size_t(b) * p.Hkv + hk) * Lk * D;
  const size_t row0 = (size_t(b) * p.Hq + h) * p.Lq;
  double* dkh = dk_h.data() + (size_t(b) * p.Hq + h) * Lk * D;
  double* dvh = dv_h.data() + (size_t(b) * p.Hq + h) * Lk * D;
  std::vector<double> s(Lk), o(D), dqi(D);
  std::vector<char> vis(Lk);

  for (int i = 0; i < p.Lq; ++i) {
    const float* qi = q + size_t(i) * D;
    double mx = -kInf;
    for (int j = 0; j < Lk; ++j) {
      vis[j] = 0;
      if (!band_visible(p, i, j)) continue;
      const int64_t moff = b * p.mask_st[0] + h * p.mask_st[1] + i * p.mask_st[2] + j * p.mask_st[3];
      if (p.mask_kind == MaskKind::boolean && !p.bmask[moff]) continue;
      double add = 0.0;
      if (p.mask_kind == MaskKind::additive) {
        add = p.amask[moff];
        if (add == -kInf) continue;
      }
      double dot = 0.0;
      const float* kj = k + size_t(j) * D;
      for (int d = 0; d < D; ++d) dot += double(qi[d]) * kj[d];
      s[j] = scale * dot + add;
      vis[j] = 1;
      mx = std::max(mx, s[j]);
    }
    double* out_i = r.out.data() + (row0 + i) * D;
    if (mx == -kInf) {  // no visible key: out = 0, lse = -inf, no gradient
      for (int d = 0; d < D; ++d) out_i[d] = 0.0;
      r.lse[row0 + i] = -kInf;
      if (p.bwd)
        for (int d = 0; d < D; ++d) r.dq[(row0 + i) * D + d] = 0.0;
      continue;
    }
    double sum = 0.0;
    for (int j = 0; j < Lk; ++j)
      if (vis[j]) sum += (s[j] = std::exp(s[j] - mx));  // s now holds unnormalised P
    r.lse[row0 + i] = mx + std::log(sum);
    std::fill(o.begin(), o.end(), 0.0);
    for (int j = 0; j < Lk; ++j) {
      if (!vis[j]) continue;
      s[j] /= sum;
      const float* vj = v + size_t(j) * D;
      for (int d = 0; d < D; ++d) o[d] += s[j] * vj[d];
    }
    for (int d = 0; d < D; ++d) out_i[d] = o[d];
    if (!p.bwd) continue;

    const float* doi = dout + size_t(i) * D;
    double delta = 0.0;
    for (int d = 0; d < D; ++d) delta += double(doi[d]) * o[d];
    std::fill(dqi.begin(), dqi.end(), 0.0);
    for (int j = 0; j < Lk; ++j) {
      if (!vis[j]) continue;
      const float* vj = v + size_t(j) * D;
      const float* kj = k + size_t(j) * D;
      double dp = 0.0;
      for (int d = 0; d < D; ++d) dp += double(doi[d]) * vj[d];
      const double ds = s[j] * (dp - delta);
      if (!r.dmask.empty()) r.dmask[(row0 + i) * Lk + j] = ds;
      double* dkj = dkh + size_t(j) * D;
      double* dvj = dvh + size_t(j) * D;
      for (int d = 0; d < D; ++d) {
        dqi[d] += ds * kj[d];
        dkj[d] += scale * ds * qi[d];
        dvj[d] += s[j] * doi[d];
      }
    }
    for (int d = 0; d < D; ++d) r.dq[(row0 + i) * D + d] = scale * dqi[d];
  }
}

Reference reference(const Problem& p) {
  Reference r;
  const size_t nq = size_t(p.B) * p.Hq * p.Lq;
  r.out.assign(nq * p.D, 0.0);
  r.lse.assign(nq, 0.0);
  std::vector<double> dk_h, dv_h;
  if (p.bwd) {
    r.dq.assign(nq * p.D, 0.0);
    dk_h.assign(size_t(p.B) * p.Hq * p.Lk * p.D, 0.0);
    dv_h.assign(dk_h.size(), 0.0);
    if (p.mask_kind == MaskKind::additive) r.dmask.assign(nq * p.Lk, 0.0);
  }
  // The heads are independent: spread them over the host cores.
  const int units = p.B * p.Hq;
  const int nthreads = std::max(1, std::min<int>(units, std::thread::hardware_concurrency()));
  std::atomic<int> next{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < nthreads; ++t)
    pool.emplace_back([&] {
      for (int u; (u = next++) < units;) reference_head(p, u / p.Hq, u % p.Hq, r, dk_h, dv_h);
    });
  for (auto& t : pool) t.join();
  if (p.bwd) {
    const int group = p.Hq / p.Hkv;
    const size_t head = size_t(p.Lk) * p.D;
    r.dk.assign(size_t(p.B) * p.Hkv * head, 0.0);
    r.dv.assign(r.dk.size(), 0.0);
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.Hq; ++h) {
        const size_t src = (size_t(b) * p.Hq + h) * head, dst = (size_t(b) * p.Hkv + h / group) * head;
        for (size_t x = 0; x < head; ++x) {
          r.dk[dst + x] += dk_h[src + x];
          r.dv[dst + x] += dv_h[src + x];
        }
      }
  }
  return r;
}

// ---------------------------------------------------------------- comparison

struct Err {
  double max_abs = 0.0, rel = 0.0;
  size_t unwritten = 0;  // NaN (the poison) where the reference is finite
  bool nan = false;
  // The reference is zero up to rounding (dQ and dK when every row sees a
  // single key: dS = P (dP - delta) cancels exactly).  A relative error means
  // nothing there; such a tensor is judged by its absolute error.
  bool zero_ref = false;
};

constexpr double kZeroRefRms = 1e-6;  // reference RMS below which a tensor counts as zero
constexpr double kZeroRefAbs = 1e-3;  // allowed max abs error of such a tensor

Err compare(const std::vector<float>& x, const std::vector<double>& ref) {
  Err e;
  double num = 0.0, den = 0.0;
  for (size_t n = 0; n < x.size(); ++n) {
    if (std::isnan(x[n])) {
      e.nan = true;
      if (std::isfinite(ref[n])) ++e.unwritten;
      continue;
    }
    const double diff = std::fabs(double(x[n]) - ref[n]);
    e.max_abs = std::max(e.max_abs, diff);
    num += diff * diff;
    den += ref[n] * ref[n];
  }
  e.zero_ref = std::sqrt(den / std::max<size_t>(x.size(), 1)) < kZeroRefRms;
  e.rel = num == 0.0 ? 0.0 : std::sqrt(num) / std::sqrt(std::max(den, 1e-300));
  if (e.nan) e.rel = e.max_abs = std::numeric_limits<double>::quiet_NaN();
  return e;
}

// lse: -inf must match -inf exactly (rows with no visible key); otherwise the
// absolute error.
Err compare_lse(const std::vector<float>& x, const std::vector<double>& ref) {
  Err e;
  for (size_t n = 0; n < x.size(); ++n) {
    if (std::isnan(x[n])) {
      e.nan = true;
      ++e.unwritten;
      continue;
    }
    const bool xi = std::isinf(x[n]), ri = std::isinf(ref[n]);
    const double diff = (xi || ri) ? (xi && ri && (x[n] < 0) == (ref[n] < 0) ? 0.0 : kInf)
                                   : std::fabs(double(x[n]) - ref[n]);
    e.max_abs = std::max(e.max_abs, diff);
  }
  if (e.nan) e.max_abs = std::numeric_limits<double>::quiet_NaN();
  e.rel = e.max_abs;
  return e;
}

// ---------------------------------------------------------------- device buffers

struct DevBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  explicit DevBuf(size_t n) : bytes(n) { CK(cudaMalloc(&ptr, std::max<size_t>(n, 16))); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~DevBuf() {
    if (ptr) cudaFree(ptr);
  }
  template <typename X>
  X* as() const {
    return static_cast<X*>(ptr);
  }
  // 0xFF bytes are NaN in bf16, f16 and fp32: an element the kernel never
  // writes stays NaN and fails the comparison.
  void poison() const { CK(cudaMemset(ptr, 0xFF, bytes)); }
};

// Logical (B, H, L, D) floats -> device elements in layout st.
DevBuf upload(const std::vector<float>& x, int B, int H, int L, int D, Strides3 st, Elem e) {
  std::vector<uint16_t> h(x.size());
  for (int b = 0; b < B; ++b)
    for (int hh = 0; hh < H; ++hh)
      for (int r = 0; r < L; ++r)
        for (int d = 0; d < D; ++d)
          h[b * st.b + hh * st.h + r * st.r + d] = to_bits(x[((size_t(b) * H + hh) * L + r) * D + d], e);
  DevBuf buf(h.size() * 2);
  CK(cudaMemcpy(buf.ptr, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  return buf;
}

std::vector<float> download(const DevBuf& buf, int B, int H, int L, int D, Strides3 st, Elem e) {
  std::vector<uint16_t> h(size_t(B) * H * L * D);
  CK(cudaMemcpy(h.data(), buf.ptr, h.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> x(h.size());
  for (int b = 0; b < B; ++b)
    for (int hh = 0; hh < H; ++hh)
      for (int r = 0; r < L; ++r)
        for (int d = 0; d < D; ++d)
          x[((size_t(b) * H + hh) * L + r) * D + d] = from_bits(h[b * st.b + hh * st.h + r * st.r + d], e);
  return x;
}

std::vector<float> download_f32(const DevBuf& buf, size_t n) {
  std::vector<float> x(n);
  CK(cudaMemcpy(x.data(), buf.ptr, n * 4, cudaMemcpyDeviceToHost));
  return x;
}

// Median kernel time in ms of `launch` (which enqueues on `stream`), after a warm-up.
template <typename F>
float median_ms(F&& launch, cudaStream_t stream, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) launch(i);
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto& x : ev) CK(cudaEventCreate(&x));
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(ev[2 * i], stream));
    launch(warmup + i);
    CK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  CK(cudaStreamSynchronize(stream));
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) CK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& x : ev) CK(cudaEventDestroy(x));
  std::sort(ms.begin(), ms.end());
  return ms[iters / 2];
}

// ---------------------------------------------------------------- one case

struct Result {
  Err out, lse, dq, dk, dv, dmask;
  bool has_bwd = false, has_dmask = false, pass = false;
  float fwd_ms = 0.f, bwd_ms = 0.f;
};

Result run_case(const Problem& pr, cudaStream_t stream) {
  const Elem e = pr.elem;
  const int B = pr.B, Hq = pr.Hq, Hkv = pr.Hkv, Lq = pr.Lq, Lk = pr.Lk, D = pr.D;
  const Strides3 q_st = layout_strides(pr.layout, Hq, Lq, D);
  const Strides3 kv_st = layout_strides(pr.layout, Hkv, Lk, D);
  const size_t nq = size_t(B) * Hq * Lq, nk = size_t(B) * Hkv * Lk;

  DevBuf q = upload(pr.q, B, Hq, Lq, D, q_st, e);
  DevBuf k = upload(pr.k, B, Hkv, Lk, D, kv_st, e);
  DevBuf v = upload(pr.v, B, Hkv, Lk, D, kv_st, e);
  DevBuf mask;
  if (pr.mask_kind == MaskKind::boolean) {
    mask = DevBuf(pr.bmask.size());
    CK(cudaMemcpy(mask.ptr, pr.bmask.data(), pr.bmask.size(), cudaMemcpyHostToDevice));
  } else if (pr.mask_kind == MaskKind::additive) {
    std::vector<uint16_t> h(pr.amask.size());
    for (size_t n = 0; n < h.size(); ++n) h[n] = to_bits(pr.amask[n], e);
    mask = DevBuf(h.size() * 2);
    CK(cudaMemcpy(mask.ptr, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  }
  DevBuf out(nq * D * 2), lse(nq * 4);

  FwdParams f{};
  f.elem = e;
  f.B = B, f.Hq = Hq, f.Hkv = Hkv, f.Lq = Lq, f.Lk = Lk, f.D = D;
  f.q = q.ptr, f.k = k.ptr, f.v = v.ptr;
  f.q_st = q_st, f.k_st = kv_st, f.v_st = kv_st;
  f.mask_kind = pr.mask_kind;
  f.mask = mask.ptr;
  for (int i = 0; i < 4; ++i) f.mask_st[i] = pr.mask_st[i];
  f.scale = pr.scale;
  f.scale_log2 = static_cast<float>(double(pr.scale) * 1.4426950408889634);
  f.diag_offset = pr.diag;
  f.window_left = pr.wl;
  f.window_right = pr.wr;
  f.out = out.ptr;
  f.out_st = q_st;
  f.lse = lse.as<float>();

  Result res;
  out.poison();
  lse.poison();
  CK_LAUNCH(attnfast::cuda::run_fwd(f, stream));
  CK(cudaStreamSynchronize(stream));
  const std::vector<float> out_h = download(out, B, Hq, Lq, D, q_st, e);
  const std::vector<float> lse_h = download_f32(lse, nq);

  // The backward runs on the kernel's own forward outputs, as in training.
  DevBuf dout, delta, dq_accum, dq, dk, dv, dmask;
  BwdParams bp{};
  std::vector<float> dq_h, dk_h, dv_h, dmask_h;
  if (pr.bwd) {
    dout = upload(pr.dout, B, Hq, Lq, D, q_st, e);
    delta = DevBuf(nq * 4);
    dq_accum = DevBuf(nq * D * 4);
    dq = DevBuf(nq * D * 2);
    dk = DevBuf(nk * D * 2);
    dv = DevBuf(nk * D * 2);
    static_cast<attnfast::cuda::AttnParams&>(bp) = f;
    bp.out = out.ptr;
    bp.out_st = q_st;
    bp.dout = dout.ptr;
    bp.dout_st = q_st;
    bp.lse = lse.as<float>();
    bp.dlse = nullptr;
    bp.delta = delta.as<float>();
    bp.dq_accum = dq_accum.as<float>();
    bp.dq = dq.ptr;
    bp.dk = dk.ptr;
    bp.dv = dv.ptr;
    bp.dq_st = layout_strides(Layout::bhld, Hq, Lq, D);  // contiguous (B, H, L, D)
    bp.dk_st = layout_strides(Layout::bhld, Hkv, Lk, D);
    bp.dv_st = bp.dk_st;
    bp.dmask = nullptr;
    if (pr.mask_kind == MaskKind::additive) {
      dmask = DevBuf(nq * Lk * 4);
      // The kernel writes dmask only in the tiles it visits (tiles outside the
      // band are skipped); the caller's buffer starts at zero, so no poison.
      CK(cudaMemset(dmask.ptr, 0, dmask.bytes));
      bp.dmask = dmask.as<float>();
    }
    // Scratch too: the kernel must produce delta and zero dq_accum itself.
    delta.poison();
    dq_accum.poison();
    dq.poison();
    dk.poison();
    dv.poison();
    CK_LAUNCH(attnfast::cuda::run_bwd(bp, stream));
    CK(cudaStreamSynchronize(stream));
    const Strides3 cq = layout_strides(Layout::bhld, Hq, Lq, D), ck = layout_strides(Layout::bhld, Hkv, Lk, D);
    dq_h = download(dq, B, Hq, Lq, D, cq, e);
    dk_h = download(dk, B, Hkv, Lk, D, ck, e);
    dv_h = download(dv, B, Hkv, Lk, D, ck, e);
    if (bp.dmask) dmask_h = download_f32(dmask, nq * Lk);
  }

  const Reference ref = reference(pr);
  const double tol = e == Elem::bf16 ? 2e-2 : 5e-3;
  auto ok = [&](const Err& x) {
    return !x.nan && x.unwritten == 0 && (x.zero_ref ? x.max_abs <= kZeroRefAbs : x.rel <= tol);
  };
  res.out = compare(out_h, ref.out);
  res.lse = compare_lse(lse_h, ref.lse);
  res.pass = ok(res.out) && !res.lse.nan && res.lse.max_abs <= 1e-2;
  if (pr.bwd) {
    res.has_bwd = true;
    res.dq = compare(dq_h, ref.dq);
    res.dk = compare(dk_h, ref.dk);
    res.dv = compare(dv_h, ref.dv);
    res.pass = res.pass && ok(res.dq) && ok(res.dk) && ok(res.dv);
    if (!dmask_h.empty()) {
      res.has_dmask = true;
      res.dmask = compare(dmask_h, ref.dmask);
      res.pass = res.pass && ok(res.dmask);
    }
  }

  res.fwd_ms = median_ms([&](int) { CK_LAUNCH(attnfast::cuda::run_fwd(f, stream)); }, stream, 3, 10);
  if (pr.bwd) res.bwd_ms = median_ms([&](int) { CK_LAUNCH(attnfast::cuda::run_bwd(bp, stream)); }, stream, 3, 10);
  CK(cudaStreamSynchronize(stream));
  return res;
}

// "max_abs/rel", or why there is no such pair.
std::string fmt_err(const Err& e) {
  char s[64];
  if (e.unwritten)
    std::snprintf(s, sizeof s, "%zu-unwritten", e.unwritten);
  else if (e.zero_ref)
    std::snprintf(s, sizeof s, "%.1e/zero-ref", e.max_abs);
  else
    std::snprintf(s, sizeof s, "%.1e/%.1e", e.max_abs, e.rel);
  return s;
}

std::string fmt_lse(const Err& e) {
  char s[64];
  if (e.unwritten)
    std::snprintf(s, sizeof s, "%zu-unwritten", e.unwritten);
  else
    std::snprintf(s, sizeof s, "%.1e", e.max_abs);
  return s;
}

int run_tests(const char* filter, cudaStream_t stream) {
  std::printf("errors: max abs / relative (||x - ref|| / ||ref||); lse: max abs; "
              "pass: rel <= 2e-2 (bf16), 5e-3 (f16), lse <= 1e-2, "
              "max abs <= 1e-3 where the reference is zero (zero-ref); times: median of 10 runs\n");
  int passed = 0, total = 0;
  uint64_t seed = 1;
  for (const Case& c : kCases) {
    if (filter && !std::strstr(c.name, filter)) continue;
    for (int D : attnfast::cuda::FwdHeadDims::kList)
      for (Elem e : {Elem::bf16, Elem::f16}) {
        const Problem pr = make_problem(c, D, e, seed++);
        const Result r = run_case(pr, stream);
        ++total;
        passed += r.pass;
        const std::string dq = r.has_bwd ? fmt_err(r.dq) : "-", dk = r.has_bwd ? fmt_err(r.dk) : "-",
                          dv = r.has_bwd ? fmt_err(r.dv) : "-", dm = r.has_dmask ? fmt_err(r.dmask) : "-";
        char bwd_ms[32] = "-";
        if (r.has_bwd) std::snprintf(bwd_ms, sizeof bwd_ms, "%.3f", r.bwd_ms);
        std::printf("%-20s %-4s D=%-3d B=%d Hq=%d Hkv=%d Lq=%-4d Lk=%-4d | out %s lse %s | dq %s dk %s dv %s"
                    " dmask %s | %s | fwd %.3f ms bwd %s ms\n",
                    c.name, elem_name(e), D, pr.B, pr.Hq, pr.Hkv, pr.Lq, pr.Lk, fmt_err(r.out).c_str(),
                    fmt_lse(r.lse).c_str(), dq.c_str(), dk.c_str(), dv.c_str(), dm.c_str(), r.pass ? "PASS" : "FAIL",
                    r.fwd_ms, bwd_ms);
        std::fflush(stdout);
      }
  }
  std::printf("harness: %d/%d cases passed\n", passed, total);
  return total > 0 && passed == total ? 0 : 1;
}

// ---------------------------------------------------------------- bench

// Device-side fill: the bench inputs are too large to generate on the host
// quickly.  A hashed index gives each element an independent approximately
// normal value (sum of four uniforms, variance 1).
__global__ void fill_random_kernel(uint16_t* x, int64_t n, uint64_t seed, int is_bf16) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = seed + uint64_t(i) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float acc = 0.f;
    for (int u = 0; u < 4; ++u) acc += float((z >> (16 * u)) & 0xFFFF) * (1.f / 65536.f);
    const float y = (acc - 2.f) * 1.7320508f;  // sum of 4 U(0,1): mean 2, variance 1/3
    if (is_bf16)
      x[i] = __nv_bfloat16_raw(__float2bfloat16_rn(y)).x;
    else
      x[i] = __half_raw(__float2half_rn(y)).x;
  }
}

void fill_random(const DevBuf& buf, uint64_t seed, Elem e, cudaStream_t stream) {
  const int64_t n = int64_t(buf.bytes / 2);
  fill_random_kernel<<<1024, 256, 0, stream>>>(buf.as<uint16_t>(), n, seed, e == Elem::bf16);
  CK(cudaGetLastError());
}

int run_bench(cudaStream_t stream) {
  const int B = 4, H = 16, D = 128, L = 4096;
  const Elem e = Elem::bf16;
  // Enough input sets that one set's q/k/v (192 MiB) plus the others' exceed
  // any L2, so every timed call reads its operands from HBM.
  const int kSets = 3;
  const size_t n = size_t(B) * H * L * D;
  const Strides3 st = layout_strides(Layout::bhld, H, L, D);
  struct Set {
    DevBuf q, k, v, out, dout, lse;
  };
  std::vector<Set> sets;
  for (int s = 0; s < kSets; ++s) {
    Set x{DevBuf(n * 2), DevBuf(n * 2), DevBuf(n * 2), DevBuf(n * 2), DevBuf(n * 2), DevBuf(size_t(B) * H * L * 4)};
    fill_random(x.q, 10 * s + 1, e, stream);
    fill_random(x.k, 10 * s + 2, e, stream);
    fill_random(x.v, 10 * s + 3, e, stream);
    fill_random(x.dout, 10 * s + 4, e, stream);
    sets.push_back(std::move(x));
  }
  DevBuf delta(size_t(B) * H * L * 4), dq_accum(n * 4), dq(n * 2), dk(n * 2), dv(n * 2);
  CK(cudaStreamSynchronize(stream));

  std::printf("bench: bf16 B=%d H=%d D=%d L=%d, %d input sets rotated; FLOPs: forward 4*B*H*L*L*D "
              "(half when causal), backward 2.5x, fwd+bwd 3.5x\n",
              B, H, D, L, kSets);
  for (bool causal : {false, true}) {
    std::vector<FwdParams> fp(kSets);
    std::vector<BwdParams> bp(kSets);
    for (int s = 0; s < kSets; ++s) {
      FwdParams& f = fp[s];
      f = FwdParams{};
      f.elem = e;
      f.B = B, f.Hq = H, f.Hkv = H, f.Lq = L, f.Lk = L, f.D = D;
      f.q = sets[s].q.ptr, f.k = sets[s].k.ptr, f.v = sets[s].v.ptr;
      f.q_st = f.k_st = f.v_st = st;
      f.mask_kind = MaskKind::none;
      f.mask = nullptr;
      f.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
      f.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(double(D)));
      f.diag_offset = 0;
      f.window_left = -1;
      f.window_right = causal ? 0 : -1;
      f.out = sets[s].out.ptr;
      f.out_st = st;
      f.lse = sets[s].lse.as<float>();
      BwdParams& b = bp[s];
      b = BwdParams{};
      static_cast<attnfast::cuda::AttnParams&>(b) = f;
      b.out = f.out, b.out_st = st, b.dout = sets[s].dout.ptr, b.dout_st = st;
      b.lse = f.lse, b.dlse = nullptr, b.delta = delta.as<float>(), b.dq_accum = dq_accum.as<float>();
      b.dq = dq.ptr, b.dk = dk.ptr, b.dv = dv.ptr, b.dmask = nullptr;
      // The backward of each set needs that set's out and lse.
      CK_LAUNCH(attnfast::cuda::run_fwd(f, stream));
    }
    CK(cudaStreamSynchronize(stream));

    const int iters = 20;
    const float fwd = median_ms([&](int i) { CK_LAUNCH(attnfast::cuda::run_fwd(fp[i % kSets], stream)); }, stream,
                                kSets, iters);
    const float bwd = median_ms([&](int i) { CK_LAUNCH(attnfast::cuda::run_bwd(bp[i % kSets], stream)); }, stream,
                                kSets, iters);
    const float both = median_ms(
        [&](int i) {
          CK_LAUNCH(attnfast::cuda::run_fwd(fp[i % kSets], stream));
          CK_LAUNCH(attnfast::cuda::run_bwd(bp[i % kSets], stream));
        },
        stream, kSets, iters);
    const double flops = 4.0 * B * H * double(L) * L * D * (causal ? 0.5 : 1.0);
    auto tflops = [](double fl, float ms) { return fl / (double(ms) * 1e-3) / 1e12; };
    std::printf("bench causal=%d  fwd %8.3f ms %7.1f TFLOP/s | bwd %8.3f ms %7.1f TFLOP/s | fwd+bwd %8.3f ms %7.1f TFLOP/s\n",
                int(causal), fwd, tflops(flops, fwd), bwd, tflops(2.5 * flops, bwd), both,
                tflops(3.5 * flops, both));
    std::fflush(stdout);
  }
  CK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool bench = false;
  const char* filter = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--bench")) {
      bench = true;
    } else if (!std::strcmp(argv[i], "--filter") && i + 1 < argc) {
      filter = argv[++i];
    } else {
      const bool help = !std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h");
      std::fprintf(help ? stdout : stderr,
                   "usage: %s [--filter NAME] | --bench\n"
                   "  (default)      every case of the table against the CPU reference, bf16 and f16\n"
                   "  --filter NAME  only the cases whose name contains NAME\n"
                   "  --bench        forward/backward throughput at B=4, H=16, D=128, L=4096, bf16\n",
                   argv[0]);
      return help ? 0 : 2;
    }
  }
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  if (prop.major < 8) {
    std::fprintf(stderr, "the kernels need sm_80 or newer\n");
    return 2;
  }
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  const int rc = bench ? run_bench(stream) : run_tests(filter, stream);
  CK(cudaStreamDestroy(stream));
  return rc;
}
