// The fp32 scalars of sgd_window_step_/adam_window_step_, shared by the CPU kernels
// (csrc/cpu/optim_step_kernels.h) and the CUDA kernels (csrc/cuda/optim_step.cu).
//
// torch.optim computes these scalars in Python, in double, and its kernels then take each
// as an fp32; so does this code, so that every native backend rounds them the same way.
// Plain C++ with no torch headers: nvcc compiles it on any machine.
#pragma once

#include <cmath>
#include <cstdint>

// Scalars of one SGD call.
struct SgdScalars {
  float factor;               // normalization x clip x unscale; negated for maximize
  float weight_decay;         // g += weight_decay * param
  float momentum;             // buf = momentum * buf + (1 - dampening) * g
  float one_minus_dampening;  // float(1 - dampening)
  float neg_lr;               // param += -lr * g
};

// Scalars of one Adam/AdamW call at step t (t counted after its increment).
struct AdamScalars {
  float factor;                 // as SgdScalars::factor
  float weight_decay;           // Adam (L2): g += weight_decay * param
  float decay;                  // AdamW: param *= float(1 - lr * weight_decay)
  float lerp_weight;            // exp_avg = lerp(exp_avg, g, float(1 - beta1))
  float beta2;                  // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
  float one_minus_beta2;        // float(1 - beta2)
  float bias_correction2_sqrt;  // sqrt(1 - beta2**t)
  float eps;                    // denom = sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
  float neg_step_size;          // param += -lr / (1 - beta1**t) * exp_avg / denom
};

// `factor` is the fp32 gradient multiplier (factor x factor_tensor where that is read on the
// host); maximize negates it, which negates the gradient exactly.
inline SgdScalars sgd_scalars(float factor, bool maximize, double lr, double momentum,
                              double dampening, double weight_decay) {
  return {maximize ? -factor : factor, static_cast<float>(weight_decay),
          static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
          static_cast<float>(-lr)};
}

inline AdamScalars adam_scalars(float factor, bool maximize, double lr, double beta1,
                                double beta2, double eps, double weight_decay, int64_t step) {
  const double t = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(beta1, t);
  const double bias_correction2 = 1.0 - std::pow(beta2, t);
  return {maximize ? -factor : factor,
          static_cast<float>(weight_decay),
          static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(std::pow(bias_correction2, 0.5)),
          static_cast<float>(eps),
          static_cast<float>(-(lr / bias_correction1))};
}

// torch's lerp(start, end, w) is start + w * (end - start) for |w| < 0.5, else
// end - (end - start) * (1 - w); true when Adam's exp_avg update takes the first form.
inline bool adam_lerp_weight_is_small(const AdamScalars& s) {
  return std::fabs(s.lerp_weight) < 0.5f;
}
