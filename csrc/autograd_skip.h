// When a fused op's autograd kernel can skip building a graph node, or must take the ATen
// composition instead.
//
// torch::autograd::Function::apply allocates a node and fills its context on every call,
// even under no_grad (inference, the eval pass) or with frozen inputs; the ops' autograd
// kernels call the forward directly in that case (host time on the per-layer hot path).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <optional>

namespace pyowt {

inline bool any_requires_grad(const at::Tensor& a, const at::Tensor& b,
                              const std::optional<at::Tensor>& c) {
  if (!at::GradMode::is_enabled()) return false;
  return a.requires_grad() || b.requires_grad() || (c.has_value() && c->defined() && c->requires_grad());
}

// Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): the fused kernels and the
// autograd::Function around them have no forward derivative, and a tangent passed to them
// would silently come back as none (zero). Calls with a tangent on any input run the ATen
// composition instead, which has one. Level 0 is the only level eager forward AD uses
// (functorch's nested jvp wraps tensors per level around it).
inline bool any_forward_grad(const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& c) {
  auto has = [](const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); };
  return has(a) || has(b) || (c.has_value() && has(*c));
}

}  // namespace pyowt
