// Launcher API of the CUDA sgd_window_step_/adam_window_step_ kernels (csrc/cuda/optim_step.cu).
//
// Plain C++ with no torch headers, as accumulate.cuh: optim_step.cu is compiled by nvcc on
// any machine, and optim_step_binding.cpp, the torch side, fills these structs from
// tensors after checking them. The launchers only enqueue kernels on `stream` and never
// synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// The tensors of one call. Arrays are host arrays of length `count`; their entries are
// device pointers to contiguous float32 memory of numels[i] elements, which may start at
// any element offset (starts that cannot be 16-byte aligned together take a scalar path).
// Row i of every list belongs to parameter i and no two rows share memory.
struct FaWindowStepTensors {
  int64_t count;
  float* const* params;
  float* const* accums;
  float* const* state1;  // SGD: momentum buffers (nullptr without momentum); Adam: exp_avgs
  float* const* state2;  // Adam: exp_avg_sqs; SGD: nullptr
  float* const* state3;  // Adam with amsgrad: max_exp_avg_sqs; else nullptr
  const int64_t* numels;
};

// The scalar arguments of fastaccum::sgd_window_step_, as the schema has them (doubles, as
// Python floats are); the launcher rounds them to the fp32 scalars torch.optim's kernels use.
struct FaSgdOptions {
  double factor;
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;
};

// The scalar arguments of fastaccum::adam_window_step_; step counts this step (>= 1).
struct FaAdamOptions {
  double factor;
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;
  bool maximize;
  int64_t step;
  bool amsgrad;  // tensors.state3 holds the running maxima of exp_avg_sq
};

// For every parameter i: g = accums[i] * factor * (*factor_tensor) in fp32 (factor_tensor
// is a device pointer to one float, or nullptr for 1), negated with maximize; then
// torch.optim.SGD's update of params[i] and its momentum buffer with gradient g (first_step:
// the buffer is set to g, and not read); then accums[i] = 0. Each tensor is read once and
// written once. With momentum != 0, tensors.state1 must hold the buffers.
// Returns cudaErrorInvalidValue for missing buffers or more than about 2^45 elements, else
// the first launch error, or cudaSuccess.
cudaError_t fa_sgd_window_step_launch(const FaWindowStepTensors& tensors,
                                      const FaSgdOptions& options, const float* factor_tensor,
                                      cudaStream_t stream);

// As fa_sgd_window_step_launch, with torch.optim.Adam's update (AdamW's with
// decoupled_weight_decay) of params[i], exp_avgs[i] (state1) and exp_avg_sqs[i] (state2);
// with amsgrad, max_exp_avg_sqs[i] (state3) becomes max(itself, exp_avg_sqs[i]) (NaN when
// either is, as torch.maximum) and the denominator uses it.
// The bias corrections are computed on the host in double, as torch.optim does in Python.
cudaError_t fa_adam_window_step_launch(const FaWindowStepTensors& tensors,
                                       const FaAdamOptions& options, const float* factor_tensor,
                                       cudaStream_t stream);
