// Checks shared by the torch sides of the CUDA kernels (csrc/cuda/*_binding.cpp): the
// messages match the Python wrappers' (fastaccum/ops/*.py), so that calling torch.ops.fastaccum
// directly fails as clearly, and each binding runs them before it modifies anything.
//
// Built only against CUDA torch, as the bindings. Inline functions, so that every binding
// shares one definition and a binding that does not use one gets no warning.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <optional>
#include <string>

namespace fastaccum {
namespace binding {

// The dtype as Python spells it, for error messages.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A list of tensors with the name it has in the op's schema, for messages.
struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Every tensor of the call on one CUDA device.
inline void check_one_cuda_device(c10::ArrayRef<NamedList> lists) {
  std::optional<at::Device> device;
  std::string first;
  for (const NamedList& list : lists) {
    for (size_t i = 0; i < list.tensors.size(); ++i) {
      const at::Tensor& t = list.tensors[i];
      if (!device.has_value()) {
        device = t.device();
        first = std::string(list.name) + "[" + std::to_string(i) + "]";
      } else {
        TORCH_CHECK(t.device() == *device,
                    "all tensors of one call must be on one device: ", first, " is on ",
                    *device, " but ", list.name, "[", i, "] is on ", t.device(),
                    "; group tensors by device and call once per device");
      }
    }
  }
  TORCH_CHECK(!device.has_value() || device->is_cuda(),
              "fastaccum's CUDA kernels need CUDA tensors, got tensors on ", *device);
}

inline void check_contiguous(const NamedList& list) {
  for (size_t i = 0; i < list.tensors.size(); ++i) {
    const at::Tensor& t = list.tensors[i];
    TORCH_CHECK(t.is_contiguous(), list.name, "[", i, "] is not contiguous (shape ",
                t.sizes(), ", stride ", t.strides(),
                "); the kernels update memory in place and need contiguous tensors");
  }
}

// factor_tensor, when given, is one floating-point element (its device is checked with the
// call's tensors).
inline void check_factor_tensor(const std::optional<at::Tensor>& factor_tensor) {
  if (!factor_tensor.has_value()) return;
  const at::Tensor& ft = *factor_tensor;
  TORCH_CHECK(ft.numel() == 1 && ft.is_floating_point(),
              "factor_tensor must be a floating-point tensor with one element, got shape ",
              ft.sizes(), " and dtype ", dtype_name(ft.scalar_type()));
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastaccum::", op, " CUDA kernel launch failed: ",
              cudaGetErrorString(err), " (", static_cast<int>(err), ")");
}

}  // namespace binding
}  // namespace fastaccum
