// When a fused op's autograd kernel can skip building a graph node.
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

}  // namespace pyowt
