// Torch binding of the CUDA kernels: checks, tensors -> params, CUDA impls of
// the attnfast::fwd / bwd / varlen_fwd / varlen_bwd schemas (declared in csrc/cpu/binding.cpp).
//
// attnfast/dispatch.py sends a call here only when these kernels serve it
// (fp16/bf16, equal q/v head dims with a kernel, no dropout); the checks below
// and those shared with the CPU binding (csrc/attn_args.h) keep any other call
// from reaching a kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../attn_args.h"
#include "flash.h"

namespace attnfast {
namespace cuda {
namespace {

constexpr int64_t kMaxGrid = 65535;  // grid y/z limit: heads and batch

// Column stride 1, other strides multiples of 8 elements, 16-byte aligned
// base: what the kernels' 16-byte copies need.  Otherwise a contiguous copy.
at::Tensor aligned(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  t.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

Strides3 strides3(const at::Tensor& t) { return Strides3{t.stride(0), t.stride(1), t.stride(2)}; }
Strides3 strides3(const int64_t (&st)[4]) { return Strides3{st[0], st[1], st[2]}; }
// Strides of a packed (total, H, D) operand as the kernels index it: batch 0, head, row.
Strides3 packed_strides(const at::Tensor& t) { return Strides3{0, t.stride(1), t.stride(0)}; }

void check_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attnfast cuda: q must be float16 or bfloat16, got ", q.scalar_type());
}

// q, k, v and the mask: checked in attn_args (csrc/attn_args.h) with these rules.
const Backend kCuda{"attnfast cuda", at::kCUDA, "CUDA tensors on one device", "on q's device", check_dtype,
                    /*one_head_dim=*/true};

void fill_common(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double dropout_p, bool backward) {
  const AttnArgs a = attn_args(kCuda, q, k, v, mask, scale, window_left, window_right, bottom_right);
  TORCH_CHECK(dropout_p == 0.0, "attnfast cuda: dropout is served by the Triton backend");
  TORCH_CHECK(backward ? bwd_supports_head_dim(static_cast<int>(a.E)) : fwd_supports_head_dim(static_cast<int>(a.E)),
              "attnfast cuda: no ", backward ? "backward" : "forward", " kernel for head dim ", a.E);
  TORCH_CHECK(a.B <= kMaxGrid && a.Hq <= kMaxGrid, "attnfast cuda: batch and heads must be <= ", kMaxGrid);
  // Band arithmetic (row + diagonal + window) stays below 3 * 2^29 < 2^31.
  TORCH_CHECK(a.Lq < (int64_t{1} << 29) && a.Lk < (int64_t{1} << 29),
              "attnfast cuda: sequence lengths must be < 2^29");
  fill_shared_fields(p, a);
  p.elem = q.scalar_type() == at::kBFloat16 ? Elem::bf16 : Elem::f16;
  p.D = static_cast<int>(a.E);
  p.q_st = strides3(a.q_st);
  p.k_st = strides3(a.k_st);
  p.v_st = strides3(a.v_st);
  for (int i = 0; i < 4; ++i) p.mask_st[i] = a.mask_st[i];
  p.scale = static_cast<float>(a.scale);
  p.scale_log2 = static_cast<float>(a.scale * 1.4426950408889634);
  // Windows wider than both sequences are unbounded; clamping keeps the index
  // arithmetic in 32 bits.
  const int64_t far = std::max(a.Lq, a.Lk) + 1;
  p.window_left = static_cast<int>(a.window_left < 0 ? -1 : std::min(a.window_left, far));
  p.window_right = static_cast<int>(a.window_right < 0 ? -1 : std::min(a.window_right, far));
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "attnfast cuda: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The forward into out (strides out_st) and lse (float32); a call without keys gets zeros and
// lse -inf, one without rows nothing.
std::tuple<at::Tensor, at::Tensor> run_fwd_into(FwdParams& p, const at::Tensor& out, const at::Tensor& lse,
                                                const Strides3& out_st, bool no_rows, bool no_keys, const char* what) {
  if (no_rows) return {out, lse};
  if (no_keys) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.out_st = out_st;
  p.lse = lse.data_ptr<float>();
  check_launch(run_fwd(p, c10::cuda::getCurrentCUDAStream().stream()), what);
  return {out, lse};
}

// The backward's tensors into p, then the launch.  packed: (total, H, D) operands (varlen), else
// (B, H, L, D).  lse, dlse, delta_in: contiguous float32; dlse, delta_in may be undefined.
void run_bwd_into(BwdParams& p, bool packed, const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse,
                  const at::Tensor& dlse, const at::Tensor& delta_in, const at::Tensor& delta,
                  const at::Tensor& dq_accum, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  const char* what) {
  const auto st = [packed](const at::Tensor& t) { return packed ? packed_strides(t) : strides3(t); };
  p.out = out.data_ptr();
  p.out_st = st(out);
  p.dout = dout.data_ptr();
  p.dout_st = st(dout);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.delta_in = delta_in.defined() ? delta_in.data_ptr<float>() : nullptr;
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_st = st(dq);
  p.dk_st = st(dk);
  p.dv_st = st(dv);
  check_launch(run_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), what);
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in, const std::optional<at::Tensor>& attn_mask,
                                            double scale, int64_t window_left, int64_t window_right,
                                            bool bottom_right, double dropout_p,
                                            const std::optional<at::Tensor>& rng) {
  (void)rng;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  FwdParams p;
  fill_common(p, q, k, v, attn_mask, scale, window_left, window_right, bottom_right, dropout_p, false);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  return run_fwd_into(p, out, lse, strides3(out), out.numel() == 0, p.Lk == 0, "forward launch");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, const std::optional<at::Tensor>& rng, bool mask_grad,
    const std::optional<at::Tensor>& delta_in) {
  (void)rng;
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const at::Tensor dout = aligned(dout_in), out = aligned(out_in);
  BwdParams p;
  fill_common(p, q, k, v, attn_mask, scale, window_left, window_right, bottom_right, dropout_p, true);
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == out.sizes() && out.size(0) == p.B && out.size(1) == p.Hq &&
                  out.size(2) == p.Lq && out.size(3) == p.D,
              "attnfast cuda: dout and out must be (B, Hq, Lq, D)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  dout.device() == q.device() && out.device() == q.device(),
              "attnfast cuda: dout and out must have q's dtype and device");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
                  lse.size(2) == p.Lq && lse.device() == q.device(),
              "attnfast cuda: lse must be float32 (B, Hq, Lq) on q's device");
  TORCH_CHECK(!mask_grad || p.mask_kind == MaskKind::additive, "attnfast cuda: mask_grad needs a float attn_mask");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == at::kFloat && dlse->device() == q.device(),
                "attnfast cuda: dlse must match lse in shape, dtype and device");
    dlse_c = dlse->contiguous();
  }
  at::Tensor delta_in_c;
  if (delta_in.has_value()) {
    TORCH_CHECK(delta_in->sizes() == lse.sizes() && delta_in->scalar_type() == at::kFloat &&
                    delta_in->device() == q.device(),
                "attnfast cuda: delta must match lse in shape, dtype and device");
    delta_in_c = delta_in->contiguous();
  }
  at::Tensor dq = at::empty({p.B, p.Hq, p.Lq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Lk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Lk, p.D}, q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dmask = mask_grad ? at::zeros({p.B, p.Hq, p.Lq, p.Lk}, f32) : at::empty({0}, f32);
  if (static_cast<int64_t>(p.B) * p.Hq * p.Lq == 0 || p.Lk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }
  at::Tensor dq_accum = at::empty({p.B, p.Hq, p.Lq, p.D}, f32);
  at::Tensor delta = at::empty({p.B, p.Hq, p.Lq}, f32);
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  run_bwd_into(p, false, out, dout, lse_c, dlse_c, delta_in_c, delta, dq_accum, dq, dk, dv, "backward launch");
  return {dq, dk, dv, dmask};
}

// A packed (total, H, D) tensor as a (1, H, total, D) view, for the shared checks.
at::Tensor packed4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "attnfast cuda varlen: ", name, " must be (total_tokens, heads, head_dim), got ",
              t.sizes());
  return t.unsqueeze(0).transpose(1, 2);
}

at::Tensor offsets_arg(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.scalar_type() == at::kInt && t.device() == q.device(),
              "attnfast cuda varlen: ", name, " must be an int32 tensor of ", n, " entries on q's device, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

// The offsets of a varlen call, alive while the kernels read them.
struct Offsets {
  at::Tensor cu_q, cu_k, used_k;
};

// p of a packed batch: q, k, v (total, H, D) checked as fwd's operands, then the ragged fields.
// The offsets' values are not read here (that would sync the device): the caller's max_seqlen_q /
// max_seqlen_k size the grid, and seq_of (band.cuh) keeps every sequence inside the packed
// tensors whatever the offsets say.
Offsets varlen_params(AttnParams& p, at::Tensor& q, at::Tensor& k, at::Tensor& v, const at::Tensor& cu_seqlens_q,
                      const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
                      int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                      int64_t window_right, bool bottom_right, double dropout_p, bool backward) {
  // Contiguous packed copies where the rows are not 16-byte aligned (the kernels copy 16 bytes).
  for (at::Tensor* t : {&q, &k, &v})
    if (t->dim() == 3 && (t->stride(2) != 1 || t->stride(1) % 8 != 0 || t->stride(0) % 8 != 0 ||
                          reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0))
      *t = t->contiguous();
  fill_common(p, packed4(q, "q"), packed4(k, "k"), packed4(v, "v"), std::nullopt, scale, window_left, window_right,
              bottom_right, dropout_p, backward);
  const int64_t B = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(B >= 0 && B <= kMaxGrid, "attnfast cuda varlen: cu_seqlens_q must have batch + 1 entries, batch <= ",
              kMaxGrid);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q < (int64_t{1} << 29) &&
                  max_seqlen_k < (int64_t{1} << 29),
              "attnfast cuda varlen: max_seqlen_q and max_seqlen_k must be in [0, 2^29)");
  Offsets o{offsets_arg(cu_seqlens_q, "cu_seqlens_q", B + 1, q), offsets_arg(cu_seqlens_k, "cu_seqlens_k", B + 1, q),
            at::Tensor()};
  if (seqused_k.has_value()) o.used_k = offsets_arg(*seqused_k, "seqused_k", B, q);
  p.B = static_cast<int>(B);
  p.Lq = static_cast<int>(max_seqlen_q);
  p.Lk = static_cast<int>(max_seqlen_k);
  p.q_st.b = p.k_st.b = p.v_st.b = 0;
  p.diag_offset = 0;
  p.cu_q = o.cu_q.data_ptr<int>();
  p.cu_k = o.cu_k.data_ptr<int>();
  p.used_k = o.used_k.defined() ? o.used_k.data_ptr<int>() : nullptr;
  p.bottom_right = bottom_right ? 1 : 0;
  p.total_q = static_cast<int>(q.size(0));
  p.total_k = static_cast<int>(k.size(0));
  return o;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, const std::optional<at::Tensor>& rng) {
  (void)rng;
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = q_in, k = k_in, v = v_in;
  FwdParams p;
  const Offsets o = varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                  scale, window_left, window_right, bottom_right, dropout_p, false);
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  return run_fwd_into(p, out, lse, packed_strides(out), out.numel() == 0 || p.B == 0 || p.Lq == 0,
                      p.Lk == 0 || p.total_k == 0, "varlen forward launch");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double dropout_p, const std::optional<at::Tensor>& rng) {
  (void)rng;
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = q_in, k = k_in, v = v_in;
  BwdParams p;
  const Offsets o = varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                  scale, window_left, window_right, bottom_right, dropout_p, true);
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous();
  TORCH_CHECK(dout.sizes() == out.sizes() && out.dim() == 3 && out.size(0) == q.size(0) && out.size(1) == q.size(1) &&
                  out.size(2) == v.size(2),
              "attnfast cuda varlen: dout and out must be (total_q, Hq, D)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  dout.device() == q.device() && out.device() == q.device(),
              "attnfast cuda varlen: dout and out must have q's dtype and device");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(1) &&
                  lse.size(1) == q.size(0) && lse.device() == q.device(),
              "attnfast cuda varlen: lse must be float32 (Hq, total_q) on q's device");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == at::kFloat && dlse->device() == q.device(),
                "attnfast cuda varlen: dlse must match lse in shape, dtype and device");
    dlse_c = dlse->contiguous();
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());  // keys past seqused_k get no gradient
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (dq.numel() == 0 || p.B == 0 || p.Lq == 0 || p.Lk == 0 || p.total_k == 0) {
    dq.zero_();
    return {dq, dk, dv};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({q.size(1), q.size(0), q.size(2)}, f32);
  at::Tensor delta = at::empty({q.size(1), q.size(0)}, f32);
  p.dmask = nullptr;
  run_bwd_into(p, true, out, dout, lse_c, dlse_c, at::Tensor(), delta, dq_accum, dq, dk, dv, "varlen backward launch");
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfast, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
  m.impl("varlen_fwd", &varlen_fwd_cuda);
  m.impl("varlen_bwd", &varlen_bwd_cuda);
}

}  // namespace cuda
}  // namespace attnfast
