// The q, k, v and attn_mask arguments of the attention ops (schemas in
// csrc/cpu/binding.cpp), checked once for every backend.
//
// Each binding names its backend (the prefix of its error messages, where the
// tensors must live, its dtypes) and gets back an AttnArgs: a torch-free
// description of the call (sizes, data pointers, element strides, mask kind,
// scale, diagonal, window) from which it fills its kernels' own params
// (csrc/cpu/params.h, csrc/cuda/flash.h).  What only one backend needs
// (dropout's rng, CUDA's head-dim and grid limits) stays in its binding.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace attnfast {

// A binding's side of the shared checks.
struct Backend {
  const char* who;            // prefix of every error message: "attnfast cpu", "attnfast cuda"
  at::DeviceType device;      // q, k, v and the mask live on one device of this type
  const char* qkv_device;     // "q, k, v must be <qkv_device>"
  const char* mask_device;    // "attn_mask must be <mask_device>"
  void (*check_dtype)(const at::Tensor& q);  // the dtypes its kernels take (k and v have q's)
  bool one_head_dim;          // v's head dim must be q's too (else only k's must)
};

enum class MaskArg : int { none = 0, boolean = 1, additive = 2 };

// One call, torch-free.  q: (B, Hq, Lq, E), k: (B, Hkv, Lk, E), v: (B, Hkv, Lk, Ev);
// strides in elements, (batch, head, row, column).
struct AttnArgs {
  int64_t B, Hq, Hkv, Lq, Lk, E, Ev;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_st[4], k_st[4], v_st[4];
  MaskArg mask_kind;
  const void* mask;    // (B, Hq, Lq, Lk), stride 0 where it broadcasts; nullptr without one
  int64_t mask_st[4];  // zeros without a mask
  double scale;
  int64_t diag_offset;   // query row i's diagonal is key i + diag_offset: Lk - Lq bottom-right, else 0
  int64_t window_left;   // -1: unbounded; causal is window_right = 0
  int64_t window_right;
};

namespace detail {
inline void strides_of(const at::Tensor& t, int64_t (&st)[4]) {
  for (int d = 0; d < 4; ++d) st[d] = t.stride(d);
}
}  // namespace detail

// Checks q, k, v and the optional mask for backend `be` (TORCH_CHECK: RuntimeError
// "<who>: ...") and describes the call.
inline AttnArgs attn_args(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double scale, int64_t window_left,
                          int64_t window_right, bool bottom_right) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, be.who, ": q, k, v must be 4-D");
  TORCH_CHECK(q.device().type() == be.device && k.device() == q.device() && v.device() == q.device(), be.who,
              ": q, k, v must be ", be.qkv_device);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), be.who,
              ": q, k, v must share one dtype");
  be.check_dtype(q);
  AttnArgs a;
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Lq = q.size(2);
  a.E = q.size(3);
  a.Hkv = k.size(1);
  a.Lk = k.size(2);
  a.Ev = v.size(3);
  TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B, be.who, ": batch sizes differ");
  TORCH_CHECK(v.size(1) == a.Hkv && ((a.Hkv > 0 && a.Hq % a.Hkv == 0) || (a.Hq == 0 && a.Hkv == 0)), be.who,
              ": key/value heads must divide query heads");
  TORCH_CHECK(v.size(2) == a.Lk, be.who, ": key and value lengths differ");
  if (be.one_head_dim) {
    TORCH_CHECK(k.size(3) == a.E && a.Ev == a.E, be.who, ": q, k and v must share one head dim, got ", a.E, ", ",
                k.size(3), ", ", a.Ev);
  } else {
    TORCH_CHECK(k.size(3) == a.E, be.who, ": query and key head dims differ");
  }
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  detail::strides_of(q, a.q_st);
  detail::strides_of(k, a.k_st);
  detail::strides_of(v, a.v_st);

  a.mask_kind = MaskArg::none;
  a.mask = nullptr;
  for (int64_t& s : a.mask_st) s = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == a.B && m.size(1) == a.Hq && m.size(2) == a.Lq && m.size(3) == a.Lk,
                be.who, ": attn_mask must be expanded to (B, Hq, Lq, Lk)");
    TORCH_CHECK(m.device() == q.device(), be.who, ": attn_mask must be ", be.mask_device);
    if (m.scalar_type() == at::kBool) {
      a.mask_kind = MaskArg::boolean;
    } else {
      TORCH_CHECK(m.scalar_type() == q.scalar_type(), be.who, ": a float attn_mask must have the query dtype");
      a.mask_kind = MaskArg::additive;
    }
    a.mask = m.data_ptr();
    detail::strides_of(m, a.mask_st);
  }
  a.scale = scale;
  a.diag_offset = bottom_right ? a.Lk - a.Lq : 0;
  a.window_left = window_left;
  a.window_right = window_right;
  return a;
}

// The fields every backend's params have under these names (sizes, data pointers, mask kind
// and pointer, diagonal), narrowed to P's types; the rest (head dims, strides, scale, window)
// each binding fills in its own types.
template <typename P>
void fill_shared_fields(P& p, const AttnArgs& a) {
  using Size = decltype(p.B);
  using Kind = decltype(p.mask_kind);  // the backend's enum: none, boolean, additive
  p.B = static_cast<Size>(a.B);
  p.Hq = static_cast<Size>(a.Hq);
  p.Hkv = static_cast<Size>(a.Hkv);
  p.Lq = static_cast<Size>(a.Lq);
  p.Lk = static_cast<Size>(a.Lk);
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.mask_kind = a.mask_kind == MaskArg::boolean ? Kind::boolean
                : a.mask_kind == MaskArg::additive ? Kind::additive : Kind::none;
  p.mask = a.mask;
  p.diag_offset = static_cast<decltype(p.diag_offset)>(a.diag_offset);
}

}  // namespace attnfast
