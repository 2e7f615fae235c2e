// Counter-based dropout RNG shared by every attnfast backend.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
// The random word for attention-probability element (b, h, i, j) is the first
// output word of philox(key = seed, counter = (lo32(n), hi32(n), b*Hq + h, offset))
// with n = i*Lk + j.  The element is kept iff (word >> 8) * 2^-24 >= p.
// attnfast/dropout.py rebuilds exactly this mask in torch (dropout_mask: the
// reference backend and the tests use it), so the forward, the backward and
// the tests all agree without storing a mask.
#pragma once
#include <cstdint>

namespace attnfast {
namespace philox {

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

static inline uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t c2,
                                           uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return c0;
}

// Uniform in [0, 1) with 24 random bits (exact in float32).
static inline float dropout_uniform(uint64_t seed, uint64_t offset, int64_t bh,
                                    int64_t n) {
  const uint32_t word = philox4x32_10_first(
      static_cast<uint32_t>(n), static_cast<uint32_t>(static_cast<uint64_t>(n) >> 32),
      static_cast<uint32_t>(bh), static_cast<uint32_t>(offset),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

}  // namespace philox
}  // namespace attnfast
