// Checks of the scalar arguments of sgd_window_step_/adam_window_step_, shared by the CPU
// kernels (csrc/cpu/optim_step.cpp) and the CUDA binding (csrc/cuda/optim_step_binding.cpp),
// with the messages of fastaccum/ops/optim_step.py. Each op runs them before it touches a
// tensor.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fastaccum {

// Every (value, name) finite.
inline void check_finite(std::initializer_list<std::pair<double, const char*>> values) {
  for (const auto& [value, name] : values) {
    TORCH_CHECK(std::isfinite(value), name, " must be finite, got ", value);
  }
}

// num_buffers: the length of momentum_buffers, which must be empty without momentum.
inline void check_sgd_options(double factor, double lr, double momentum, double dampening,
                              double weight_decay, bool nesterov, size_t num_buffers) {
  check_finite({{factor, "factor"},
                {lr, "lr"},
                {momentum, "momentum"},
                {dampening, "dampening"},
                {weight_decay, "weight_decay"}});
  TORCH_CHECK(momentum != 0.0 || num_buffers == 0,
              "momentum_buffers must be empty when momentum is 0, got ", num_buffers,
              " tensors");
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "nesterov needs momentum > 0 and dampening == 0, got momentum=", momentum,
              " and dampening=", dampening);
}

inline void check_adam_options(double factor, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step) {
  check_finite({{factor, "factor"},
                {lr, "lr"},
                {beta1, "beta1"},
                {beta2, "beta2"},
                {eps, "eps"},
                {weight_decay, "weight_decay"}});
  TORCH_CHECK(step >= 1, "step must be >= 1 (the step count after its increment), got ", step);
  for (const auto& [value, name] : {std::pair{beta1, "beta1"}, {beta2, "beta2"}}) {
    TORCH_CHECK(value >= 0.0 && value < 1.0, name, " must be in [0, 1), got ", value);
  }
}

}  // namespace fastaccum
