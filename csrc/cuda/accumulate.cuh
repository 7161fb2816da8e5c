// Launcher API of the CUDA accumulate_/finalize_ kernels (csrc/cuda/accumulate.cu).
//
// Plain C++ with no torch headers: accumulate.cu is compiled by nvcc on any machine
// (tests/cuda/test_nvcc_compile.py), and accumulate_binding.cpp, the torch side, fills
// these structs from tensors. The caller owns every buffer; the launchers only enqueue
// kernels on `stream` and never synchronize.
//
// Names carry an fa_/Fa prefix rather than a namespace so that they cannot clash with
// c10::cuda / at::cuda in the binding.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

// Element types the kernels read and write.
enum class FaDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Pairs (grad, accum) that share one (grad dtype, accum dtype), so that one kernel
// instantiation serves them. Arrays are host arrays of length `count`. Pointers are device
// pointers to contiguous memory of `numels[i]` elements; they may start at any element
// offset (starts that cannot be 16-byte aligned together take a scalar path).
struct FaAccumulateGroup {
  FaDtype grad_dtype;   // kFloat32, kBFloat16 or kFloat16
  FaDtype accum_dtype;  // kFloat32 or grad_dtype
  int64_t count;
  void* const* grads;
  void* const* accums;
  const int64_t* numels;
  // Position of each pair in the caller's list: its per-tensor result goes to
  // grad_sumsq_per_tensor[slots[i]], whatever group it was put in.
  const int64_t* slots;
};

// Device buffers accumulate writes. Every group of one call shares them, so the totals
// cover all groups and per-tensor results land in the caller's order.
struct FaAccumulateOutputs {
  float* grad_sumsq;             // f32 scalar: sum of grad**2 over every pair
  float* grad_sumsq_per_tensor;  // f32[num_tensors]
  float* accum_sumsq;            // f32 scalar: sum of accum**2 as stored after the update
  bool* found_nonfinite;         // bool scalar: any gradient element is NaN or +-Inf
  float* workspace;              // fa_accumulate_workspace_floats(...) floats, uninitialized
};

// Accumulators that share one (accum dtype, out dtype); `outs` is nullptr when the call
// has no outputs (out_dtype is then ignored). Same conventions as FaAccumulateGroup.
struct FaFinalizeGroup {
  FaDtype accum_dtype;
  FaDtype out_dtype;
  int64_t count;
  void* const* accums;
  void* const* outs;
  const int64_t* numels;
};

// Floats of workspace fa_accumulate_launch needs for these groups, or -1 when the work
// does not fit the kernels' 32-bit chunk indices (more than about 2^45 elements).
int64_t fa_accumulate_workspace_floats(const FaAccumulateGroup* groups, int num_groups,
                                       int64_t num_tensors);

// For every pair i of every group: accum[i] += scale * grad[i] in fp32, stored back in the
// accumulator's dtype (round to nearest even); grad[i] is zeroed after the read when
// `zero_grads`. Fills `out` deterministically: each block writes its partial sums to the
// workspace and they are reduced in a fixed order, with no floating-point atomics, so the
// same inputs give bit-identical sums. `num_tensors` is the sum of the groups' counts;
// with num_tensors == 0 the scalars are set to zero.
// Returns the first launch error, or cudaSuccess.
cudaError_t fa_accumulate_launch(const FaAccumulateGroup* groups, int num_groups,
                                 int64_t num_tensors, float scale, bool zero_grads,
                                 const FaAccumulateOutputs& out, cudaStream_t stream);

// For every accumulator i of every group: r = accum[i] * factor * (*factor_tensor) in fp32,
// factor_tensor being a device pointer to one float, or nullptr for 1. out[i] = r in the
// output dtype when the group has outputs; then accum[i] = 0 when `zero_accums`, else r.
// Returns the first launch error, or cudaSuccess.
cudaError_t fa_finalize_launch(const FaFinalizeGroup* groups, int num_groups, float factor,
                               const float* factor_tensor, bool zero_accums,
                               cudaStream_t stream);
