// Measurements of the machine and of the micro-kernel alone, for the
// benchmarks' roofline (python -m attnfast bench roofline): each ISA build
// reports on its own code.
//   kind 0: FMA throughput, 12 independent chains of vector FMAs per thread,
//           on `threads` threads at once (the peak the kernels are held to);
//   kind 1: the score product S = Q K^T of one (m, d) x (d, n) tile, as the
//           forward runs it (kKCHead chunks, packed K^T), one thread;
//   kind 2: the P V product with the online-softmax rescale (kKCSeq), one thread.
// Every run writes seconds and flops; the caller divides.
#pragma once
#include <chrono>

#include "tile_ops.h"

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

constexpr int kChains = 12;

// Returns a value that depends on every chain so the loop is kept.
inline float fma_chains(int64_t iters) {
  using V = Vec<float>::type;
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = splat<V>(1.0f + 0.001f * static_cast<float>(c));
  const V a = splat<V>(0.999999f), b = splat<V>(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
  }
  V s = V{};
  for (int c = 0; c < kChains; ++c) s += acc[c];
  return hsum(s);
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void probe_impl(const ProbeParams& p) {
  double* res = p.result;
  constexpr int W = Vec<float>::kWidth;
  if (p.kind == 0) {
    Buffer<float> sink(p.threads);
    const auto t0 = std::chrono::steady_clock::now();
    run_parallel(p, p.threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) sink[t] = fma_chains(p.iters);
    });
    res[0] = seconds_since(t0);
    res[1] = 2.0 * kChains * W * static_cast<double>(p.iters) * static_cast<double>(p.threads);
    res[2] = 0.0;
    for (int64_t t = 0; t < p.threads; ++t) res[2] += sink[t];
    return;
  }
  const int64_t m = p.m, d = p.d, n = p.n, ldb = pad_up(n);
  Buffer<float> a(m * d), b(d * ldb), c(m * ldb), alpha(pad_up(m));
  for (int64_t x = 0; x < m * d; ++x) a[x] = static_cast<float>((x * 7919) % 1000) * 1e-3f;
  for (int64_t x = 0; x < d * ldb; ++x) b[x] = static_cast<float>((x * 104729) % 1000) * 1e-3f;
  for (int64_t x = 0; x < m; ++x) alpha[x] = 0.5f;
  auto once = [&]() {
    if (p.kind == 1)
      matmul_tile<kKCHead>(a.data(), d, m, d, b.data(), ldb, n, 0.125f, c.data(), ldb);
    else
      matmul_tile<kKCSeq, Epi::kRescale>(a.data(), d, m, d, b.data(), ldb, n, 1.0f, c.data(), ldb, alpha.data());
  };
  once();  // warm the caches
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < p.iters; ++r) once();
  res[0] = seconds_since(t0);
  res[1] = 2.0 * static_cast<double>(m) * static_cast<double>(d) * static_cast<double>(n) *
           static_cast<double>(p.iters);
  res[2] = c[0];
}

}  // namespace

void probe(const ProbeParams& p) { probe_impl(p); }
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
