// Torch binding of the CPU kernels: op schemas, tensor -> params, CPU impls.
//
// The Python layer (attnfast/_validate.py) checks arguments and raises clear
// errors before anything here runs; the TORCH_CHECKs below (and those of
// csrc/attn_args.h, shared with the CUDA binding) are the last line of defence
// so that no call can read out of bounds.
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "../attn_args.h"
#include "params.h"
#ifdef ATTNFAST_WITH_CUDA
#include "../cuda/flash.h"
#endif

namespace attnfast {
namespace cpu {
namespace {

void torch_parallel_for(int64_t n, int64_t grain, void* ctx, RangeFn fn) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  return avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kDefault);
#else
  return Isa::kDefault;
#endif
}

// The ISA path in use: the best the CPU has, capped by ATTNFAST_CPU_ISA
// ("default", "avx2" or "avx512") so tests can run every path this CPU allows.
Isa isa_in_use() {
  static const Isa best = best_isa();
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("ATTNFAST_CPU_ISA")) {
    if (std::strcmp(env, "default") == 0) cap = Isa::kDefault;
    else if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
  }
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

std::string name_of(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

std::string isa_name() { return name_of(isa_in_use()); }
std::string best_isa_name() { return name_of(best_isa()); }

// The entry points of the ISA build in use.
const Kernels& kernels() {
  switch (isa_in_use()) {
    case Isa::kAvx512: return isa_avx512::kernels;
    case Isa::kAvx2: return isa_avx2::kernels;
    default: return isa_default::kernels;
  }
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "attnfast cpu: unsupported dtype ", t);
  }
}

// Saved lse: float64 for float32/float64 inputs (see Elem in tile_ops.h), else float32.
at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble || q.scalar_type() == at::kFloat ? at::kDouble : at::kFloat;
}

// Accumulation dtype (of the mask gradient).
at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}
Strides4 strides4(const int64_t (&st)[4]) { return Strides4{st[0], st[1], st[2], st[3]}; }

void check_dtype(const at::Tensor& q) { to_dtype(q.scalar_type()); }

// q, k, v and the mask: checked in attn_args (csrc/attn_args.h) with these rules.
const Backend kCpu{"attnfast cpu", at::kCPU, "CPU tensors", "a CPU tensor", check_dtype, /*one_head_dim=*/false};

void fill_common(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double dropout_p,
                 const std::optional<at::Tensor>& rng) {
  const AttnArgs a = attn_args(kCpu, q, k, v, mask, scale, window_left, window_right, bottom_right);
  fill_shared_fields(p, a);
  p.dtype = to_dtype(q.scalar_type());
  p.E = a.E;
  p.Ev = a.Ev;
  p.q_st = strides4(a.q_st);
  p.k_st = strides4(a.k_st);
  p.v_st = strides4(a.v_st);
  p.mask_st = strides4(a.mask_st);
  p.scale = a.scale;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  p.bottom_right = bottom_right;
  p.lse_sb = p.Hq * p.Lq;
  p.lse_sh = p.Lq;
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attnfast cpu: dropout_p must be in [0, 1)");
  p.dropout_p = dropout_p;
  p.seed = 0;
  p.offset = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng.has_value() && rng->numel() == 2 && rng->scalar_type() == at::kLong,
                "attnfast cpu: dropout needs an int64 rng tensor (seed, offset)");
    const at::Tensor r = rng->to(at::kCPU).contiguous();
    p.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    p.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  }
  p.parallel_for = torch_parallel_for;
}

// The backward's tensors in p: dout, out, lse (and dlse, or none) in, dq, dk, dv out, each
// described by `strides` ((batch, head, row, column) of a 4-D tensor, or of a packed one).
void set_bwd_tensors(BwdParams& p, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor* dlse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                     Strides4 (*strides)(const at::Tensor&)) {
  p.dout = dout.data_ptr();
  p.dout_st = strides(dout);
  p.out = out.data_ptr();
  p.out_st = strides(out);
  p.lse = lse.data_ptr();
  p.dlse = dlse != nullptr ? dlse->data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_st = strides(dq);
  p.dk_st = strides(dk);
  p.dv_st = strides(dv);
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v,
                                           const std::optional<at::Tensor>& attn_mask, double scale,
                                           int64_t window_left, int64_t window_right,
                                           bool bottom_right, double dropout_p,
                                           const std::optional<at::Tensor>& rng) {
  FwdParams p;
  fill_common(p, q, k, v, attn_mask, scale, window_left, window_right, bottom_right, dropout_p, rng);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Ev}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};  // nothing to compute (no rows)
  p.out = out.data_ptr();
  p.out_st = strides_of(out);
  p.lse = lse.data_ptr();
  kernels().attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& attn_mask,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& rng, bool mask_grad, const std::optional<at::Tensor>& delta) {
  BwdParams p;
  fill_common(p, q, k, v, attn_mask, scale, window_left, window_right, bottom_right, dropout_p, rng);
  TORCH_CHECK(dout.dim() == 4 && out.dim() == 4 && dout.sizes() == out.sizes() &&
                  out.size(0) == p.B && out.size(1) == p.Hq && out.size(2) == p.Lq &&
                  out.size(3) == p.Ev,
              "attnfast cpu: dout and out must be (B, Hq, Lq, Ev)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "attnfast cpu: dout and out must have the query dtype");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q) && lse.dim() == 3 && lse.size(0) == p.B &&
                  lse.size(1) == p.Hq && lse.size(2) == p.Lq,
              "attnfast cpu: lse must be (B, Hq, Lq), float64 for float32/float64 inputs, else float32");
  TORCH_CHECK(!mask_grad || p.mask_kind == MaskKind::additive,
              "attnfast cpu: mask_grad needs a float attn_mask");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == lse.scalar_type(),
                "attnfast cpu: dlse must match lse in shape and dtype");
    dlse_c = dlse->contiguous();
  }
  at::Tensor delta_c;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == lse.sizes() && delta->scalar_type() == lse.scalar_type() && delta->device().is_cpu(),
                "attnfast cpu: delta must match lse in shape, dtype and device");
    delta_c = delta->contiguous();
  }
  at::Tensor dq = at::empty({p.B, p.Hq, p.Lq, p.E}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Lk, p.E}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Lk, p.Ev}, q.options());
  const auto acc_opts = lse.options().dtype(acc_dtype(q));
  at::Tensor dmask = mask_grad ? at::zeros({p.B, p.Hq, p.Lq, p.Lk}, acc_opts)
                               : at::empty({0}, acc_opts);
  if (p.B * p.Hq * p.Lq == 0) {  // no query rows: every gradient is zero
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }
  set_bwd_tensors(p, dout, out, lse_c, dlse.has_value() ? &dlse_c : nullptr, dq, dk, dv, strides_of);
  p.delta = delta.has_value() ? delta_c.data_ptr() : nullptr;
  p.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  kernels().attention_bwd(p);
  return {dq, dk, dv, dmask};
}

// Additive attention (additive_kernel.h): float32 CPU tensors, made contiguous here.
AdditiveParams additive_params(const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& va,
                               const at::Tensor& v, const std::optional<at::Tensor>& mask, bool causal) {
  for (const at::Tensor* t : {&qp, &kp, &va, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "attnfast cpu additive: qp, kp, va, v must be float32 CPU tensors");
  TORCH_CHECK(qp.dim() == 4 && kp.dim() == 4 && v.dim() == 4 && va.dim() == 2, "attnfast cpu additive: "
              "qp (B, H, Lq, Da), kp (B, H, Lk, Da), v (B, H, Lk, Ev), va (H, Da) expected");
  AdditiveParams p{};
  p.B = qp.size(0), p.H = qp.size(1), p.Lq = qp.size(2), p.Da = qp.size(3);
  p.Lk = kp.size(2), p.Ev = v.size(3);
  TORCH_CHECK(kp.size(0) == p.B && kp.size(1) == p.H && kp.size(3) == p.Da && v.size(0) == p.B &&
                  v.size(1) == p.H && v.size(2) == p.Lk && va.size(0) == p.H && va.size(1) == p.Da,
              "attnfast cpu additive: qp, kp, va, v shapes disagree");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 4 && m.size(0) == p.B &&
                    m.size(1) == p.H && m.size(2) == p.Lq && m.size(3) == p.Lk,
                "attnfast cpu additive: mask must be a float32 (B, H, Lq, Lk) bias (expanded views allowed)");
    p.mask = m.data_ptr<float>();
    p.mask_st = {m.stride(0), m.stride(1), m.stride(2), m.stride(3)};
  }
  p.causal = causal;
  p.parallel_for = torch_parallel_for;
  return p;
}

std::tuple<at::Tensor, at::Tensor> additive_fwd_cpu(const at::Tensor& qp_in, const at::Tensor& kp_in,
                                                    const at::Tensor& va_in, const at::Tensor& v_in,
                                                    const std::optional<at::Tensor>& mask, bool causal) {
  const at::Tensor qp = qp_in.contiguous(), kp = kp_in.contiguous(), va = va_in.contiguous(),
                   v = v_in.contiguous();
  AdditiveParams p = additive_params(qp, kp, va, v, mask, causal);
  p.qp = qp.data_ptr<float>(), p.kp = kp.data_ptr<float>(), p.va = va.data_ptr<float>(), p.v = v.data_ptr<float>();
  at::Tensor out = at::empty({p.B, p.H, p.Lq, p.Ev}, qp.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, qp.options().dtype(at::kDouble));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<double>();
  kernels().additive_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& qp_in, const at::Tensor& kp_in, const at::Tensor& va_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& mask, bool causal, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse) {
  const at::Tensor qp = qp_in.contiguous(), kp = kp_in.contiguous(), va = va_in.contiguous(),
                   v = v_in.contiguous(), dout = dout_in.contiguous(), lse = lse_in.contiguous();
  AdditiveParams p = additive_params(qp, kp, va, v, mask, causal);
  TORCH_CHECK(dout.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && dout.sizes() == out.sizes() &&
                  out.dim() == 4 && out.size(0) == p.B && out.size(1) == p.H && out.size(2) == p.Lq &&
                  out.size(3) == p.Ev,
              "attnfast cpu additive: dout and out must be float32 (B, H, Lq, Ev)");
  TORCH_CHECK(lse.scalar_type() == at::kDouble && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H &&
                  lse.size(2) == p.Lq,
              "attnfast cpu additive: lse must be float64 (B, H, Lq)");
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes(), "attnfast cpu additive: dlse must match lse's shape");
    dlse_c = dlse->to(at::kDouble).contiguous();
  }
  at::Tensor dqp = at::empty_like(qp), dkp = at::empty_like(kp), dv = at::empty_like(v);
  at::Tensor dva = at::empty({p.B, p.H, p.Da}, qp.options());
  if (p.B * p.H == 0) return {dqp, dkp, dva, dv};
  p.qp = qp.data_ptr<float>(), p.kp = kp.data_ptr<float>(), p.va = va.data_ptr<float>(), p.v = v.data_ptr<float>();
  p.dout = dout.data_ptr<float>();
  p.dlse = dlse.has_value() ? dlse_c.data_ptr<double>() : nullptr;
  p.lse = const_cast<double*>(lse.data_ptr<double>());
  p.dqp = dqp.data_ptr<float>(), p.dkp = dkp.data_ptr<float>(), p.dv = dv.data_ptr<float>();
  p.dva = dva.data_ptr<float>();
  kernels().additive_bwd(p);
  return {dqp, dkp, dva, dv};
}

// Hard (top-k) attention (topk_kernel.h): q, k, v, mask as for fwd; causal is top-left.
TopkParams topk_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask, bool causal, double scale, int64_t top_k) {
  TopkParams p{};
  fill_common(p, q, k, v, mask, scale, -1, causal ? 0 : -1, false, 0.0, std::nullopt);
  TORCH_CHECK(top_k >= 1 && top_k <= p.Lk && p.Lk <= INT32_MAX, "attnfast cpu topk: top_k must be in [1, Lk]");
  p.top_k = top_k;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v,
                                                            const std::optional<at::Tensor>& attn_mask,
                                                            bool causal, double scale, int64_t top_k) {
  TopkParams p = topk_params(q, k, v, attn_mask, causal, scale, top_k);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Ev}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(lse_dtype(q)));
  at::Tensor idx = at::empty({p.B, p.Hq, p.Lq, top_k}, q.options().dtype(at::kInt));
  if (lse.numel() == 0) return {out, lse, idx};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.idx = idx.data_ptr<int32_t>();
  kernels().topk_fwd(p);
  return {out, lse, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, double scale, const at::Tensor& lse_in, const at::Tensor& idx_in,
    const std::optional<at::Tensor>& dlse) {
  TopkParams p = topk_params(q, k, v, attn_mask, false, scale, idx_in.dim() == 4 ? idx_in.size(3) : 0);
  const at::Tensor dout = dout_in.contiguous(), lse = lse_in.contiguous(), idx = idx_in.contiguous();
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.dim() == 4 && dout.size(0) == p.B &&
                  dout.size(1) == p.Hq && dout.size(2) == p.Lq && dout.size(3) == p.Ev,
              "attnfast cpu topk: dout must be (B, Hq, Lq, Ev) of the query dtype");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q) && lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq &&
                  lse.size(2) == p.Lq,
              "attnfast cpu topk: lse must be (B, Hq, Lq), float64 for float32/float64 inputs, else float32");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.size(0) == p.B && idx.size(1) == p.Hq && idx.size(2) == p.Lq,
              "attnfast cpu topk: idx must be int32 (B, Hq, Lq, top_k)");
  // The kernel reads the k/v rows idx names (up to a row's first -1): each must be a key or -1.
  TORCH_CHECK(idx.numel() == 0 || (idx.min().item<int32_t>() >= -1 && idx.max().item<int32_t>() < p.Lk),
              "attnfast cpu topk: idx entries must be key indices in [0, Lk) or -1");
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes(), "attnfast cpu topk: dlse must match lse's shape");
    dlse_c = dlse->to(lse.scalar_type()).contiguous();
  }
  at::Tensor dq = at::empty({p.B, p.Hq, p.Lq, p.E}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Lk, p.E}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Lk, p.Ev}, q.options());
  if (p.B * p.Hkv == 0) return {dq, dk, dv};
  p.dout = dout.data_ptr();
  p.lse = const_cast<void*>(lse.data_ptr());
  p.idx = const_cast<int32_t*>(idx.data_ptr<int32_t>());
  p.dlse = dlse.has_value() ? dlse_c.data_ptr() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dk_st = strides_of(dk);
  p.dv_st = strides_of(dv);
  kernels().topk_bwd(p);
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------
// Ragged batches (seqs.h): packed variable-length sequences and the KV cache.
// ---------------------------------------------------------------------------

// A (total, heads, dim) packed tensor as the (1, heads, total, dim) view attn_args checks.
at::Tensor packed_as_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "attnfast cpu varlen: ", name, " must be (total_tokens, heads, head_dim), got ",
              t.dim(), "-D");
  return t.unsqueeze(0).transpose(1, 2);
}

// An int32 CPU vector of n entries, contiguous (a copy for other int types).
at::Tensor int32_arg(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, "attnfast cpu: ", name, " must be a 1-D tensor of ", n,
              " entries, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "attnfast cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "attnfast cpu: ", name,
              " must be int32 (or int64), got ", t.scalar_type());
  return t.to(at::kInt).contiguous();
}

// Checks cumulative offsets (batch + 1 entries: 0, ..., total, never decreasing); the longest length.
int64_t check_offsets(const at::Tensor& cu, const char* name, int64_t total) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0 && c[n] == total, "attnfast cpu varlen: ", name, " must start at 0 and end at ", total,
              " (the packed length), got ", c[0], " and ", c[n]);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(c[i + 1] >= c[i], "attnfast cpu varlen: ", name, " must never decrease (entry ", i + 1, ")");
    longest = std::max<int64_t>(longest, c[i + 1] - c[i]);
  }
  return longest;
}

// The ragged fields of a varlen call on p (filled by fill_common from the 4-D views):
// sequence lengths from the offsets, the longest as Lq and Lk.
void fill_varlen(AttnParams& p, const at::Tensor& cu_q, const at::Tensor& cu_k,
                 const std::optional<at::Tensor>& used_k, int64_t max_q, int64_t max_k) {
  const int64_t total_q = p.Lq, total_k = p.Lk, B = cu_q.numel() - 1;
  const int64_t lq = check_offsets(cu_q, "cu_seqlens_q", total_q);
  int64_t lk = check_offsets(cu_k, "cu_seqlens_k", total_k);
  TORCH_CHECK(lq <= max_q && lk <= max_k, "attnfast cpu varlen: max_seqlen_q, max_seqlen_k (", max_q, ", ", max_k,
              ") are below the longest sequences (", lq, ", ", lk, ")");
  if (used_k.has_value()) {
    const int32_t* u = used_k->data_ptr<int32_t>();
    const int32_t* c = cu_k.data_ptr<int32_t>();
    lk = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(u[b] >= 0 && u[b] <= c[b + 1] - c[b], "attnfast cpu varlen: seqused_k[", b, "] = ", u[b],
                  " is outside [0, ", c[b + 1] - c[b], "] (sequence ", b, "'s keys)");
      lk = std::max<int64_t>(lk, u[b]);
    }
    p.used_k = u;
  }
  p.B = B;
  p.Lq = lq;
  p.Lk = lk;
  p.q_st.b = p.k_st.b = p.v_st.b = 0;
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.cu_k = cu_k.data_ptr<int32_t>();
  p.lse_sb = 0;  // lse (Hq, total_q)
  p.lse_sh = total_q;
}

// The offsets of a varlen call as int32 CPU tensors, alive while the kernel reads them.
struct Offsets {
  at::Tensor cu_q, cu_k;
  std::optional<at::Tensor> used_k;
};

// p of a varlen call: the shared checks on the packed tensors' 4-D views, then the ragged fields.
Offsets varlen_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                      const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                      double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                      const std::optional<at::Tensor>& rng) {
  fill_common(p, packed_as_4d(q, "q"), packed_as_4d(k, "k"), packed_as_4d(v, "v"), std::nullopt, scale,
              window_left, window_right, bottom_right, dropout_p, rng);
  const int64_t B = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(B >= 0, "attnfast cpu varlen: cu_seqlens_q must have batch + 1 entries");
  Offsets o{int32_arg(cu_seqlens_q, "cu_seqlens_q", B + 1), int32_arg(cu_seqlens_k, "cu_seqlens_k", B + 1),
            std::nullopt};
  if (seqused_k.has_value()) o.used_k = int32_arg(*seqused_k, "seqused_k", B);
  fill_varlen(p, o.cu_q, o.cu_k, o.used_k, max_seqlen_q, max_seqlen_k);
  return o;
}

Strides4 packed_strides(const at::Tensor& t) { return Strides4{0, t.stride(1), t.stride(0), t.stride(2)}; }

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, const std::optional<at::Tensor>& rng) {
  FwdParams p;
  const Offsets offsets = varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                         max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, rng);
  const int64_t total_q = q.size(0);
  at::Tensor out = at::empty({total_q, p.Hq, p.Ev}, q.options());
  at::Tensor lse = at::empty({p.Hq, total_q}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.out_st = packed_strides(out);
  p.lse = lse.data_ptr();
  kernels().attention_fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, const std::optional<at::Tensor>& rng) {
  BwdParams p;
  const Offsets offsets = varlen_params(p, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                         max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, rng);
  const int64_t total_q = q.size(0);
  TORCH_CHECK(dout.dim() == 3 && out.dim() == 3 && dout.sizes() == out.sizes() && out.size(0) == total_q &&
                  out.size(1) == p.Hq && out.size(2) == p.Ev,
              "attnfast cpu varlen: dout and out must be (total_q, Hq, Ev)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  dout.device().is_cpu() && out.device().is_cpu(),
              "attnfast cpu varlen: dout and out must be CPU tensors of the query dtype");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q) && lse.dim() == 2 && lse.size(0) == p.Hq &&
                  lse.size(1) == total_q && lse.device().is_cpu(),
              "attnfast cpu varlen: lse must be (Hq, total_q), float64 for float32/float64 inputs, else float32");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->scalar_type() == lse.scalar_type() && dlse->device().is_cpu(),
                "attnfast cpu varlen: dlse must match lse in shape, dtype and device");
    dlse_c = dlse->contiguous();
  }
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros(k.sizes(), k.options());  // keys past seqused_k get no gradient
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  set_bwd_tensors(p, dout, out, lse_c, dlse.has_value() ? &dlse_c : nullptr, dq, dk, dv, packed_strides);
  p.dmask = nullptr;
  kernels().attention_bwd(p);
  return {dq, dk, dv};
}

// Writes the new rows of a KV cache in place: k (B, s_new, Hkv, E) and v (B, s_new, Hkv, Ev) go to
// token positions seqlens[b] .. seqlens[b] + s_new of entry b's cache (entry cache_batch_idx[b], or
// the pages block_table[b] lists).  Every target row is checked to lie inside the cache before
// anything is written: a bad call raises ValueError and leaves the cache untouched.  (The Python
// index_put it replaces cost ~12 us a tensor at decode sizes.)
void kvcache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& seqlens, const std::optional<at::Tensor>& cache_batch_idx,
                        const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "attnfast cpu kvcache append: k_cache, v_cache, k, v must be 4-D (batch, seqlen, heads, head_dim)");
  const int64_t B = k.size(0), n = k.size(1);
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == n && k.size(2) == k_cache.size(2) && v.size(2) == v_cache.size(2) &&
                        k.size(3) == k_cache.size(3) && v.size(3) == v_cache.size(3) &&
                        k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3),
                    "attnfast cpu kvcache append: k ", k.sizes(), " and v ", v.sizes(),
                    " must be (batch, seqlen_new, heads, head_dim) like k_cache ", k_cache.sizes(), " and v_cache ",
                    v_cache.sizes());
  for (const at::Tensor* t : {&k_cache, &v_cache, &k, &v})
    TORCH_CHECK_TYPE(t->device().is_cpu() && t->scalar_type() == k_cache.scalar_type(),
                     "attnfast cpu kvcache append: k, v, k_cache, v_cache must be CPU tensors of one dtype, got ",
                     t->scalar_type(), " on ", t->device());
  const at::Tensor lens = int32_arg(seqlens, "cache_seqlens", B);
  const int32_t* len = lens.data_ptr<int32_t>();
  const bool paged = block_table.has_value();
  at::Tensor table, bidx;
  int64_t capacity = k_cache.size(1), table_n = 0;
  if (paged) {
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B && block_table->device().is_cpu() &&
                          block_table->scalar_type() == at::kInt,
                      "attnfast cpu kvcache append: block_table must be an int32 CPU tensor (batch, max_blocks)");
    table = block_table->contiguous();
    table_n = table.size(1);
    capacity *= table_n;
  } else if (cache_batch_idx.has_value()) {
    bidx = int32_arg(*cache_batch_idx, "cache_batch_idx", B);
  }
  const int64_t page = k_cache.size(1), entries = k_cache.size(0);
  // (entry, row) of token t of batch entry b; all checked before the first write.
  const auto where = [&](int64_t b, int64_t t, int64_t& entry, int64_t& row) {
    const int64_t pos = len[b] + t;
    if (paged) {
      entry = table.data_ptr<int32_t>()[b * table_n + pos / page];
      row = pos % page;
    } else {
      entry = bidx.defined() ? bidx.data_ptr<int32_t>()[b] : b;
      row = pos;
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] + n <= capacity, "cache_seqlens + seqlen_new must be in [0, ", capacity,
                      "] (the cache's capacity per batch entry): cache_seqlens[", b, "] = ", len[b],
                      ", seqlen_new ", n);
    for (int64_t t = 0; t < n; t += paged ? 1 : n) {
      int64_t entry, row;
      where(b, t, entry, row);
      TORCH_CHECK_VALUE(entry >= 0 && entry < entries, "attnfast cpu kvcache append: batch entry ", b,
                        paged ? " writes to page " : " writes to cache entry ", entry, ", outside [0, ", entries, ")");
    }
  }
  if (n == 0 || B == 0) return;
  const int64_t es = k_cache.element_size();
  // One (heads, head_dim) slab: a memcpy per head when the head dim is contiguous on both sides.
  const auto copy = [&](const at::Tensor& cache, const at::Tensor& x, int64_t b, int64_t t, int64_t entry,
                        int64_t row) {
    const char* src = static_cast<const char*>(x.data_ptr()) + (b * x.stride(0) + t * x.stride(1)) * es;
    char* dst = static_cast<char*>(cache.data_ptr()) + (entry * cache.stride(0) + row * cache.stride(1)) * es;
    const int64_t H = x.size(2), D = x.size(3);
    for (int64_t h = 0; h < H; ++h) {
      const char* s = src + h * x.stride(2) * es;
      char* d = dst + h * cache.stride(2) * es;
      if (x.stride(3) == 1 && cache.stride(3) == 1) {
        std::memcpy(d, s, D * es);
      } else {
        for (int64_t e = 0; e < D; ++e) std::memcpy(d + e * cache.stride(3) * es, s + e * x.stride(3) * es, es);
      }
    }
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < n; ++t) {
      int64_t entry, row;
      where(b, t, entry, row);
      copy(k_cache, k, b, t, entry, row);
      copy(v_cache, v, b, t, entry, row);
    }
}

// The first block_table entry (b, j) in use that lies outside a pool of `pool` pages: entry b uses
// the pages of its first len[b] + add keys.  table: contiguous int32 (B, max_pages).  {-1, -1} if none.
std::pair<int64_t, int64_t> page_outside(const at::Tensor& table, const int32_t* len, int64_t add, int64_t page,
                                         int64_t pool) {
  const int32_t* bt = table.data_ptr<int32_t>();
  const int64_t B = table.size(0), n = table.size(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (len[b] + add + page - 1) / page; ++j)
      if (bt[b * n + j] < 0 || bt[b * n + j] >= pool) return {b, j};
  return {-1, -1};
}

// Attention of q (B, Lq, Hq, E) over a KV cache: k_cache / v_cache (B_cache, S, Hkv, E / Ev), or a page
// pool (pages, page_size, Hkv, E / Ev) with block_table (B, max_pages); entry b uses the first
// seqlens_k[b] keys of cache entry cache_batch_idx[b] (b without it).  The diagonal is bottom-right.
// -> (out (B, Lq, Hq, Ev), lse (B, Hq, Lq) as fwd's).  Nothing is written to the cache here.
std::tuple<at::Tensor, at::Tensor> kvcache_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqlens_k,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& block_table, double scale,
    int64_t window_left, int64_t window_right, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "attnfast cpu kvcache: q, k_cache, v_cache must be 4-D (batch, seqlen, heads, head_dim)");
  TORCH_CHECK(k_cache.size(0) >= 1 || q.size(0) == 0, "attnfast cpu kvcache: the cache is empty");
  const int64_t B = q.size(0), Lq = q.size(1);
  // attn_args checks q, k, v (dtype, device, heads, dims) on (B, H, L, E) views with B cache entries.
  const auto as_b = [&](const at::Tensor& c) {
    at::Tensor t = c.transpose(1, 2);
    return B == 0 ? t.narrow(0, 0, 0) : t.narrow(0, 0, 1).expand({B, t.size(1), t.size(2), t.size(3)});
  };
  FwdParams p;
  fill_common(p, q.transpose(1, 2), as_b(k_cache), as_b(v_cache), std::nullopt, scale, window_left, window_right,
              true, 0.0, std::nullopt);
  TORCH_CHECK(num_splits >= 0, "attnfast cpu kvcache: num_splits must be >= 0 (0 chooses), got ", num_splits);
  p.num_splits = num_splits;
  p.k_st.b = k_cache.stride(0);
  p.v_st.b = v_cache.stride(0);
  TORCH_CHECK(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1),
              "attnfast cpu kvcache: k_cache and v_cache must have the same (entries, seqlen)");
  const at::Tensor lens = int32_arg(seqlens_k, "cache_seqlens", B);
  const int32_t* len = lens.data_ptr<int32_t>();
  int64_t capacity = k_cache.size(1);
  at::Tensor table, bidx;
  if (block_table.has_value()) {
    TORCH_CHECK(!cache_batch_idx.has_value(), "attnfast cpu kvcache: cache_batch_idx and block_table exclude "
                "each other");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B && block_table->device().is_cpu() &&
                    block_table->scalar_type() == at::kInt,
                "attnfast cpu kvcache: block_table must be an int32 CPU tensor (batch, max_blocks), got ",
                block_table->scalar_type(), " ", block_table->sizes());
    table = block_table->contiguous();
    capacity = k_cache.size(1) * table.size(1);
  } else if (cache_batch_idx.has_value()) {
    bidx = int32_arg(*cache_batch_idx, "cache_batch_idx", B);
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(bidx.data_ptr<int32_t>()[b] >= 0 && bidx.data_ptr<int32_t>()[b] < k_cache.size(0),
                  "attnfast cpu kvcache: cache_batch_idx[", b, "] = ", bidx.data_ptr<int32_t>()[b],
                  " is outside [0, ", k_cache.size(0), ")");
    p.batch_k = bidx.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "attnfast cpu kvcache: k_cache has ", k_cache.size(0),
                " entries for a batch of ", B, " (pass cache_batch_idx)");
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= capacity, "attnfast cpu kvcache: cache_seqlens[", b, "] = ", len[b],
                " is outside [0, ", capacity, "] (the cache's capacity)");
    longest = std::max<int64_t>(longest, len[b]);
  }
  at::Tensor kc = k_cache, vc = v_cache;
  if (block_table.has_value()) {
    const int64_t page = k_cache.size(1);
    const int32_t* bt = table.data_ptr<int32_t>();
    const auto bad = page_outside(table, len, 0, page, k_cache.size(0));
    TORCH_CHECK(bad.first < 0, "attnfast cpu kvcache: block_table[", bad.first, ", ", bad.second, "] = ",
                bad.first < 0 ? 0 : bt[bad.first * table.size(1) + bad.second], " is outside the pool [0, ",
                k_cache.size(0), ")");
    if (Lq * (p.Hq / std::max<int64_t>(p.Hkv, 1)) <= 16) {  // decode_call: the kernel reads the pages in place
      p.block_table = bt;
      p.block_table_stride = table.size(1);
      p.page_size = page;
    } else {  // longer queries: each entry's pages gathered into one contiguous cache row
      const at::Tensor pages = at::where(at::arange(table.size(1), table.options()).unsqueeze(0) <
                                             ((lens.unsqueeze(1) + page - 1) / page),
                                         table, at::zeros({}, table.options()));
      kc = k_cache.index_select(0, pages.flatten().to(at::kLong)).view({B, capacity, k_cache.size(2), k_cache.size(3)});
      vc = v_cache.index_select(0, pages.flatten().to(at::kLong)).view({B, capacity, v_cache.size(2), v_cache.size(3)});
      p.k = kc.data_ptr();
      p.v = vc.data_ptr();
      p.k_st = Strides4{kc.stride(0), kc.stride(2), kc.stride(1), kc.stride(3)};
      p.v_st = Strides4{vc.stride(0), vc.stride(2), vc.stride(1), vc.stride(3)};
    }
  }
  p.used_k = len;
  p.Lk = longest;
  at::Tensor out = at::empty({B, Lq, p.Hq, p.Ev}, q.options());
  at::Tensor lse = at::empty({B, p.Hq, Lq}, q.options().dtype(lse_dtype(q)));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.out_st = Strides4{out.stride(0), out.stride(2), out.stride(1), out.stride(3)};
  p.lse = lse.data_ptr();
  kernels().attention_fwd(p);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(attnfast, m) {
  // (out, lse) = attention(q, k, v); q: (B, Hq, Lq, E), k: (B, Hkv, Lk, E),
  // v: (B, Hkv, Lk, Ev), attn_mask expanded to (B, Hq, Lq, Lk) (stride 0 where
  // it broadcasts).  window_left/right = -1 means unbounded; causal is
  // window_right = 0.  rng = (seed, offset) int64, needed when dropout_p > 0.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int window_left, "
      "int window_right, bool bottom_right, float dropout_p, Tensor? rng) -> (Tensor, Tensor)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? attn_mask, "
      "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, "
      "Tensor? rng, bool mask_grad, Tensor? delta=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Additive (Bahdanau) attention on projected queries/keys: qp (B, H, Lq, Da), kp (B, H, Lk, Da),
  // va (H, Da), v (B, H, Lk, Ev), mask a float bias (B, H, Lq, Lk); float32.  -> (out, lse float64)
  m.def("additive_fwd(Tensor qp, Tensor kp, Tensor va, Tensor v, Tensor? mask, bool causal) -> (Tensor, Tensor)");
  // -> (dqp, dkp, dva per (batch, head) (B, H, Da), dv)
  m.def(
      "additive_bwd(Tensor dout, Tensor qp, Tensor kp, Tensor va, Tensor v, Tensor? mask, bool causal, "
      "Tensor out, Tensor lse, Tensor? dlse) -> (Tensor, Tensor, Tensor, Tensor)");
  // Hard (top-k) attention: q, k, v and attn_mask as in fwd, causal top-left.
  // -> (out, lse (dtype as fwd's), idx int32 (B, Hq, Lq, top_k): the kept keys, -1 in unused slots)
  m.def(
      "topk_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale, int top_k) "
      "-> (Tensor, Tensor, Tensor)");
  // Straight-through backward over the kept keys -> (dq, dk, dv)
  m.def(
      "topk_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, Tensor lse, "
      "Tensor idx, Tensor? dlse) -> (Tensor, Tensor, Tensor)");
  // Packed variable-length sequences: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev);
  // sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of
  // k, v (int32, batch + 1 entries), of whose keys only the first seqused_k[i] take part when given.
  // The diagonal, window and dropout as in fwd, per sequence (sequence i's dropout draws with
  // offset + i).  -> (out (total_q, Hq, Ev), lse (Hq, total_q), dtype as fwd's)
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, "
      "float dropout_p, Tensor? rng) -> (Tensor, Tensor)");
  // -> (dq, dk, dv) like q, k, v
  m.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, int window_left, int window_right, bool bottom_right, float dropout_p, Tensor? rng) "
      "-> (Tensor, Tensor, Tensor)");
  // Attention over a KV cache (forward only; appending to the cache is the caller's):
  // q (B, Lq, Hq, E); k_cache, v_cache (B_cache, S, Hkv, E / Ev), or a page pool
  // (pages, page_size, Hkv, E / Ev) with block_table int32 (B, max_pages); entry b attends
  // to the first seqlens_k[b] keys of its cache entry (cache_batch_idx[b], else b), bottom-right
  // diagonal.  num_splits: key splits of the short-query kernel (0 chooses from the shape).
  // -> (out (B, Lq, Hq, Ev), lse (B, Hq, Lq), dtype as fwd's)
  m.def(
      "kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? cache_batch_idx, "
      "Tensor? block_table, float scale, int window_left, int window_right, int num_splits) -> (Tensor, Tensor)");
  // Writes k (B, s_new, Hkv, E) and v into the cache at seqlens[b] .. seqlens[b] + s_new of each
  // entry (cache_batch_idx[b], or the pages of block_table[b]), in place; checks every row first.
  m.def(
      "kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor seqlens, "
      "Tensor? cache_batch_idx, Tensor? block_table) -> ()");
}

TORCH_LIBRARY_IMPL(attnfast, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("additive_fwd", &additive_fwd_cpu);
  m.impl("additive_bwd", &additive_bwd_cpu);
  m.impl("topk_fwd", &topk_fwd_cpu);
  m.impl("topk_bwd", &topk_bwd_cpu);
  m.impl("varlen_fwd", &varlen_fwd_cpu);
  m.impl("varlen_bwd", &varlen_bwd_cpu);
  m.impl("kvcache_fwd", &kvcache_fwd_cpu);
  m.impl("kvcache_append", &kvcache_append_cpu);
}

// One probe.h measurement on the named ISA build -> (seconds, flops).
std::tuple<double, double> cpu_probe(int64_t kind, const std::string& isa, int64_t iters, int64_t threads,
                                     int64_t m, int64_t d, int64_t n) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "cpu_probe: kind must be 0 (FMA peak), 1 (score product) or 2 (P V product)");
  TORCH_CHECK(iters > 0 && threads > 0 && m > 0 && d > 0 && n > 0 && m * d <= (int64_t(1) << 26) &&
                  d * n <= (int64_t(1) << 26) && m * n <= (int64_t(1) << 26),
              "cpu_probe: iters, threads and the tile shape must be positive (tiles up to 2^26 elements)");
  const Isa best = best_isa();
  const Kernels* k = nullptr;
  if (isa == "avx512") k = best == Isa::kAvx512 ? &isa_avx512::kernels : nullptr;
  else if (isa == "avx2") k = best != Isa::kDefault ? &isa_avx2::kernels : nullptr;
  else if (isa == "default") k = &isa_default::kernels;
  TORCH_CHECK(k != nullptr, "cpu_probe: isa must be one this CPU runs ('default', 'avx2', 'avx512'; best here: ",
              name_of(best), "), got '", isa, "'");
  double result[3] = {0.0, 0.0, 0.0};
  ProbeParams p{static_cast<int>(kind), iters, threads, m, d, n, result, torch_parallel_for};
  k->probe(p);
  return {result[0], result[1]};
}

}  // namespace cpu
}  // namespace attnfast

namespace attnfast {
namespace {

// (forward head dims, backward head dims) with CUDA C++ kernels, tuples of ints
// (FwdHeadDims, BwdHeadDims in csrc/cuda/flash.h); ((), ()) in a build without them.
pybind11::tuple cuda_head_dims() {
#ifdef ATTNFAST_WITH_CUDA
  const auto as_tuple = [](const auto& dims) {
    return pybind11::tuple(pybind11::cast(std::vector<int>(std::begin(dims), std::end(dims))));
  };
  return pybind11::make_tuple(as_tuple(cuda::FwdHeadDims::kList), as_tuple(cuda::BwdHeadDims::kList));
#else
  return pybind11::make_tuple(pybind11::tuple(), pybind11::tuple());
#endif
}

// The fast paths' scale: 1/sqrt(E) for None (_validate._default_scale), else an exact finite float;
// false for anything else (the Python path then explains it).
bool plain_scale(pybind11::handle scale_obj, int64_t E, double& scale) {
  if (scale_obj.is_none()) {
    scale = E > 0 ? 1.0 / std::sqrt(static_cast<double>(E)) : 1.0;
    return true;
  }
  if (!PyFloat_CheckExact(scale_obj.ptr())) return false;
  scale = PyFloat_AS_DOUBLE(scale_obj.ptr());
  return std::isfinite(scale);
}

// Whether a fast path may take a call at all: no torch function mode, ATTNFAST_BACKEND unset.
bool plain_allowed() {
  if (at::impl::torch_function_mode_enabled()) return false;
  const char* forced = std::getenv("ATTNFAST_BACKEND");
  return forced == nullptr || forced[0] == '\0';
}

// The public call's fast path (attnfast.scaled_dot_product_attention on CPU
// tensors): _validate._plain_plan's checks in C++, then attnfast::fwd through
// the dispatcher (autograd, dispatch modes and fake tensors as from Python).
// The Python around the op cost ~4 us a call, as much as torch's whole SDPA
// call.  Returns None for anything but the plain call (three exact 4-D CPU
// tensors of one floating dtype and consistent shapes, no mask, no dropout,
// a bool is_causal and enable_gqa, a finite float scale or None, no torch
// function mode, ATTNFAST_BACKEND unset): the Python path then takes it and
// explains any refusal.
pybind11::object plain_sdpa(pybind11::handle q_obj, pybind11::handle k_obj, pybind11::handle v_obj,
                            pybind11::handle attn_mask, pybind11::handle dropout_p, pybind11::handle is_causal,
                            pybind11::handle scale_obj, pybind11::handle enable_gqa) {
  const pybind11::object none = pybind11::none();
  if (!attn_mask.is_none() || !PyFloat_CheckExact(dropout_p.ptr()) || PyFloat_AS_DOUBLE(dropout_p.ptr()) != 0.0 ||
      !PyBool_Check(is_causal.ptr()) || !PyBool_Check(enable_gqa.ptr()) || !THPVariable_CheckExact(q_obj.ptr()) ||
      !THPVariable_CheckExact(k_obj.ptr()) || !THPVariable_CheckExact(v_obj.ptr()) || !plain_allowed())
    return none;
  const at::Tensor& q = THPVariable_Unpack(q_obj.ptr());
  const at::Tensor& k = THPVariable_Unpack(k_obj.ptr());
  const at::Tensor& v = THPVariable_Unpack(v_obj.ptr());
  const auto dt = q.scalar_type();
  if (!(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf) ||
      k.scalar_type() != dt || v.scalar_type() != dt || q.dim() != 4 || k.dim() != 4 || v.dim() != 4 ||
      q.layout() != at::kStrided || k.layout() != at::kStrided || v.layout() != at::kStrided ||
      !q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu())
    return none;
  const int64_t B = q.size(0), Hq = q.size(1), E = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  if (k.size(0) != B || v.size(0) != B || v.size(1) != Hkv || v.size(2) != Lk || k.size(3) != E) return none;
  if (Hq != Hkv && (enable_gqa.ptr() != Py_True || Hkv == 0 || Hq % Hkv != 0)) return none;
  double scale;
  if (!plain_scale(scale_obj, E, scale)) return none;
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("attnfast::fwd", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, double, int64_t, int64_t, bool, double,
                                         const std::optional<at::Tensor>&)>();
  const int64_t right = is_causal.ptr() == Py_True ? 0 : -1;
  at::Tensor out;
  {
    pybind11::gil_scoped_release unlocked;
    out = std::get<0>(op.call(q, k, v, std::nullopt, scale, -1, right, false, 0.0, std::nullopt));
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

// attnfast.attention_with_kvcache's fast path on CPU tensors, as plain_sdpa is
// scaled_dot_product_attention's: the plain decode step (exact CPU tensors of
// one floating dtype, int32 cache_seqlens and index tensors, no window, no
// lse, no gradients, every length and index valid) goes to attnfast::
// kvcache_append and attnfast::kvcache_fwd straight from here.  The Python
// around those two ops cost ~13 us a call against the kernel's 10 us for a
// short cache.  Anything else returns None: the Python path then takes the
// call and explains any refusal with its own errors.
pybind11::object plain_kvcache(pybind11::handle q_obj, pybind11::handle kc_obj, pybind11::handle vc_obj,
                               pybind11::handle k_obj, pybind11::handle v_obj, pybind11::handle seqlens_obj,
                               pybind11::handle table_obj, pybind11::handle bidx_obj, pybind11::handle is_causal,
                               pybind11::handle scale_obj, pybind11::handle num_splits_obj) {
  const pybind11::object none = pybind11::none();
  const auto exact = [](pybind11::handle h) { return THPVariable_CheckExact(h.ptr()); };
  if (!PyBool_Check(is_causal.ptr()) || !PyLong_CheckExact(num_splits_obj.ptr()) || !exact(q_obj) ||
      !exact(kc_obj) || !exact(vc_obj) || !exact(seqlens_obj) || k_obj.is_none() != v_obj.is_none() ||
      (!k_obj.is_none() && (!exact(k_obj) || !exact(v_obj))) || (!table_obj.is_none() && !exact(table_obj)) ||
      (!bidx_obj.is_none() && !exact(bidx_obj)) || (!table_obj.is_none() && !bidx_obj.is_none()) ||
      !plain_allowed())
    return none;
  const long num_splits = PyLong_AsLong(num_splits_obj.ptr());
  if (num_splits < 0 || PyErr_Occurred()) {
    PyErr_Clear();
    return none;
  }
  const at::Tensor& q = THPVariable_Unpack(q_obj.ptr());
  const at::Tensor& kc = THPVariable_Unpack(kc_obj.ptr());
  const at::Tensor& vc = THPVariable_Unpack(vc_obj.ptr());
  const at::Tensor& lens = THPVariable_Unpack(seqlens_obj.ptr());
  const auto dt = q.scalar_type();
  const auto plain = [dt](const at::Tensor& t) {
    return t.scalar_type() == dt && t.dim() == 4 && t.layout() == at::kStrided && t.device().is_cpu() &&
           !t.requires_grad();
  };
  const auto ints = [](const at::Tensor& t, int64_t dim) {
    return t.scalar_type() == at::kInt && t.dim() == dim && t.layout() == at::kStrided && t.device().is_cpu();
  };
  if (!(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf) || !plain(q) ||
      !plain(kc) || !plain(vc) || !ints(lens, 1))
    return none;
  const int64_t B = q.size(0), Hq = q.size(2), E = q.size(3), Hkv = kc.size(2);
  if (lens.size(0) != B || kc.size(3) != E || vc.size(0) != kc.size(0) || vc.size(1) != kc.size(1) ||
      vc.size(2) != Hkv || Hkv == 0 || Hq % Hkv != 0 || kc.size(0) == 0)
    return none;
  std::optional<at::Tensor> k, v, table, bidx;
  int64_t n_new = 0;
  if (!k_obj.is_none()) {
    k = THPVariable_Unpack(k_obj.ptr());
    v = THPVariable_Unpack(v_obj.ptr());
    if (!plain(*k) || !plain(*v) || k->size(0) != B || k->size(2) != Hkv || k->size(3) != E ||
        v->size(0) != B || v->size(1) != k->size(1) || v->size(2) != Hkv || v->size(3) != vc.size(3))
      return none;
    n_new = k->size(1);
  }
  int64_t capacity = kc.size(1);
  if (!table_obj.is_none()) {
    table = THPVariable_Unpack(table_obj.ptr());
    if (!ints(*table, 2) || table->size(0) != B) return none;
    capacity *= table->size(1);
  } else if (!bidx_obj.is_none()) {
    bidx = THPVariable_Unpack(bidx_obj.ptr());
    if (!ints(*bidx, 1) || bidx->size(0) != B) return none;
  } else if (kc.size(0) != B) {
    return none;
  }
  // Every value the call depends on, checked as the Python path checks it.
  const at::Tensor lc = lens.contiguous();
  const int32_t* len = lc.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    if (len[b] < 0 || len[b] + n_new > capacity) return none;
  if (bidx.has_value()) {
    const at::Tensor ic = bidx->contiguous();
    for (int64_t b = 0; b < B; ++b)
      if (ic.data_ptr<int32_t>()[b] < 0 || ic.data_ptr<int32_t>()[b] >= kc.size(0)) return none;
  }
  if (table.has_value() && cpu::page_outside(table->contiguous(), len, n_new, kc.size(1), kc.size(0)).first >= 0)
    return none;
  double scale;
  if (!plain_scale(scale_obj, E, scale)) return none;
  static const auto append = c10::Dispatcher::singleton().findSchemaOrThrow("attnfast::kvcache_append", "").typed<
      void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  static const auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("attnfast::kvcache_fwd", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                                         int64_t, int64_t, int64_t)>();
  at::Tensor out;
  {
    pybind11::gil_scoped_release unlocked;
    at::Tensor used = lens;
    if (k.has_value()) {
      append.call(kc, vc, *k, *v, lens, bidx, table);
      used = n_new > 0 ? lens + n_new : lens;
    }
    out = std::get<0>(fwd.call(q, kc, vc, used, bidx, table, scale, -1, is_causal.ptr() == Py_True ? 0 : -1,
                               num_splits));
  }
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace
}  // namespace attnfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &attnfast::cpu::isa_name,
        "CPU instruction-set path the kernels take now ('avx512', 'avx2' or 'default').");
  m.def("cpu_isa_best", &attnfast::cpu::best_isa_name,
        "Best instruction-set path this CPU supports (ignores ATTNFAST_CPU_ISA).");
  m.def("cpu_probe", &attnfast::cpu::cpu_probe, pybind11::arg("kind"), pybind11::arg("isa"), pybind11::arg("iters"),
        pybind11::arg("threads") = 1, pybind11::arg("m") = 1, pybind11::arg("d") = 1, pybind11::arg("n") = 1,
        "Roofline measurement -> (seconds, flops): kind 0 = FMA peak on `threads` threads (iters rounds "
        "of 12 FMA chains), 1 = the score product of an (m, d) x (d, n) tile, 2 = the P V product with "
        "the rescale, iters times on one thread; isa: 'default', 'avx2' or 'avx512'.");
  m.def("plain_sdpa", &attnfast::plain_sdpa,
        "scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) on the "
        "CPU kernels for the plain call, or None (then the Python path decides).");
  m.def("plain_kvcache", &attnfast::plain_kvcache,
        "attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, "
        "is_causal, scale, num_splits) on the CPU kernels for the plain decode step, or None (then the "
        "Python path decides).");
  m.def("cuda_head_dims", &attnfast::cuda_head_dims,
        "(forward head dims, backward head dims) with CUDA C++ kernels, tuples of ints; ((), ()) in a "
        "build without them.");
}
