// Torch side of the CUDA sgd_window_step_/adam_window_step_ kernels (csrc/cuda/optim_step.cu):
// argument checks, launch on the current stream of the tensors' device, and the CUDA
// registration of the schemas declared in csrc/ops.cpp.
//
// Built only against CUDA torch (setup.py). The checks mirror check_sgd_window_step_args /
// check_adam_window_step_args in fastaccum/ops/optim_step.py and the CPU op
// (csrc/cpu/optim_step.cpp), so that calling torch.ops.fastaccum directly fails as clearly
// as the Python wrapper, and all of them run before anything is modified.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "../optim_step_checks.h"
#include "binding_checks.h"
#include "optim_step.cuh"

namespace fastaccum {
namespace {

using namespace binding;

// The tensor lists of one call, params first: every list as long as params, float32, of
// params' shapes, contiguous, no tensor given twice for one parameter, and everything on one
// CUDA device (factor_tensor too when the call has tensors, as in Python).
void check_lists(const std::vector<NamedList>& lists,
                 const std::optional<at::Tensor>& factor_tensor) {
  const at::TensorList params = lists.front().tensors;
  for (const NamedList& list : lists) {
    TORCH_CHECK(list.tensors.size() == params.size(), list.name,
                " must be as long as params, got ", list.tensors.size(), " and ", params.size());
    for (size_t i = 0; i < list.tensors.size(); ++i) {
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK(t.scalar_type() == at::kFloat, list.name, "[", i, "] has dtype ",
                  dtype_name(t.scalar_type()),
                  "; the fused optimizer steps need float32 parameters, accumulators and state "
                  "(use fastaccum.wrap for other dtypes)");
      TORCH_CHECK(t.sizes() == params[i].sizes(), list.name, "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has shape ", params[i].sizes());
    }
  }
  for (size_t a = 0; a < lists.size(); ++a) {
    for (size_t b = a + 1; b < lists.size(); ++b) {
      for (size_t i = 0; i < params.size(); ++i) {
        TORCH_CHECK(!lists[a].tensors[i].is_same(lists[b].tensors[i]), lists[a].name, "[", i,
                    "] and ", lists[b].name, "[", i, "] are the same tensor");
      }
    }
  }
  check_factor_tensor(factor_tensor);
  std::vector<NamedList> on_device = lists;
  if (factor_tensor.has_value() && !params.empty()) {
    on_device.push_back({"factor_tensor", at::TensorList(*factor_tensor)});
  }
  check_one_cuda_device(on_device);
  for (const NamedList& list : lists) check_contiguous(list);
}

// What a launcher needs from checked, non-empty lists: the host pointer arrays (kept alive
// until the launcher has read them, which it does before returning), factor_tensor as one
// fp32 on the device, and a guard that makes the tensors' device current.
class LaunchArgs {
 public:
  LaunchArgs(at::TensorList params, at::TensorList accums, at::TensorList state1,
             at::TensorList state2, at::TensorList state3,
             const std::optional<at::Tensor>& factor_tensor)
      : guard_(params[0].device()),
        params_(pointers(params)),
        accums_(pointers(accums)),
        state1_(pointers(state1)),
        state2_(pointers(state2)),
        state3_(pointers(state3)) {
    for (const at::Tensor& p : params) numels_.push_back(p.numel());
    // The kernels read one fp32 on the device, so a device-computed factor costs no sync.
    // .to() is a no-op for fp32 and otherwise a conversion ordered on the current stream.
    if (factor_tensor.has_value()) factor_tensor_ = factor_tensor->to(at::kFloat);
  }

  FaWindowStepTensors tensors() const {
    return {static_cast<int64_t>(numels_.size()), params_.data(), accums_.data(),
            state1_.empty() ? nullptr : state1_.data(),
            state2_.empty() ? nullptr : state2_.data(),
            state3_.empty() ? nullptr : state3_.data(), numels_.data()};
  }

  const float* factor_tensor() const {
    return factor_tensor_.has_value() ? factor_tensor_->const_data_ptr<float>() : nullptr;
  }

  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  static std::vector<float*> pointers(at::TensorList tensors) {
    std::vector<float*> out;
    out.reserve(tensors.size());
    for (const at::Tensor& t : tensors) out.push_back(t.mutable_data_ptr<float>());
    return out;
  }

  c10::cuda::CUDAGuard guard_;
  std::vector<float*> params_;
  std::vector<float*> accums_;
  std::vector<float*> state1_;
  std::vector<float*> state2_;
  std::vector<float*> state3_;
  std::vector<int64_t> numels_;
  std::optional<at::Tensor> factor_tensor_;
};

void sgd_window_step_cuda(at::TensorList params, at::TensorList accums,
                          at::TensorList momentum_buffers, double factor,
                          const std::optional<at::Tensor>& factor_tensor, double lr,
                          double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize, bool first_step) {
  check_sgd_options(factor, lr, momentum, dampening, weight_decay, nesterov,
                    momentum_buffers.size());
  const bool has_momentum = momentum != 0.0;
  std::vector<NamedList> lists{{"params", params}, {"accums", accums}};
  if (has_momentum) lists.push_back({"momentum_buffers", momentum_buffers});
  check_lists(lists, factor_tensor);
  if (params.empty()) return;

  const LaunchArgs args(params, accums, momentum_buffers, {}, {}, factor_tensor);
  const FaSgdOptions options{factor, lr, momentum, dampening, weight_decay,
                             nesterov, maximize, first_step};
  check_launch(fa_sgd_window_step_launch(args.tensors(), options, args.factor_tensor(),
                                         args.stream()),
               "sgd_window_step_");
}

void adam_window_step_cuda(at::TensorList params, at::TensorList accums,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, double factor,
                           const std::optional<at::Tensor>& factor_tensor, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool decoupled_weight_decay, bool maximize, int64_t step) {
  check_adam_options(factor, lr, beta1, beta2, eps, weight_decay, step);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  std::vector<NamedList> lists{{"params", params},
                               {"accums", accums},
                               {"exp_avgs", exp_avgs},
                               {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) lists.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  check_lists(lists, factor_tensor);
  if (params.empty()) return;

  const LaunchArgs args(params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, factor_tensor);
  const FaAdamOptions options{factor, lr, beta1, beta2, eps, weight_decay,
                              decoupled_weight_decay, maximize, step, amsgrad};
  check_launch(fa_adam_window_step_launch(args.tensors(), options, args.factor_tensor(),
                                          args.stream()),
               "adam_window_step_");
}

}  // namespace
}  // namespace fastaccum

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) {
  m.impl("sgd_window_step_", &fastaccum::sgd_window_step_cuda);
  m.impl("adam_window_step_", &fastaccum::adam_window_step_cuda);
}
