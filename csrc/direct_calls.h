// Direct (unboxed) Python entry points of the fused ops; see csrc/direct_calls.cpp.
#pragma once

#include <torch/extension.h>

namespace pyowt {

void register_direct_calls(pybind11::module& m);

}  // namespace pyowt
