// reg-ddp: the few libtorch calls that tch does not expose. Failures come back as
// strings (shim_error.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "shim_error.h"

using reg_shim::guard;

extern "C" {

// Make `grad` the gradient of `param`: backward then accumulates in place into it,
// which lets every parameter's gradient be a view of one flat buffer.
char *reg_set_grad(at::Tensor *param, at::Tensor *grad) {
  return guard([&] { param->mutable_grad() = *grad; });
}

// One fused AdamW update of a flat slice (one pass over p, g, m, v). `step` is the
// step-count tensor, already advanced by the caller (the kernel does not advance it).
// When `found_inf` is given and non-zero, the kernel leaves everything untouched.
char *reg_fused_adamw(at::Tensor *p, at::Tensor *g, at::Tensor *m, at::Tensor *v, at::Tensor *step, double lr,
                      double beta1, double beta2, double weight_decay, double eps, at::Tensor *found_inf) {
  return guard([&] {
    std::optional<at::Tensor> inf;
    if (found_inf) inf = *found_inf;
    at::_fused_adamw_({*p}, {*g}, {*m}, {*v}, {}, {*step}, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, inf);
  });
}

// Called after backward has accumulated a parameter's gradient: (context, index).
// It must not throw (the Rust side catches its own panics).
typedef void (*reg_grad_ready_fn)(void *ctx, int64_t index);

struct RegGradReady : torch::autograd::PostAccumulateGradHook {
  reg_grad_ready_fn fn;
  void *ctx;
  int64_t index;
  RegGradReady(reg_grad_ready_fn f, void *c, int64_t i) : fn(f), ctx(c), index(i) {}
  void operator()(const torch::autograd::Variable &) override { fn(ctx, index); }
};

// After every backward that accumulates into `param`'s gradient, call fn(ctx, index)
// (NULL fn: remove the hook). The gradient-bucket overlap of the training step.
char *reg_on_grad_ready(at::Tensor *param, reg_grad_ready_fn fn, void *ctx, int64_t index) {
  return guard([&] {
    std::unique_ptr<torch::autograd::PostAccumulateGradHook> hook;
    if (fn) hook = std::make_unique<RegGradReady>(fn, ctx, index);
    torch::autograd::impl::set_post_acc_grad_hooks(*param, std::move(hook));
  });
}

void reg_free_error(char *e) { std::free(e); }
}
