// Parameter blocks of the CUDA attention kernels.
//
// Plain pointers, sizes and element strides: no torch type reaches the
// kernels, so they compile with nvcc alone (tools/harness.cu, the CI compile
// check) as well as inside attnfast._C (binding_cuda.cpp fills these).
#pragma once
#include <cstdint>

namespace attnfast {
namespace cuda {

enum class Elem : int { f16 = 0, bf16 = 1 };
enum class MaskKind : int { none = 0, boolean = 1, additive = 2 };

// Strides in elements of a (batch, head, row, column) operand.  Every q/k/v/o/
// dout operand has column stride 1 and row stride a multiple of 8 elements
// (16-byte rows: the kernels copy 16-byte chunks); the binding copies inputs
// that are not so.
struct Strides3 {
  int64_t b, h, r;
};

struct AttnParams {
  Elem elem;
  // q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, D); Hq % Hkv == 0.
  int B, Hq, Hkv, Lq, Lk, D;
  const void* q;
  const void* k;
  const void* v;
  Strides3 q_st, k_st, v_st;

  // Optional mask of logical shape (B, Hq, Lq, Lk); stride 0 where it
  // broadcasts.  bool (1 byte, nonzero = visible) or additive in q's dtype.
  MaskKind mask_kind;
  const void* mask;
  int64_t mask_st[4];

  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  // Visible keys for query row i: lo <= j <= hi with d = i + diag_offset,
  // lo = d - window_left (window_left >= 0), hi = d + window_right
  // (window_right >= 0); -1 = unbounded.  Causal is window_right = 0.
  int diag_offset;
  int window_left;
  int window_right;

  // Packed variable-length batches (varlen) when cu_q is set: batch entry b is
  // sequence b, query rows cu_q[b] .. cu_q[b + 1] and key rows cu_k[b] ..
  // cu_k[b] + (used_k ? used_k[b] : cu_k[b + 1] - cu_k[b]) of q, k, v (batch
  // strides 0); its diagonal is Lk_b - Lq_b with bottom_right, else 0
  // (diag_offset unused).  Lq, Lk are then the longest sequence's (the grid),
  // and lse, delta, dq_accum are (Hq, total_q[, D]) (see lse_row in band.cuh).
  const int* cu_q = nullptr;
  const int* cu_k = nullptr;
  const int* used_k = nullptr;
  int bottom_right = 0;
  int total_q = 0;
  int total_k = 0;  // rows of the packed k, v: seq_of clamps every sequence inside both
};

struct FwdParams : AttnParams {
  void* out;        // (B, Hq, Lq, D), strides out_st, q's dtype
  Strides3 out_st;
  float* lse;       // (B, Hq, Lq) contiguous (varlen: (Hq, total_q)), natural log; -inf for rows that see no key
};

struct BwdParams : AttnParams {
  const void* out;   // (B, Hq, Lq, D)
  Strides3 out_st;
  const void* dout;  // (B, Hq, Lq, D)
  Strides3 dout_st;
  // lse, dlse, delta, delta_in: (B, Hq, Lq) contiguous (varlen: (Hq, total_q)).
  const float* lse;
  const float* dlse;  // gradient of lse, or nullptr
  float* delta;       // scratch: rowsum(dout * out) - dlse
  float* dq_accum;    // (B, Hq, Lq, D) (varlen: (Hq, total_q, D)) fp32 scratch, zeroed by the preprocess kernel
  void* dq;           // (B, Hq, Lq, D) by dq_st, q's dtype
  void* dk;           // (B, Hkv, Lk, D) by dk_st (keys a call does not use are not written)
  void* dv;           // (B, Hkv, Lk, D) by dv_st
  float* dmask;       // (B, Hq, Lq, Lk) contiguous fp32 (additive masks), or nullptr
  const float* delta_in = nullptr;  // rowsum(dout * out) given by the caller, or nullptr
  Strides3 dq_st{}, dk_st{}, dv_st{};  // column stride 1
};

// The head dims with kernels, forward and backward: the one list.  The
// dispatch switches (switch.h) and so the kernel instances of flash_fwd.cu and
// flash_bwd.cu, the *_supports_head_dim checks below, the tile configs'
// static_asserts (flash_fwd.cuh, flash_bwd.cuh), the harness's cases and
// attnfast._C.cuda_head_dims() all come from it.  Other head dims are served by
// the Triton backend.
template <int... Ds>
struct HeadDims {
  static constexpr int kList[sizeof...(Ds)] = {Ds...};
  static constexpr bool has(int d) { return ((d == Ds) || ...); }
};
using FwdHeadDims = HeadDims<64, 96, 128, 256>;
using BwdHeadDims = HeadDims<64, 96, 128>;

constexpr bool fwd_supports_head_dim(int d) { return FwdHeadDims::has(d); }
constexpr bool bwd_supports_head_dim(int d) { return BwdHeadDims::has(d); }

// Launchers (flash_fwd.cu, flash_bwd.cu).  They return the CUDA error of the
// launch (cudaSuccess when it was queued); `stream` is a cudaStream_t.
int run_fwd(const FwdParams& p, void* stream);
int run_bwd(const BwdParams& p, void* stream);

}  // namespace cuda
}  // namespace attnfast
