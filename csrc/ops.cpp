// fastaccum._C: the one place where every op schema is declared.
//
// Backends register implementations elsewhere:
//   csrc/cpu/*.cpp                TORCH_LIBRARY_IMPL(fastaccum, CPU, m)
//   csrc/cuda/*_binding.cpp       TORCH_LIBRARY_IMPL(fastaccum, CUDA, m)
//   csrc/autograd/*.cpp           TORCH_LIBRARY_IMPL(fastaccum, Autograd, m): C++ autograd
//   fastaccum/ops/*.py            fake (meta) kernels via torch.library.register_fake
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastaccum, m) {
  // accums[i] += scale * grads[i], in one pass over each gradient, which also
  // yields the sum of squares of the gradients (in total and per tensor), the sum
  // of squares of the updated accumulators and a non-finite flag. With zero_grads
  // the gradients are zeroed after they are read.
  // Returns (grad_sumsq: f32[], grad_sumsq_per_tensor: f32[N],
  //          accum_sumsq: f32[], found_nonfinite: bool[]).
  m.def(
      "accumulate_(Tensor(a!)[] accums, Tensor(b!)[] grads, float scale, "
      "bool zero_grads=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // r = accums[i] * factor * factor_tensor (factor_tensor: optional f32 scalar on
  // the accumulators' device, so that device-side clip coefficients need no sync).
  // outs[i] = r cast to outs[i].dtype when outs is not empty; then
  // accums[i] = 0 if zero_accums else r. One pass over each accumulator.
  m.def(
      "finalize_(Tensor(a!)[] accums, Tensor(b!)[] outs, float factor, "
      "Tensor? factor_tensor=None, bool zero_accums=True) -> ()");
  // Sum of squares of every element of every tensor (float32/bf16/fp16, contiguous, one
  // device), accumulated in double and returned as an f32 scalar like accumulate_'s
  // accum_sumsq: the window norm of accumulators no accumulate_ call measured.
  m.def("sumsq(Tensor[] tensors) -> Tensor");
  // The window boundary of the fused optimizers (fastaccum.optim.SGD/Adam/AdamW), in one
  // pass over each accumulator, state tensor and parameter (all float32):
  //   g = accums[i] * factor * factor_tensor (negated when maximize), then torch.optim's
  //   update of params[i] and its state with gradient g, then accums[i] = 0.
  // SGD: momentum_buffers is empty when momentum == 0; first_step sets the buffer to the
  // (weight-decayed) gradient, as torch does when a parameter has no buffer yet.
  m.def(
      "sgd_window_step_(Tensor(a!)[] params, Tensor(b!)[] accums, "
      "Tensor(c!)[] momentum_buffers, float factor, Tensor? factor_tensor, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
  // Adam / AdamW (decoupled_weight_decay); step is the step count after its increment,
  // for the bias corrections. max_exp_avg_sqs: empty, or amsgrad's running maxima of
  // exp_avg_sqs (the denominator then uses the maximum).
  m.def(
      "adam_window_step_(Tensor(a!)[] params, Tensor(b!)[] accums, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, float factor, "
      "Tensor? factor_tensor, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool maximize, int step) -> ()");
  // F.linear(input, weight, bias) whose backward, while control[0] != 0, adds
  // control[0] * grad_out^T @ input into weight_accum (fp32, one GEMM with beta = 1) and
  // control[0] * grad_out.sum(0) into bias_accum instead of returning weight and bias
  // gradients, and counts the call in control[1] and control[2 + slot] (control: float64
  // CPU tensor owned by the optimizer wrapper). With control[0] == 0 it is nn.Linear.
  // Implemented as a C++ autograd function (csrc/autograd/wgrad.cpp).
  m.def(
      "linear_wgrad(Tensor input, Tensor weight, Tensor? bias, Tensor weight_accum, "
      "Tensor? bias_accum, Tensor control, int slot) -> Tensor");
  // F.embedding(indices, weight, padding_idx) (padding_idx < 0: none) whose backward, while
  // control[0] != 0, adds control[0] * grad_out[i] into row indices[i] of weight_accum
  // (index_add_, the padding row skipped) instead of returning a dense weight gradient,
  // counted as for linear_wgrad. Same file.
  m.def(
      "embedding_wgrad(Tensor indices, Tensor weight, int padding_idx, Tensor weight_accum, "
      "Tensor control, int slot) -> Tensor");
  // Fused batch normalization over dim 1 (the channels) of x: (N, C) or (N, C, *spatial),
  // fp32/bf16/fp16, contiguous or channels-last (outputs keep x's layout). Per-channel
  // tensors have shape (C,) and are read as fp32; every statistic is fp32 unless asked.
  // bn_stats: per-channel mean and M2 (sum of squared deviations from the mean), in dtype
  // (float32 when None, or float64).
  m.def("bn_stats(Tensor x, ScalarType? dtype=None) -> (Tensor mean, Tensor m2)");
  // y = act((x - mean) * invstd * weight + bias), act = ReLU when relu; weight/bias None
  // mean 1/0.
  m.def(
      "bn_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "bool relu) -> Tensor");
  // sum_dy = sum(g), sum_dy_xhat = sum(g * (x - mean) * invstd) per channel, where g is
  // grad_y masked by the ReLU of bn_apply(x, ...) when relu.
  m.def(
      "bn_backward_reduce(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xhat)");
  // The input gradient of training-mode batch norm (through the batch statistics):
  // weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count).
  m.def(
      "bn_backward_apply(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xhat, int count, "
      "bool relu) -> Tensor");
  // Per-group min/max quantization of x (float32/bf16/fp16, contiguous, read flat) to
  // `bits`-bit codes (2, 4 or 8), group_size (a power of two, 32..4096) elements per group,
  // with seeded stochastic rounding (stochastic) or round-to-nearest. Returns
  // (packed: uint8[G * group_size * bits / 8], scale: f32[G], minimum: f32[G]),
  // G = ceil(numel / group_size). Format: fastaccum/ops/quantize.py.
  m.def(
      "quantize_groups(Tensor x, int bits, int group_size, int seed, bool stochastic) -> "
      "(Tensor packed, Tensor scale, Tensor minimum)");
  // minimum + code * scale per element: a flat tensor of numel values of dtype.
  m.def(
      "dequantize_groups(Tensor packed, Tensor scale, Tensor minimum, int bits, "
      "int group_size, int numel, ScalarType dtype) -> Tensor");
}

namespace fastaccum {
// FASTACCUM_WITH_CUDA is defined by setup.py when csrc/cuda/ is compiled in.
bool cuda_built() {
#ifdef FASTACCUM_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace fastaccum

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fastaccum native ops; use them through torch.ops.fastaccum or fastaccum.ops";
  module.def("cuda_built", &fastaccum::cuda_built,
             "True when the CUDA kernels were compiled into this build.");
}
