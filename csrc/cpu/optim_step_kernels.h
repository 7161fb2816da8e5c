// Loops of the CPU sgd_window_step_/adam_window_step_ kernels, in plain C++ with no torch
// headers (fp32 parameters, accumulators and state).
//
// optim_step.cpp includes this file twice, once for the baseline x86-64 target and once
// under `#pragma GCC target("avx2,fma,f16c")`, and picks one at run time. Each element is
// read once and written once: g = accum * factor, the update of torch.optim's
// single-tensor code path (torch/optim/sgd.py, adam.py) in fp32 with the same operations
// in the same order, then accum = 0. The options are template flags, so that each loop
// the compiler vectorizes has no branch in its body. In the AVX2 build GCC may fuse a
// multiply and an add into one fma (one rounding instead of two), as torch's own
// vectorized kernels do for `add(..., alpha=)`: results agree with torch.optim to about
// an ulp per operation, not bit for bit.
//
// This header has no include guard on purpose (see accumulate_kernels.h); the scalar
// structs come from csrc/optim_step_scalars.h, which has one. The including file provides
// <cmath>, <cstdint> and FA_KERNEL_NS.

// The scalar structs, shared by both expansions and by the CUDA kernels.
#include "../optim_step_scalars.h"

namespace FA_KERNEL_NS {

// One chunk of SGD: kDecay (weight_decay != 0), kMomentum (momentum != 0), kFirst (the
// momentum buffer starts as g, as torch's first step clones the gradient), kNesterov.
// `buf` is unused (may be null) without kMomentum.
template <bool kDecay, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_window_step_chunk(float* __restrict param, float* __restrict accum,
                           float* __restrict buf, int64_t n, const SgdScalars& s) {
  const float factor = s.factor, wd = s.weight_decay, mom = s.momentum;
  const float damp = s.one_minus_dampening, neg_lr = s.neg_lr;
  for (int64_t i = 0; i < n; ++i) {
    const float p = param[i];
    float g = accum[i] * factor;
    if (kDecay) g = g + wd * p;
    if (kMomentum) {
      const float b = kFirst ? g : buf[i] * mom + damp * g;
      buf[i] = b;
      g = kNesterov ? g + mom * b : b;
    }
    param[i] = p + neg_lr * g;
    accum[i] = 0.0f;
  }
}

// One chunk of Adam: kL2 (Adam's weight decay), kDecoupled (AdamW's), kSmallWeight
// (|1 - beta1| < 0.5, which picks the form of torch's lerp: start + w * (end - start),
// else end - (end - start) * (1 - w)), kAmsgrad (the denominator uses the running maximum
// of exp_avg_sq, kept in max_exp_avg_sq; unused, may be null, without it).
template <bool kL2, bool kDecoupled, bool kSmallWeight, bool kAmsgrad>
void adam_window_step_chunk(float* __restrict param, float* __restrict accum,
                            float* __restrict exp_avg, float* __restrict exp_avg_sq,
                            float* __restrict max_exp_avg_sq, int64_t n, const AdamScalars& s) {
  const float factor = s.factor, wd = s.weight_decay, decay = s.decay;
  const float w = s.lerp_weight, one_minus_w = 1.0f - s.lerp_weight;
  const float beta2 = s.beta2, one_minus_beta2 = s.one_minus_beta2;
  const float bc2_sqrt = s.bias_correction2_sqrt, eps = s.eps, neg_step = s.neg_step_size;
  for (int64_t i = 0; i < n; ++i) {
    float p = param[i];
    float g = accum[i] * factor;
    if (kDecoupled) p = p * decay;
    if (kL2) g = g + wd * p;
    const float m0 = exp_avg[i];
    const float m = kSmallWeight ? m0 + w * (g - m0) : g - (g - m0) * one_minus_w;
    const float v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
    float v_used = v;
    if (kAmsgrad) {
      // torch.maximum: NaN when either side is NaN (std::fmax would drop it).
      const float v0 = max_exp_avg_sq[i];
      v_used = ((v < v0) | (v0 != v0)) ? v0 : v;
      max_exp_avg_sq[i] = v_used;
    }
    // Vectorized only without errno semantics (setup.py: -fno-math-errno); v >= 0 or NaN.
    const float denom = std::sqrt(v_used) / bc2_sqrt + eps;
    param[i] = p + neg_step * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    accum[i] = 0.0f;
  }
}

}  // namespace FA_KERNEL_NS
