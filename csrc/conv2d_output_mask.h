// The output_mask argument of pyowt::conv2d_bias_act_backward (schema: conv2d.cpp), read by
// every kernel of that op.
#pragma once

#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>

namespace pyowt {

// The kernels take bool[3] as c10::List<bool> rather than std::array<bool, 3>: with
// std::array the dispatcher converts the list itself and a wrong length fails with a
// message that names no argument.
inline std::array<bool, 3> read_output_mask(const c10::List<bool>& mask, const char* op) {
  if (mask.size() != 3) {
    std::string got = "[";
    for (size_t i = 0; i < mask.size(); ++i) {
      got += std::string(i > 0 ? ", " : "") + (mask.get(i) ? "True" : "False");
    }
    TORCH_CHECK(false, op, ": output_mask must have 3 elements (grad x, grad weight, grad bias), "
                "got ", mask.size(), ": ", got, "]");
  }
  return {mask.get(0), mask.get(1), mask.get(2)};
}

}  // namespace pyowt
