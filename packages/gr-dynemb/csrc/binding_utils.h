// Helpers shared by the CPU and the CUDA table's pybind11 bindings (csrc/bindings.cpp, csrc/cuda_bindings.cpp).
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include "table/optimizer.h"

namespace gr_dynemb {
namespace binding {

// A raw address from Python (a torch tensor's data_ptr()) as a typed pointer.
template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// (kind, lr, eps, beta1, beta2, step) per table of a group -> checked optimizer steps.
using OptimizerParams = std::tuple<int, double, double, double, double, int64_t>;
inline std::vector<OptimizerStep> optimizer_steps(const std::vector<OptimizerParams>& params) {
  std::vector<OptimizerStep> steps;
  for (const auto& [kind, lr, eps, beta1, beta2, step] : params)
    steps.push_back(OptimizerStep::make(kind, lr, eps, beta1, beta2, step));
  return steps;
}

}  // namespace binding
}  // namespace gr_dynemb
