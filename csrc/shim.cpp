// reg-ddp: the few libtorch calls that tch does not expose.
// Every entry point catches C++ exceptions and returns them as a malloc'd string
// (NULL on success) so that no exception ever unwinds through Rust frames.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <cstring>
#include <string>

namespace {
char *dup_error(const std::exception &e) {
  std::string s = e.what();
  // libtorch messages carry a C++ backtrace after the first line; keep the first.
  auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}
}  // namespace

extern "C" {

// Make `grad` the gradient of `param`: backward then accumulates in place into it,
// which lets every parameter's gradient be a view of one flat buffer.
char *reg_set_grad(at::Tensor *param, at::Tensor *grad) {
  try {
    param->mutable_grad() = *grad;
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e);
  }
}

// backward(outputs, grad_outputs): tch's backward takes no output gradient, which a
// staged (block by block) backward needs.
char *reg_backward(at::Tensor **outputs, at::Tensor **grads, int n) {
  try {
    std::vector<at::Tensor> outs, gs;
    for (int i = 0; i < n; ++i) {
      outs.push_back(*outputs[i]);
      gs.push_back(*grads[i]);
    }
    torch::autograd::backward(outs, gs);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e);
  }
}

// One fused AdamW update of a flat slice (one pass over p, g, m, v). `step` is the
// step-count tensor, already advanced by the caller (the kernel does not advance it).
// When `found_inf` is given and non-zero, the kernel leaves everything untouched.
char *reg_fused_adamw(at::Tensor *p, at::Tensor *g, at::Tensor *m, at::Tensor *v, at::Tensor *step, double lr,
                      double beta1, double beta2, double weight_decay, double eps, at::Tensor *found_inf) {
  try {
    std::optional<at::Tensor> inf;
    if (found_inf) inf = *found_inf;
    at::_fused_adamw_({*p}, {*g}, {*m}, {*v}, {}, {*step}, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, inf);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e);
  }
}

// TF32 matmuls on Ampere and later; a no-op on CPU.
void reg_allow_tf32(int on) {
  at::globalContext().setAllowTF32CuBLAS(on != 0);
  at::globalContext().setAllowTF32CuDNN(on != 0);
}

void reg_free_error(char *e) { std::free(e); }
}
