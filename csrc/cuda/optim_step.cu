// CUDA kernels of fastaccum::sgd_window_step_ and fastaccum::adam_window_step_ (launcher API in
// optim_step.cuh; semantics and the pure-PyTorch references in fastaccum/ops/optim_step.py).
//
// At the last micro-batch of a window, per element of each fp32 parameter:
//   g = accum * factor * factor_tensor (negated for maximize), torch.optim's SGD or Adam/AdamW
//   update of the parameter and its state with gradient g, then accum = 0.
// Bytes per element: SGD 16 (read param, accum; write param, accum) + 8 with momentum (4
// without reading the buffer on the first step); Adam 32 (param, accum, exp_avg, exp_avg_sq,
// each read and written), 40 with amsgrad (max_exp_avg_sq too). About 15 flops, one sqrt
// and two divisions per Adam element: memory-bound.
//
// Structure: multi-tensor apply (multi_tensor.cuh), five tensor lists per table (param,
// accum, three state lists), 16-byte packed loads and stores when all the tensors of a
// parameter can be aligned at the same element. The options are template flags, so that
// each combination is its own branch-free kernel.
//
// Numerics: fp32 throughout, in the order of torch.optim's single-tensor code path on CUDA
// tensors. Where torch's CUDA kernels compute `a + alpha * b` (add/add_ with alpha, lerp,
// addcmul, addcdiv) this code writes the fmaf that they compile to (addcmul and addcdiv use
// std::fma explicitly; nvcc contracts the others), so the result does not depend on
// --fmad. Division and square root use the IEEE round-to-nearest intrinsics (__fdiv_rn,
// __fsqrt_rn), which stay exact under --use_fast_math too. torch itself multiplies by the
// reciprocal when it divides by a Python scalar (sqrt(v) / bias_correction2_sqrt); like the
// CPU and Triton kernels this divides, which can differ from torch by an ulp.
#include <cstdint>
#include <utility>

#include "../optim_step_scalars.h"
#include "multi_tensor.cuh"
#include "optim_step.cuh"

namespace {

using namespace fa_multi_tensor;

// ptr[0] = params, ptr[1] = accums, ptr[2..4] = state1..state3 (nullptr when absent).
using StepTable = TensorTable<5>;
static_assert(kFitsKernelParams<5>, "StepTable does not fit kernel params");

constexpr int kFloatsPerPack = 16 / sizeof(float);
using FloatPack = Pack<float, kFloatsPerPack>;

// ------------------------------------------------------------------------------- updates

// The scalars (SgdScalars, AdamScalars) and their rounding from the schema's doubles are
// csrc/optim_step_scalars.h's, shared with the CPU kernels.

// Option flags: bits of the kernels' template argument.
enum SgdFlags : int { kSgdDecay = 1, kSgdMomentum = 2, kSgdFirst = 4, kSgdNesterov = 8 };
constexpr int kSgdFlagCombinations = 16;

constexpr bool has_flag(int flags, int flag) { return (flags & flag) != 0; }

// torch.optim.SGD's update of one element. kFirst: torch's first step, where the buffer is
// a copy of the gradient, so it is written and not read.
template <int kFlags>
struct SgdStep {
  using Scalars = SgdScalars;
  // Which state the pass reads and writes: the buffer, except on the first step (written).
  static constexpr bool kReads1 = has_flag(kFlags, kSgdMomentum) && !has_flag(kFlags, kSgdFirst);
  static constexpr bool kWrites1 = has_flag(kFlags, kSgdMomentum);
  static constexpr bool kUses2 = false;
  static constexpr bool kUses3 = false;

  SgdScalars s;
  float device_factor;  // *factor_tensor, or 1

  __device__ __forceinline__ void operator()(float& p, float a, float& buf, float&,
                                             float&) const {
    // (accum * factor) * factor_tensor, in the reference's order; a factor of 1 is exact.
    float g = a * s.factor * device_factor;
    if constexpr (has_flag(kFlags, kSgdDecay)) g = fmaf(s.weight_decay, p, g);
    if constexpr (has_flag(kFlags, kSgdMomentum)) {
      buf = has_flag(kFlags, kSgdFirst) ? g : fmaf(s.one_minus_dampening, g, buf * s.momentum);
      g = has_flag(kFlags, kSgdNesterov) ? fmaf(s.momentum, buf, g) : buf;
    }
    p = fmaf(s.neg_lr, g, p);
  }
};

enum AdamFlags : int {
  kAdamL2 = 1,
  kAdamDecoupled = 2,
  kAdamSmallWeight = 4,
  kAdamAmsgrad = 8,
};
constexpr int kAdamFlagCombinations = 16;

// torch.optim.Adam's (AdamW's with kDecoupled) update of one element. kSmallWeight:
// |lerp_weight| < 0.5, which picks the form of torch's lerp, start + w * (end - start), over
// end - (end - start) * (1 - w). kAmsgrad: vmax = max(vmax, v), NaN when either is (as
// torch.maximum), and the denominator uses vmax.
template <int kFlags>
struct AdamStep {
  using Scalars = AdamScalars;
  static constexpr bool kReads1 = true;
  static constexpr bool kWrites1 = true;
  static constexpr bool kUses2 = true;
  static constexpr bool kUses3 = has_flag(kFlags, kAdamAmsgrad);

  AdamScalars s;
  float device_factor;

  __device__ __forceinline__ void operator()(float& p, float a, float& m, float& v,
                                             float& vmax) const {
    float g = a * s.factor * device_factor;
    if constexpr (has_flag(kFlags, kAdamDecoupled)) p = p * s.decay;
    if constexpr (has_flag(kFlags, kAdamL2)) g = fmaf(s.weight_decay, p, g);
    const float diff = g - m;
    // 1 - w in fp32, as torch's lerp computes it.
    m = has_flag(kFlags, kAdamSmallWeight) ? fmaf(s.lerp_weight, diff, m)
                                           : fmaf(-diff, 1.0f - s.lerp_weight, g);
    v = fmaf(s.one_minus_beta2, g * g, v * s.beta2);
    if constexpr (kUses3) vmax = (v < vmax || vmax != vmax) ? vmax : v;
    const float denom =
        __fdiv_rn(__fsqrt_rn(kUses3 ? vmax : v), s.bias_correction2_sqrt) + s.eps;
    p = fmaf(s.neg_step_size, __fdiv_rn(m, denom), p);
  }
};

// ------------------------------------------------------------------------------ the pass

// One work item of a window step: Step updates (param, state1, state2, state3) from accum,
// element by element; then accum = 0. State the step neither reads nor writes is not
// touched.
template <typename Step>
struct WindowStepOp {
  static constexpr int kPack = kFloatsPerPack;
  struct Loaded {
    FloatPack p;
    FloatPack a;
    FloatPack s1;
    FloatPack s2;
    FloatPack s3;
  };

  float* param;
  float* accum;
  float* state1;
  float* state2;
  float* state3;
  Step step;

  // Where packed access starts: the first element at which every tensor of this parameter
  // is 16-byte aligned, or -1 when they cannot be aligned together.
  __device__ __forceinline__ int head() const {
    const int h = aligned_head<kPack>(param, sizeof(float), accum, sizeof(float));
    const float* s1 = Step::kWrites1 ? state1 : param;
    const float* s2 = Step::kUses2 ? state2 : s1;
    const float* s3 = Step::kUses3 ? state3 : s2;
    return aligned_head<kPack>(s1, sizeof(float), s2, sizeof(float)) == h &&
                   aligned_head<kPack>(s3, sizeof(float), param, sizeof(float)) == h
               ? h
               : -1;
  }

  __device__ __forceinline__ void scalar(int64_t i) {
    float p = param[i];
    float x1 = Step::kReads1 ? state1[i] : 0.f;
    float x2 = Step::kUses2 ? state2[i] : 0.f;
    float x3 = Step::kUses3 ? state3[i] : 0.f;
    step(p, accum[i], x1, x2, x3);
    param[i] = p;
    accum[i] = 0.f;
    if constexpr (Step::kWrites1) state1[i] = x1;
    if constexpr (Step::kUses2) state2[i] = x2;
    if constexpr (Step::kUses3) state3[i] = x3;
  }

  __device__ __forceinline__ void load(int64_t i, Loaded& v) const {
    load_pack<false>(param + i, v.p);
    load_pack<false>(accum + i, v.a);
    if constexpr (Step::kReads1) load_pack<false>(state1 + i, v.s1);
    if constexpr (Step::kUses2) load_pack<false>(state2 + i, v.s2);
    if constexpr (Step::kUses3) load_pack<false>(state3 + i, v.s3);
  }

  __device__ __forceinline__ void store(int64_t i, const Loaded& v) {
    FloatPack p;
    FloatPack x1;
    FloatPack x2;
    FloatPack x3;
    FloatPack zeros;
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      p.v[j] = v.p.v[j];
      x1.v[j] = Step::kReads1 ? v.s1.v[j] : 0.f;
      x2.v[j] = Step::kUses2 ? v.s2.v[j] : 0.f;
      x3.v[j] = Step::kUses3 ? v.s3.v[j] : 0.f;
      step(p.v[j], v.a.v[j], x1.v[j], x2.v[j], x3.v[j]);
      zeros.v[j] = 0.f;
    }
    store_pack(param + i, p);
    store_pack(accum + i, zeros);
    if constexpr (Step::kWrites1) store_pack(state1 + i, x1);
    if constexpr (Step::kUses2) store_pack(state2 + i, x2);
    if constexpr (Step::kUses3) store_pack(state3 + i, x3);
  }
};

template <typename Step>
__global__ void __launch_bounds__(kThreads)
    window_step_kernel(const __grid_constant__ StepTable table, typename Step::Scalars s,
                       const float* factor_tensor) {
  // Read on the device, so that a device-computed factor (a clip coefficient) costs no sync.
  const Step step{s, factor_tensor != nullptr ? *factor_tensor : 1.f};
  for_each_work_item(table, [&](int t, int32_t w) {
    WindowStepOp<Step> op{static_cast<float*>(table.ptr[0][t]),
                          static_cast<float*>(table.ptr[1][t]),
                          static_cast<float*>(table.ptr[2][t]),
                          static_cast<float*>(table.ptr[3][t]),
                          static_cast<float*>(table.ptr[4][t]), step};
    const ChunkBounds chunk = chunk_bounds(table, t, w);
    run_chunk(op, chunk.begin, chunk.end, op.head());
  });
}

// ---------------------------------------------------------------------------- host side

template <typename Step>
cudaError_t launch_step(const FaWindowStepTensors& tensors, const typename Step::Scalars& s,
                        const float* factor_tensor, cudaStream_t stream) {
  float* const* const lists[5] = {tensors.params, tensors.accums, tensors.state1,
                                  tensors.state2, tensors.state3};
  int32_t item_base = 0;  // no partials here; this only numbers work items
  return for_each_batch(tensors.count, lists, tensors.numels, nullptr, &item_base,
                        [&](const StepTable& table, int32_t items) {
                          if (items == 0) return cudaSuccess;
                          window_step_kernel<Step>
                              <<<grid_for(items), kThreads, 0, stream>>>(table, s,
                                                                         factor_tensor);
                          return cudaGetLastError();
                        });
}

// launch_step<Step<flags>> for run-time option flags: every combination in
// [0, kCombinations) is instantiated, and the one equal to `flags` runs.
template <template <int> class Step, int... kAll>
cudaError_t launch_for_flags(int flags, std::integer_sequence<int, kAll...>,
                             const FaWindowStepTensors& tensors,
                             const typename Step<0>::Scalars& s, const float* factor_tensor,
                             cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  ((flags == kAll ? (err = launch_step<Step<kAll>>(tensors, s, factor_tensor, stream), 0) : 0),
   ...);
  return err;
}

template <template <int> class Step, int kCombinations>
cudaError_t launch_for_flags(int flags, const FaWindowStepTensors& tensors,
                             const typename Step<0>::Scalars& s, const float* factor_tensor,
                             cudaStream_t stream) {
  return launch_for_flags<Step>(flags, std::make_integer_sequence<int, kCombinations>{},
                                tensors, s, factor_tensor, stream);
}

bool has_lists(const FaWindowStepTensors& t, bool state1, bool state2, bool state3) {
  return t.count == 0 || (t.params != nullptr && t.accums != nullptr && t.numels != nullptr &&
                          (!state1 || t.state1 != nullptr) && (!state2 || t.state2 != nullptr) &&
                          (!state3 || t.state3 != nullptr));
}

}  // namespace

cudaError_t fa_sgd_window_step_launch(const FaWindowStepTensors& tensors,
                                      const FaSgdOptions& o, const float* factor_tensor,
                                      cudaStream_t stream) {
  const bool momentum = o.momentum != 0.0;
  if (!has_lists(tensors, momentum, false, false)) return cudaErrorInvalidValue;
  const SgdScalars s = sgd_scalars(static_cast<float>(o.factor), o.maximize, o.lr, o.momentum,
                                   o.dampening, o.weight_decay);
  const int flags = (o.weight_decay != 0.0 ? kSgdDecay : 0) | (momentum ? kSgdMomentum : 0) |
                    (momentum && o.first_step ? kSgdFirst : 0) |
                    (momentum && o.nesterov ? kSgdNesterov : 0);
  return launch_for_flags<SgdStep, kSgdFlagCombinations>(flags, tensors, s, factor_tensor, stream);
}

cudaError_t fa_adam_window_step_launch(const FaWindowStepTensors& tensors,
                                       const FaAdamOptions& o, const float* factor_tensor,
                                       cudaStream_t stream) {
  if (!has_lists(tensors, true, true, o.amsgrad) || o.step < 1) return cudaErrorInvalidValue;
  const AdamScalars s = adam_scalars(static_cast<float>(o.factor), o.maximize, o.lr, o.beta1,
                                     o.beta2, o.eps, o.weight_decay, o.step);
  const bool decay = o.weight_decay != 0.0;
  const int flags = (decay && !o.decoupled_weight_decay ? kAdamL2 : 0) |
                    (decay && o.decoupled_weight_decay ? kAdamDecoupled : 0) |
                    (adam_lerp_weight_is_small(s) ? kAdamSmallWeight : 0) |
                    (o.amsgrad ? kAdamAmsgrad : 0);
  return launch_for_flags<AdamStep, kAdamFlagCombinations>(flags, tensors, s, factor_tensor,
                                                           stream);
}
