// Plain parameter blocks of the CPU kernels (dense, additive, top-k) and their
// entry points.
//
// The kernel translation units see only these structs (raw pointers, sizes and
// element strides), never an at::Tensor, so they can be compiled with their
// own ISA flags and tested on their own.  binding.cpp fills them from tensors.
#pragma once
#include <cstdint>

namespace attnfast {
namespace cpu {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };
enum class MaskKind : int { none = 0, boolean = 1, additive = 2 };

// Callback signature used to run `fn(ctx, begin, end)` over [0, n) on the
// framework's thread pool (binding.cpp routes it to at::parallel_for).
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t n, int64_t grain, void* ctx, RangeFn fn);

// Layout of every 4-D operand: (batch, head, row, column), strides in elements.
struct Strides4 {
  int64_t b, h, r, c;
};

struct AttnParams {
  DType dtype;
  // Sizes.  q: (B, Hq, Lq, E), k: (B, Hkv, Lk, E), v: (B, Hkv, Lk, Ev).
  int64_t B, Hq, Hkv, Lq, Lk, E, Ev;

  const void* q;
  const void* k;
  const void* v;
  Strides4 q_st, k_st, v_st;

  // Optional mask of logical shape (B, Hq, Lq, Lk); broadcast dims have stride 0.
  MaskKind mask_kind;
  const void* mask;  // bool (1 byte) or the query dtype
  Strides4 mask_st;

  double scale;
  // Visible keys for query row i: lo(i) <= j <= hi(i), with diagonal
  // d(i) = i + diag_offset; lo = d - window_left (if window_left >= 0),
  // hi = d + window_right (if window_right >= 0).  Causal is window_right = 0.
  int64_t diag_offset;
  int64_t window_left;   // -1: unbounded
  int64_t window_right;  // -1: unbounded

  // Dropout on the attention probabilities (Philox4x32-10, see philox.h).
  double dropout_p;  // keep test in float32 (as every backend draws it); 1/(1-p) in the accumulation type
  uint64_t seed;
  uint64_t offset;

  ParallelFor parallel_for;

  // The lse (and its gradient, and delta): element (b, h, i) at b * lse_sb + h * lse_sh + i.
  int64_t lse_sb = 0, lse_sh = 0;

  // A ragged batch (seqs.h), when any of these is set: batch entry b is a
  // sequence of its own, with query rows [cu_q[b], cu_q[b+1]) (row offsets
  // into q, out and the lse, on top of b's batch strides; nullptr: [0, Lq)),
  // keys [cu_k[b], cu_k[b+1]) (nullptr: [0, Lk)), of which only the first
  // used_k[b] take part (nullptr: all), read from key batch batch_k[b]
  // (nullptr: b).  Lq and Lk are then the longest sequence's lengths, the
  // diagonal is each sequence's own (bottom_right: its Lk - Lq, else 0), no
  // mask is allowed, and sequence b's dropout draws with offset + b.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  const int32_t* used_k = nullptr;
  const int32_t* batch_k = nullptr;
  bool bottom_right = false;
  // A paged key/value cache (short-query forward only, decode_kernel.h): key
  // row j of batch entry b is row j % page_size of page block_table[b *
  // block_table_stride + j / page_size]; k and v then point at the page pool,
  // whose pages are k_st.b (v_st.b) elements apart.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t page_size = 0;
  // Key splits of the short-query forward (decode_kernel.h): 0 chooses from the shape.
  int64_t num_splits = 0;
};

struct FwdParams : AttnParams {
  void* out;         // (B, Hq, Lq, Ev), strides out_st, query dtype
  Strides4 out_st;
  void* lse;         // (B, Hq, Lq) contiguous, natural log; float64 for f32/f64 inputs, else float32
};

struct BwdParams : AttnParams {
  const void* dout;  // (B, Hq, Lq, Ev)
  Strides4 dout_st;
  const void* out;   // (B, Hq, Lq, Ev)
  Strides4 out_st;
  const void* lse;   // (B, Hq, Lq) contiguous, dtype as in FwdParams
  const void* dlse;  // (B, Hq, Lq) contiguous gradient of lse (same dtype), or nullptr
  void* dq;          // (B, Hq, Lq, E), strides dq_st (unit columns), query dtype
  void* dk;          // (B, Hkv, Lk, E), strides dk_st (unit columns)
  void* dv;          // (B, Hkv, Lk, Ev), strides dv_st (unit columns)
  Strides4 dq_st, dk_st, dv_st;
  void* dmask;       // (B, Hq, Lq, Lk) contiguous, accumulation dtype, or nullptr
  // (B, Hq, Lq) contiguous rowsum(dO * O) given by the caller (lse dtype), used in place
  // of the kernel's rowsum(P * dP); or nullptr.  Ring attention gives it: there P and dP
  // of one call cover only some of a row's keys.
  const void* delta = nullptr;
};

// Hard (top-k) attention (topk_kernel.h): scores, mask and causal rule as in AttnParams (no
// dropout); each row keeps its top_k highest visible scores, equal scores by the lower key.
struct TopkParams : AttnParams {
  int64_t top_k;
  int32_t* idx;       // (B, Hq, Lq, top_k) contiguous: the kept keys, -1 in unused slots (fwd output)
  void* out;          // forward output (B, Hq, Lq, Ev), contiguous, query dtype
  void* lse;          // (B, Hq, Lq) contiguous, dtype as in FwdParams (fwd output, bwd input)
  const void* dout;   // backward inputs: (B, Hq, Lq, Ev) contiguous, and lse's gradient or nullptr
  const void* dlse;
  void* dq;           // backward outputs, contiguous, query dtype
  void* dk;
  void* dv;
  Strides4 dk_st, dv_st;  // of dk and dv (contiguous)
};

// Additive (Bahdanau) attention on projected queries/keys (additive_kernel.h), float32,
// every tensor contiguous: qp (B, H, Lq, Da), kp (B, H, Lk, Da), va (H, Da), v (B, H, Lk, Ev).
struct AdditiveParams {
  int64_t B, H, Lq, Lk, Da, Ev;
  const float* qp;
  const float* kp;
  const float* va;
  const float* v;
  const float* mask;  // float bias of logical shape (B, H, Lq, Lk) (stride 0 where it broadcasts), or nullptr
  Strides4 mask_st;
  bool causal;        // key j visible from query i iff j <= i
  double* lse;        // (B, H, Lq): forward output, backward input; -inf for rows with no visible key
  float* out;         // forward: (B, H, Lq, Ev)
  const float* dout;  // backward inputs: (B, H, Lq, Ev) and the lse's gradient (B, H, Lq) or nullptr
  const double* dlse;
  float* dqp;         // backward outputs: (B, H, Lq, Da), (B, H, Lk, Da), (B, H, Lk, Ev),
  float* dkp;         // and dva per (batch, head): (B, H, Da)
  float* dv;
  float* dva;
  ParallelFor parallel_for;
};

// A measurement for the benchmarks (probe.h): kind, iterations, threads and
// the tile shape (m, d, n) in; seconds, flops and a checksum out (`result`).
struct ProbeParams {
  int kind;          // 0: FMA peak on `threads` threads, 1: score product, 2: P V product (one thread)
  int64_t iters;
  int64_t threads;
  int64_t m, d, n;
  double* result;    // [seconds, flops, checksum]
  ParallelFor parallel_for;
};

// The kernels' entry points, (name, params).  Every ISA build (kernel_<isa>.cpp,
// see isa_build.h) defines all of them in its namespace, and a table of them.
#define ATTNFAST_CPU_ENTRY_POINTS(X) \
  X(attention_fwd, FwdParams)        \
  X(attention_bwd, BwdParams)        \
  X(additive_fwd, AdditiveParams)    \
  X(additive_bwd, AdditiveParams)    \
  X(topk_fwd, TopkParams)            \
  X(topk_bwd, TopkParams)            \
  X(probe, ProbeParams)

// The ISA builds, by namespace; the binding picks one at run time.
#define ATTNFAST_CPU_ISAS(X) X(isa_default) X(isa_avx2) X(isa_avx512)

// One ISA build's entry points.
struct Kernels {
#define ATTNFAST_ENTRY_FIELD(name, P) void (*name)(const P& p);
  ATTNFAST_CPU_ENTRY_POINTS(ATTNFAST_ENTRY_FIELD)
#undef ATTNFAST_ENTRY_FIELD
};

#define ATTNFAST_DECLARE_ENTRY(name, P) void name(const P& p);
#define ATTNFAST_DECLARE_ISA(ns)                             \
  namespace ns {                                             \
  ATTNFAST_CPU_ENTRY_POINTS(ATTNFAST_DECLARE_ENTRY)          \
  extern const Kernels kernels;                              \
  }
ATTNFAST_CPU_ISAS(ATTNFAST_DECLARE_ISA)
#undef ATTNFAST_DECLARE_ISA
#undef ATTNFAST_DECLARE_ENTRY

}  // namespace cpu
}  // namespace attnfast
