// Autograd of attnfast::fwd, for every device: its backward is attnfast::bwd.
//
// In C++ rather than torch.library.register_autograd: a Python autograd
// kernel runs Python on every call, grad or not (about 6 us a call, more than
// a whole small attention takes).  This one costs a dispatcher hop.
// torch.compile traces through it like any C++ autograd kernel; the fake
// (meta) kernels of both ops are registered in attnfast/ops.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace attnfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> call_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                    double scale, int64_t wl, int64_t wr, bool br, double dropout_p,
                                    const OptTensor& rng) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnfast::fwd", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const OptTensor&, double, int64_t, int64_t, bool,
                                                               double, const OptTensor&)>();
  return op.call(q, k, v, mask, scale, wl, wr, br, dropout_p, rng);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                                    const OptTensor& dlse, const OptTensor& mask, double scale,
                                                    int64_t wl, int64_t wr, bool br, double dropout_p,
                                                    const OptTensor& rng, bool mask_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnfast::bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const OptTensor&, const OptTensor&, double, int64_t, int64_t, bool, double, const OptTensor&, bool,
              const OptTensor&)>();
  return op.call(dout, q, k, v, out, lse, dlse, mask, scale, wl, wr, br, dropout_p, rng, mask_grad, std::nullopt);
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class Fwd : public torch::autograd::Function<Fwd> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& mask, double scale, int64_t wl, int64_t wr, bool br,
                               double dropout_p, const OptTensor& rng) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] = call_fwd(q, k, v, mask, scale, wl, wr, br, dropout_p, rng);
    ctx->save_for_backward({q, k, v, mask.value_or(Tensor()), out, lse, rng.value_or(Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["wl"] = wl;
    ctx->saved_data["wr"] = wr;
    ctx->saved_data["br"] = br;
    ctx->saved_data["p"] = dropout_p;
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &mask = s[3], &out = s[4], &lse = s[5], &rng = s[6];
    const Tensor& dout_in = grads[0];
    const Tensor& dlse = grads[1];
    const variable_list none(10);
    if (!dout_in.defined() && !dlse.defined()) return none;
    const Tensor dout = dout_in.defined() ? dout_in : at::zeros_like(out);
    // A saved mask is defined only when there is one; then it is edge 3 (q, k, v are 0-2).
    const bool mask_grad = mask.defined() && mask.is_floating_point() && ctx->needs_input_grad(3);
    auto [dq, dk, dv, dmask] =
        call_bwd(dout, q, k, v, out, lse, opt(dlse), opt(mask), ctx->saved_data["scale"].toDouble(),
                 ctx->saved_data["wl"].toInt(), ctx->saved_data["wr"].toInt(), ctx->saved_data["br"].toBool(),
                 ctx->saved_data["p"].toDouble(), opt(rng), mask_grad);
    variable_list g = none;
    g[0] = dq;
    g[1] = dk;
    g[2] = dv;
    if (mask_grad) g[3] = dmask.to(mask.scalar_type());
    return g;
  }
};

std::tuple<Tensor, Tensor> fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                        double scale, int64_t wl, int64_t wr, bool br, double dropout_p,
                                        const OptTensor& rng) {
  const bool any_grad = q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                        (mask.has_value() && mask->defined() && mask->requires_grad());
  if (!any_grad || !at::GradMode::is_enabled()) {  // no graph to record
    at::AutoDispatchBelowADInplaceOrView below;
    return call_fwd(q, k, v, mask, scale, wl, wr, br, dropout_p, rng);
  }
  const variable_list r = Fwd::apply(q, k, v, mask, scale, wl, wr, br, dropout_p, rng);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace attnfast

TORCH_LIBRARY_IMPL(attnfast, Autograd, m) { m.impl("fwd", &attnfast::fwd_autograd); }
