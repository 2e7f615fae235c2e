// Building blocks shared by the CPU kernel families (attention_kernel.h,
// additive_kernel.h, topk_kernel.h): element types and their rounding stores,
// scratch buffers, the causal/window visibility rule, the thread-pool hook,
// operand packing, the mask and dropout tiles.  (The
// vector micro-kernel and exp are in simd.h.)
//
// Built once per ISA like the kernels (isa_build.h): everything here has
// internal linkage, so no inline function compiled for a wider ISA can leak
// into another ISA's object through the linker.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include <unistd.h>

#include "params.h"
#include "philox.h"
#include "simd.h"

#ifndef ATTNFAST_ISA_NS
#error "define ATTNFAST_ISA_NS before including tile_ops.h (see isa_build.h)"
#endif

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
namespace {

// Tiles of the dense and top-k kernels: kBlockQ query rows by kBlockK keys.
// One (kBlockQ, kBlockK) fp32 score tile is 96 KiB (it stays in L2); a tile of
// packed K^T at E = 64 is 32 KiB.  (192 query rows halve the traffic of the per-head K/V
// packs, which outgrow L2 beyond L ~ 1024: NOTES.md, v8.)
constexpr int64_t kBlockQ = 192;
constexpr int64_t kBlockK = 128;

// The dense forward's softmax runs over kFwdTiles packed key tiles at once
// (up to kFwdTilesMax): a row's max, exp-sum and rescale cost a fixed amount
// per row and key block besides the per-key work, and with 128 keys that fixed
// part was a third of the softmax (AVX-512: 8 vectors a row).  512 keys
// (4 tiles) when the per-core L2 holds the (kBlockQ, 512) float score block
// twice over (384 KiB each), else 256.  A function of the machine, not of the
// thread count.
constexpr int64_t kFwdTilesMax = 4;
inline int64_t fwd_key_tiles() {
  static const int64_t n = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 >= 2 * kBlockQ * kFwdTilesMax * kBlockK * 4 ? kFwdTilesMax : int64_t(2);
  }();
  return n;
}

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

template <typename T> struct Elem;
// acc: arithmetic type.  lse: storage type of the saved logsumexp.  wide:
// type of the P = exp(s - lse) recompute in the backward.  float32 inputs keep
// lse in float64: a float32 lse (|lse| ~ log L) alone would put ~ulp(lse) of
// relative error on every recomputed P, several times what a naive float32
// softmax makes (measured on the parity sweep); float64 inputs compute
// s - lse in long double for the same reason.
template <> struct Elem<float> {
  using acc = float;
  using lse = double;
  using wide = double;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using acc = double;
  using lse = double;
  using wide = long double;
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};
template <> struct Elem<bf16_t> {
  using acc = float;
  using lse = float;
  using wide = float;
  static float load(const bf16_t* p) {
    const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static void store(bf16_t* p, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a quiet NaN
      p->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p->bits = static_cast<uint16_t>(u >> 16);
  }
};

// W bfloat16 values widened to a float vector (a bfloat16 is the top half of a
// float32): the B operand of micro_tile and the keys of dot_block read so.
template <typename V>
inline V load_vec(const bf16_t* p) {
  static_assert(sizeof(V) == sizeof(Vec<float>::type), "widens to the float vector of this ISA");
  constexpr int W = Vec<float>::kWidth;
  typedef uint16_t U16 __attribute__((vector_size(W * 2), aligned(2)));
  typedef uint32_t U32 __attribute__((vector_size(W * 4)));
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32) << 16;
  V x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
template <> struct Elem<f16_t> {
  using acc = float;
  using lse = float;
  using wide = float;
  static float load(const f16_t* p) {
    _Float16 h;
    std::memcpy(&h, &p->bits, sizeof(h));
    return static_cast<float>(h);
  }
  static void store(f16_t* p, float v) {
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(&p->bits, &h, sizeof(h));
  }
};

// f(T{}) for the element type T of dtype.
template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16_t{});
    case DType::f16: return f(f16_t{});
  }
}

// Defines entry point `name` (params P): impl<T>(p) for the element type T of p.dtype.
#define ATTNFAST_BY_DTYPE_ENTRY(name, P, impl) \
  void name(const P& p) {                      \
    by_dtype(p.dtype, [&](auto t) { impl<decltype(t)>(p); }); \
  }

// dst[x] = src[x] for x < n, rounded to T.
template <typename T, typename A>
void store_all(T* dst, const A* src, int64_t n) {
  for (int64_t x = 0; x < n; ++x) Elem<T>::store(dst + x, src[x]);
}

// Per-thread scratch stack.  Buffers are locals, destroyed in the reverse
// order of their construction, so each thread's live buffers form a stack;
// the block stays with the thread between calls.  A small call's scratch then
// costs no malloc, no free and no page fault (with plain heap buffers, glibc
// gave the freed 100+ KiB back to the system after every call of a
// B=1 L=64 forward and faulted the pages in again on the next).
class Arena {
 public:
  static constexpr size_t kBytes = size_t(4) << 20;  // kept per thread at most
  static constexpr std::align_val_t kAlign{64};
  ~Arena() { if (base_ != nullptr) ::operator delete[](base_, kAlign); }
  // n bytes (a multiple of 64) on top of the stack, or nullptr if they do not fit.
  void* push(size_t n) {
    if (n > kBytes - used_) return nullptr;
    if (base_ == nullptr) base_ = static_cast<char*>(::operator new[](kBytes, kAlign));
    void* p = base_ + used_;
    used_ += n;
    return p;
  }
  void pop(size_t n) { used_ -= n; }

 private:
  char* base_ = nullptr;
  size_t used_ = 0;
};
inline Arena& thread_arena() {
  thread_local Arena arena;
  return arena;
}

// Under AddressSanitizer every Buffer comes from the heap (inside the arena an
// overrun would go unseen), and kUninit ones are filled with NaN bytes: a read
// of an element never written then shows in the results the tests compare.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// kUninit skips the zeroing, for a buffer every element of which that is read
// is written first (the forward's packs and tiles: their zeroing was 13% of a
// B=1 H=1 L=64 forward).
enum class Init { kZero, kUninit };

// Zero-initialised scratch array, from the thread's Arena when it fits, else
// the heap.  (No std::vector here: its out-of-line members are shared weak
// symbols, and a copy compiled for AVX-512 could be picked by the linker for
// the portable path.)  Aligned to 64 bytes: with the default 16-byte
// alignment every other AVX-512 load of a packed panel split a cache line.
template <typename A>
struct Buffer {
  static_assert(std::is_trivial<A>::value, "Buffer holds plain numbers");
  explicit Buffer(int64_t n, Init init = Init::kZero)
      : n_(n), bytes_(n > 0 ? (n * sizeof(A) + 63) / 64 * 64 : 0) {
    if (bytes_ == 0) return;
    if (!kSanitized) p_ = static_cast<A*>(thread_arena().push(bytes_));
    if (p_ == nullptr) {
      p_ = static_cast<A*>(::operator new[](bytes_, Arena::kAlign));
      heap_ = true;
    }
    if (init == Init::kZero) std::memset(static_cast<void*>(p_), 0, bytes_);
    else if (kSanitized) std::memset(static_cast<void*>(p_), 0xff, bytes_);
  }
  ~Buffer() {
    if (p_ == nullptr) return;
    if (heap_) ::operator delete[](p_, Arena::kAlign);
    else thread_arena().pop(bytes_);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  A* data() { return p_; }
  A& operator[](int64_t i) { return p_[i]; }
  void zero() { for (int64_t i = 0; i < n_; ++i) p_[i] = A(0); }

 private:
  int64_t n_;
  size_t bytes_;
  A* p_ = nullptr;
  bool heap_ = false;
};

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t even_up(int64_t n) { return (n + 1) / 2 * 2; }  // pairs (pair_products.h)

// Which keys a query row may see (causal / sliding window), as half-open ranges.
struct Visibility {
  int64_t diag, left, right, Lq, Lk;
  explicit Visibility(const AttnParams& p)
      : diag(p.diag_offset), left(p.window_left), right(p.window_right), Lq(p.Lq), Lk(p.Lk) {}
  int64_t col_lo(int64_t i) const { return left < 0 ? 0 : imin(Lk, imax(0, i + diag - left)); }
  int64_t col_hi(int64_t i) const { return right < 0 ? Lk : imin(Lk, imax(0, i + diag + right + 1)); }
  // Rows that see at least one column of [j0, j1).
  int64_t row_lo(int64_t j0) const { return right < 0 ? 0 : imin(Lq, imax(0, j0 - diag - right)); }
  int64_t row_hi(int64_t j1) const { return left < 0 ? Lq : imin(Lq, imax(0, j1 - 1 - diag + left + 1)); }
  // Keys [lo, hi) visible to some row of [i0, i0 + nq); lo = Lk, hi = 0 when no row sees one.
  void block_cols(int64_t i0, int64_t nq, int64_t& lo, int64_t& hi) const {
    lo = Lk;
    hi = 0;
    for (int64_t i = i0; i < i0 + nq; ++i) {
      const int64_t a = col_lo(i), z = col_hi(i);
      if (a < z) { lo = imin(lo, a); hi = imax(hi, z); }
    }
  }
};

// A Buffer's elements seen through a pointer copied into the function that uses them (the
// kernels' bodies take their scratch as a struct; a local copy of each pointer keeps the
// compiler from reloading it through the struct).
template <typename A>
struct Span {
  A* p;
  template <typename B>
  explicit Span(B& buffer) : p(buffer.data()) {}
  A* data() const { return p; }
  A& operator[](int64_t i) const { return p[i]; }
};

// f(begin, end) over [0, n) on the framework's thread pool (p.parallel_for).
template <typename P, typename F>
void run_parallel(const P& p, int64_t n, F&& f) {
  struct Ctx { F* f; } ctx{&f};
  p.parallel_for(n, 1, &ctx, [](void* c, int64_t begin, int64_t end) {
    (*static_cast<Ctx*>(c)->f)(begin, end);
  });
}

// Loads rows [r0, r0+nr) of a (row, col) slice into dst[r][c] (row stride ld).
template <typename T, typename A>
void load_rows(const T* base, int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t ncols, A* dst,
               int64_t ld) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* src = base + (r0 + r) * rs;
    A* d = dst + r * ld;
    if (ncols == 0) return;  // (empty rows may come with null pointers: no memcpy of them)
    if (std::is_same<T, A>::value && cs == 1) {
      std::memcpy(static_cast<void*>(d), static_cast<const void*>(src), ncols * sizeof(A));
    } else if (cs == 1) {  // unit stride: the conversion vectorises
      for (int64_t c = 0; c < ncols; ++c) d[c] = Elem<T>::load(src + c);
    } else {
      for (int64_t c = 0; c < ncols; ++c) d[c] = Elem<T>::load(src + c * cs);
    }
  }
}

// 8 x 8 float transpose in registers: rows x[0..7] -> columns x[0..7]
// (unpack pairs of rows, then pairs of pairs, then swap 128-bit halves).
typedef float F8u __attribute__((vector_size(32), aligned(4)));
inline void transpose8(F8u (&x)[8]) {
  F8u t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(x[i], x[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(x[i], x[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int i = 0; i < 4; ++i) {
    x[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    x[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Loads rows [r0, r0+nr) transposed: dst[c][r] (ld = ld).  Unit-stride rows
// into float go through 8 x 8 register transposes (the scalar loop was ~9% of
// a B=1 H=8 L=64 forward: the K^T pack).
template <typename T, typename A>
void load_rows_t(const T* base, int64_t rs, int64_t cs, int64_t r0, int64_t nr, int64_t ncols,
                 int64_t ld, A* dst) {
  int64_t rb = 0, cb = 0;  // rows and columns done by whole 8 x 8 blocks
  if (std::is_same<A, float>::value && cs == 1) {
    rb = nr / 8 * 8, cb = ncols / 8 * 8;
    for (int64_t r = 0; r < rb; r += 8)
      for (int64_t c = 0; c < cb; c += 8) {
        F8u x[8];
        for (int i = 0; i < 8; ++i) {
          const T* src = base + (r0 + r + i) * rs + c;
          for (int j = 0; j < 8; ++j) x[i][j] = static_cast<float>(Elem<T>::load(src + j));
        }
        transpose8(x);
        for (int j = 0; j < 8; ++j) std::memcpy(static_cast<void*>(dst + (c + j) * ld + r), &x[j], sizeof(F8u));
      }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const T* src = base + (r0 + r) * rs;
    for (int64_t c = r < rb ? cb : 0; c < ncols; ++c) dst[c * ld + r] = Elem<T>::load(src + c * cs);
  }
}

// Head h of batch b of a (batch, head, row, column) operand.
template <typename T>
const T* head_of(const void* x, const Strides4& st, int64_t b, int64_t h) {
  return static_cast<const T*>(x) + b * st.b + h * st.h;
}

// The L rows of a head's (L, ncols) slice x, transposed and tile-major:
// dst = (cdiv(L, kBlockK), ncols, kBlockK), one contiguous block per key tile.
// (A plain (ncols, L) layout puts a tile's rows 4 * L bytes apart, a
// power-of-two-ish stride that fought the cache's associativity: fp32 forward
// at L >= 4096 fell to 0.62-0.75x torch while it was 0.9x at L = 1024-2048.)
template <typename T, typename A>
void pack_tiles_t(const T* x, const Strides4& st, int64_t L, int64_t ncols, A* dst) {
  for (int64_t t = 0; t < cdiv(L, kBlockK); ++t)
    load_rows_t(x, st.r, st.c, t * kBlockK, imin(kBlockK, L - t * kBlockK), ncols, kBlockK, dst + t * ncols * kBlockK);
}

// K^T of kv head (b, hk), tile-major (pack_tiles_t), and V, (Lk, Ev) with row stride ldv.
template <typename T, typename A>
void pack_kt_v(const AttnParams& p, int64_t b, int64_t hk, A* kt, A* v, int64_t ldv) {
  pack_tiles_t(head_of<T>(p.k, p.k_st, b, hk), p.k_st, p.Lk, p.E, kt);
  load_rows(head_of<T>(p.v, p.v_st, b, hk), p.v_st.r, p.v_st.c, 0, p.Lk, p.Ev, v, ldv);
}

// The dK and dV of kv head (b, hk), summed in full-head buffers (Lk, E) and
// (Lk, Ev) with row strides ldk and ldv, rounded into p.dk and p.dv (strides
// dk_st, dv_st).
template <typename T, typename P, typename A>
void store_kv_grads(const P& p, int64_t b, int64_t hk, const A* dk, const A* dv, int64_t ldk, int64_t ldv) {
  T* dkh = static_cast<T*>(p.dk) + b * p.dk_st.b + hk * p.dk_st.h;
  T* dvh = static_cast<T*>(p.dv) + b * p.dv_st.b + hk * p.dv_st.h;
  for (int64_t j = 0; j < p.Lk; ++j) {
    store_all(dkh + j * p.dk_st.r, dk + j * ldk, p.E);
    store_all(dvh + j * p.dv_st.r, dv + j * ldv, p.Ev);
  }
}

// What the explicit mask does to the (nq, nk) tile at rows i0.., columns j0..:
// hides all of it (the tile is skipped: no product, no exp), shows all of it
// (a bool mask then needs no per-element pass), or a mix.  Reading the mask
// tile costs nq*nk byte loads against the tile's nq*nk*E FMAs; rows of a mask
// broadcast over rows are read once, and contiguous bool rows 8 bytes a time.
// kLower (only from a TileTable, for bool masks): row i of the tile shows
// exactly its first clamp(i + d, 0, nk) keys (a causal-shaped mask across the
// diagonal): applied as a rule, with no per-element pass.
enum class TileMask { kHidden, kVisible, kMixed, kLower };

// Whether the bool (nq, nk) tile at m (row stride rs, unit column stride)
// shows each row i exactly its first clamp(i + d, 0, nk) keys, for one d; if
// so, sets d.  Needs a row with a strict prefix (0 < count < nk) to find d.
inline bool lower_prefix(const uint8_t* m, int64_t rs, int64_t nq, int64_t nk, int64_t& d) {
  bool found = false;
  for (int64_t i = 0; i < nq; ++i) {
    const uint8_t* r = m + i * rs;
    int64_t c = 0;
    while (c < nk && r[c]) ++c;
    for (int64_t j = c; j < nk; ++j)
      if (r[j]) return false;  // not a prefix
    if (!found && c > 0 && c < nk) {
      d = c - i;
      found = true;
    }
  }
  if (!found) return false;
  for (int64_t i = 0; i < nq; ++i) {
    const uint8_t* r = m + i * rs;
    const int64_t want = imin(nk, imax(0, i + d));
    if ((want > 0 && !r[want - 1]) || (want < nk && r[want])) return false;
  }
  return true;
}

template <typename T>
TileMask classify_tile(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                       int64_t nk) {
  if (p.mask_kind == MaskKind::none) return TileMask::kVisible;
  const Strides4& st = p.mask_st;
  const int64_t rows = st.r == 0 ? 1 : nq;
  const int64_t off = b * st.b + h * st.h + i0 * st.r + j0 * st.c;
  if (p.mask_kind == MaskKind::additive) {
    for (int64_t i = 0; i < rows; ++i) {
      const T* m = static_cast<const T*>(p.mask) + off + i * st.r;
      for (int64_t j = 0; j < nk; ++j)
        if (Elem<T>::load(m + j * st.c) != -std::numeric_limits<float>::infinity()) return TileMask::kMixed;
    }
    return TileMask::kHidden;
  }
  bool any = false, all = true;
  // Contiguous rows: OR and AND of whole vectors of bytes, reduced once a row
  // (bool bytes are 0 or 1, so a lane's AND is 1 exactly when all were true).
  // Byte by byte, or 8 at a time, classifying cost ~14% of a causal-shaped
  // mask's product time.
  typedef uint8_t VB __attribute__((vector_size(ATTNFAST_VEC_BYTES)));
  constexpr int64_t kVB = ATTNFAST_VEC_BYTES;
  constexpr uint64_t kOnes = 0x0101010101010101ull;  // eight `true` bytes
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off + i * st.r;
    int64_t j = 0;
    if (st.c == 1 && nk >= kVB) {
      VB vor = VB{}, vand = VB{} + 1;
      for (; j + kVB <= nk; j += kVB) {
        VB x;
        std::memcpy(&x, m + j, sizeof(x));
        vor |= x;
        vand &= x;
      }
      uint64_t wor[kVB / 8], wand[kVB / 8];
      std::memcpy(wor, &vor, sizeof(wor));
      std::memcpy(wand, &vand, sizeof(wand));
      for (int64_t w = 0; w < kVB / 8; ++w) {
        any |= wor[w] != 0;
        all &= wand[w] == kOnes;
      }
    }
    if (st.c == 1) {
      for (; j + 8 <= nk; j += 8) {
        uint64_t w;
        std::memcpy(&w, m + j, sizeof(w));
        any |= w != 0;
        all &= w == kOnes;
      }
    }
    for (; j < nk; ++j) {
      any |= m[j * st.c] != 0;
      all &= m[j * st.c] != 0;
    }
    if (any && !all) return TileMask::kMixed;
  }
  return any ? TileMask::kVisible : TileMask::kHidden;
}

// classify_tile of every (query block, key tile), once per call, when the
// mask broadcasts over the batch or the heads: those that share the mask
// share its table.  Classified per head, a causal-shaped (L, L) mask was read
// again by every head (~14% of its product time).  A tile's entry covers all
// its keys; a caller whose visible keys end inside the tile gets a kMixed
// where the exact class might be kHidden or kVisible, which mask_tile still
// handles (element by element).  Unused (active() false) when nothing is shared.
template <typename T>
struct TileTable {
  int64_t nb = 0, nh = 0, nqb = 0, nkb = 0;
  template <typename P>
  TileTable(const P& p, int64_t nqb_) : cls_(dims(p, nqb_), Init::kUninit), diag_(size(), Init::kUninit) {
    if (size() == 0) return;
    const Strides4& st = p.mask_st;
    uint8_t* cls = cls_.data();
    int32_t* diag = diag_.data();
    run_parallel(p, nb * nh * nqb, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t qb = item % nqb, bh = item / nqb, h = bh % nh, b = bh / nh;
        const int64_t i0 = qb * kBlockQ, nq = imin(kBlockQ, p.Lq - i0);
        for (int64_t kt = 0; kt < nkb; ++kt) {
          const int64_t j0 = kt * kBlockK, nk = imin(kBlockK, p.Lk - j0);
          TileMask tm = classify_tile<T>(p, b, h, i0, nq, j0, nk);
          int64_t d = 0;
          if (tm == TileMask::kMixed && p.mask_kind == MaskKind::boolean && st.c == 1 &&
              lower_prefix(static_cast<const uint8_t*>(p.mask) + b * st.b + h * st.h + i0 * st.r + j0, st.r, nq,
                           nk, d))
            tm = TileMask::kLower;
          cls[item * nkb + kt] = static_cast<uint8_t>(tm);
          diag[item * nkb + kt] = static_cast<int32_t>(d);
        }
      }
    });
  }
  bool active() const { return size() > 0; }
  TileMask at(int64_t b, int64_t h, int64_t qb, int64_t kt) {
    return static_cast<TileMask>(cls_[index(b, h, qb, kt)]);
  }
  int64_t lower_d(int64_t b, int64_t h, int64_t qb, int64_t kt) { return diag_[index(b, h, qb, kt)]; }

 private:
  // Sets the dimensions (all 0 when nothing is shared) and returns size().
  template <typename P>
  int64_t dims(const P& p, int64_t nqb_) {
    if (p.mask_kind == MaskKind::none || (p.mask_st.b != 0 && p.mask_st.h != 0)) return 0;
    nb = p.mask_st.b != 0 ? p.B : 1;
    nh = p.mask_st.h != 0 ? p.Hq : 1;
    nqb = nqb_;
    nkb = cdiv(p.Lk, kBlockK);
    return size();
  }
  int64_t size() const { return nb * nh * nqb * nkb; }
  int64_t index(int64_t b, int64_t h, int64_t qb, int64_t kt) const {
    return (((nb > 1 ? b : 0) * nh + (nh > 1 ? h : 0)) * nqb + qb) * nkb + kt;
  }
  Buffer<uint8_t> cls_;   // the TileMask of each entry
  Buffer<int32_t> diag_;  // d of a kLower entry (see lower_prefix)
};

// Sets invisible scores to -inf and applies the mask for rows [i0, i0+nq) and
// columns [j0, j0+nk) of head (b, h).
template <typename T, typename A>
void mask_tile(const AttnParams& p, const Visibility& vis, int64_t b, int64_t h, int64_t i0, int64_t nq,
               int64_t j0, int64_t nk, A* s, int64_t lds, TileMask tm, int64_t lower_d = 0) {
  const A ninf = -std::numeric_limits<A>::infinity();
  const bool windowed = vis.left >= 0 || vis.right >= 0;
  for (int64_t i = 0; i < nq; ++i) {
    A* row = s + i * lds;
    int64_t lo = 0, hi = nk;
    if (windowed) {
      lo = imin(nk, imax(0, vis.col_lo(i0 + i) - j0));
      hi = imax(lo, imin(nk, vis.col_hi(i0 + i) - j0));
      for (int64_t j = 0; j < lo; ++j) row[j] = ninf;
      for (int64_t j = hi; j < nk; ++j) row[j] = ninf;
    }
    if (p.mask_kind == MaskKind::none || tm == TileMask::kVisible) continue;
    if (tm == TileMask::kLower) {  // the row's mask shows its first c keys
      const int64_t c = imin(nk, imax(0, i + lower_d));
      for (int64_t j = imax(lo, c); j < hi; ++j) row[j] = ninf;
      continue;
    }
    const int64_t off = b * p.mask_st.b + h * p.mask_st.h + (i0 + i) * p.mask_st.r + j0 * p.mask_st.c;
    if (p.mask_kind == MaskKind::boolean) {
      const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
      if (p.mask_st.c == 1) {
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) row[j] = m[j] ? row[j] : ninf;
      } else {
        for (int64_t j = lo; j < hi; ++j) row[j] = m[j * p.mask_st.c] ? row[j] : ninf;
      }
    } else {
      const T* m = static_cast<const T*>(p.mask) + off;
      for (int64_t j = lo; j < hi; ++j) row[j] += static_cast<A>(Elem<T>::load(m + j * p.mask_st.c));
    }
  }
}

// Row i of head (b, h): out = acc / l, lse = m + log(l), from an unnormalised
// accumulator row (Ev values), the row max m and the row sum l (lse precision).
// One rounding for out: the division is in the lse precision (acc * float(1/l)
// rounds twice).  A row with l = 0 (nothing visible) gets 0 and -inf; a NaN row NaN.
template <typename T, typename X, typename M, typename L>
void store_out_row(const FwdParams& p, int64_t b, int64_t h, int64_t i, const X* acc, M m, L l) {
  using A = typename Elem<T>::acc;
  using W = typename Elem<T>::wide;
  const L inv = l != l ? l : l > L(0) ? L(1) / l : L(0);
  T* orow = static_cast<T*>(p.out) + b * p.out_st.b + h * p.out_st.h + i * p.out_st.r;
  for (int64_t c = 0; c < p.Ev; ++c)
    Elem<T>::store(orow + c * p.out_st.c, static_cast<A>(static_cast<L>(acc[c]) * inv));
  L* lse = static_cast<L*>(p.lse) + b * p.lse_sb + h * p.lse_sh;
  lse[i] = l > L(0) ? static_cast<L>(static_cast<W>(m) + std::log(static_cast<W>(l)))
           : l != l ? l : -std::numeric_limits<L>::infinity();
}

// fac[i][j] = dropout factor of element (i0+i, j0+j): 0 if dropped, 1/(1-p) if kept.
template <typename A>
void dropout_factors(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                     int64_t nk, A* fac, int64_t ld) {
  const float prob = static_cast<float>(p.dropout_p);
  const A inv_keep = A(1) / (A(1) - static_cast<A>(p.dropout_p));
  const int64_t bh = b * p.Hq + h;
  for (int64_t i = 0; i < nq; ++i) {
    A* row = fac + i * ld;
    const int64_t n0 = (i0 + i) * p.Lk + j0;
    for (int64_t j = 0; j < nk; ++j)
      row[j] = philox::dropout_uniform(p.seed, p.offset, bh, n0 + j) >= prob ? inv_keep : A(0);
  }
}

// Softmax pieces, specialised for float (vectorised) and generic (double).
template <typename A>
inline A row_max(const A* row, int64_t n) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = (row[j] > mx || row[j] != row[j]) ? row[j] : mx;  // NaN wins
  return mx;
}
inline float row_max(const float* row, int64_t n) { return rowmax_f32(row, n); }
template <typename A>
inline A row_exp_sum(A* row, int64_t n, A m) {
  A rs = A(0);
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - m);
    rs += row[j];
  }
  return rs;
}
inline float row_exp_sum(float* row, int64_t n, float m) { return softmax_row_f32(row, n, m); }
// d[i] = exp(a[i] - b[i]) for i < n (a, b, d padded to whole vectors for float).
template <typename A>
inline void exp_diff(const A* a, const A* b, int64_t n, A* d) {
  for (int64_t i = 0; i < n; ++i) d[i] = std::exp(a[i] - b[i]);
}
inline void exp_diff(const float* a, const float* b, int64_t n, float* d) { exp_diff_f32(a, b, n, d); }

}  // namespace
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
