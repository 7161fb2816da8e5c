// fastaccum._C: the one place where every op schema is declared.
//
// Backends register implementations elsewhere:
//   csrc/cpu/*.cpp                TORCH_LIBRARY_IMPL(fastaccum, CPU, m)
//   csrc/cuda/*_binding.cpp       TORCH_LIBRARY_IMPL(fastaccum, CUDA, m)
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
