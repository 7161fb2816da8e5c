// Torch side of the CUDA accumulate_/finalize_ kernels (csrc/cuda/accumulate.cu): argument
// checks, grouping of the pairs by dtype, launch on the current stream of the tensors'
// device, and the CUDA registration of the schemas declared in csrc/ops.cpp.
//
// Built only against CUDA torch (setup.py). The checks mirror check_accumulate_args /
// check_finalize_args in fastaccum/ops/accumulate.py, so that calling torch.ops.fastaccum
// directly fails as clearly as the Python wrapper, and all of them run before anything is
// modified.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "accumulate.cuh"
#include "binding_checks.h"

namespace fastaccum {
namespace {

using namespace binding;

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

FaDtype fa_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return FaDtype::kBFloat16;
    case at::kHalf: return FaDtype::kFloat16;
    default: return FaDtype::kFloat32;  // callers have checked is_kernel_dtype
  }
}

// Host-side arrays of one dtype group, kept alive until the launcher has read them.
struct GroupArrays {
  at::ScalarType first_dtype;
  at::ScalarType second_dtype;
  std::vector<void*> firsts;
  std::vector<void*> seconds;
  std::vector<int64_t> numels;
  std::vector<int64_t> slots;
};

// The group of (first, second) dtypes in `groups`, created on first use. At most a few
// groups exist, so a linear search is the simplest fast option.
GroupArrays& group_for(std::vector<GroupArrays>& groups, at::ScalarType first,
                       at::ScalarType second) {
  for (GroupArrays& g : groups) {
    if (g.first_dtype == first && g.second_dtype == second) return g;
  }
  groups.push_back(GroupArrays{first, second, {}, {}, {}, {}});
  return groups.back();
}

void check_accumulate_args(at::TensorList accums, at::TensorList grads, double scale) {
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(accums.size() == grads.size(),
              "accums and grads must have the same length, got ", accums.size(), " and ",
              grads.size());
  for (size_t i = 0; i < accums.size(); ++i) {
    const at::Tensor& a = accums[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(is_kernel_dtype(g.scalar_type()), "grads[", i, "] has dtype ",
                dtype_name(g.scalar_type()), "; expected one of float32, bfloat16, float16");
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == g.scalar_type(),
                "accums[", i, "] has dtype ", dtype_name(a.scalar_type()),
                "; expected float32 or the gradient's dtype (", dtype_name(g.scalar_type()),
                ")");
    TORCH_CHECK(a.sizes() == g.sizes(), "accums[", i, "] has shape ", a.sizes(),
                " but grads[", i, "] has shape ", g.sizes(),
                "; each accumulator must match its gradient");
    TORCH_CHECK(!a.is_same(g), "accums[", i, "] and grads[", i, "] are the same tensor");
  }
  check_one_cuda_device({{"accums", accums}, {"grads", grads}});
  check_contiguous({"accums", accums});
  check_contiguous({"grads", grads});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> accumulate_cuda(
    at::TensorList accums, at::TensorList grads, double scale, bool zero_grads) {
  check_accumulate_args(accums, grads, scale);
  const int64_t n = static_cast<int64_t>(accums.size());
  // An empty call has no tensor to take a device from: use the current CUDA device.
  const at::Device device = n > 0 ? accums[0].device()
                                  : at::Device(at::kCUDA, c10::cuda::current_device());
  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = at::TensorOptions().device(device).dtype(at::kFloat);
  at::Tensor grad_sumsq = at::empty({}, f32);
  at::Tensor per_tensor = at::empty({n}, f32);
  at::Tensor accum_sumsq = at::empty({}, f32);
  at::Tensor found_nonfinite = at::empty({}, f32.dtype(at::kBool));

  // One kernel instantiation per (grad dtype, accum dtype); slots keep the caller's order.
  std::vector<GroupArrays> arrays;
  for (int64_t i = 0; i < n; ++i) {
    GroupArrays& g = group_for(arrays, grads[i].scalar_type(), accums[i].scalar_type());
    g.firsts.push_back(grads[i].mutable_data_ptr());
    g.seconds.push_back(accums[i].mutable_data_ptr());
    g.numels.push_back(grads[i].numel());
    g.slots.push_back(i);
  }
  std::vector<FaAccumulateGroup> groups;
  for (const GroupArrays& g : arrays) {
    groups.push_back(FaAccumulateGroup{fa_dtype(g.first_dtype), fa_dtype(g.second_dtype),
                                       static_cast<int64_t>(g.firsts.size()), g.firsts.data(),
                                       g.seconds.data(), g.numels.data(), g.slots.data()});
  }
  const int num_groups = static_cast<int>(groups.size());
  const int64_t ws_floats = fa_accumulate_workspace_floats(groups.data(), num_groups, n);
  TORCH_CHECK(ws_floats >= 0, "accumulate_: too many elements in one call (over 2^31 ",
              "chunks); split the tensor lists across several calls");
  // Uninitialized on purpose: every slot is written before it is read.
  at::Tensor workspace = at::empty({ws_floats}, f32);

  const FaAccumulateOutputs out{grad_sumsq.mutable_data_ptr<float>(),
                                per_tensor.mutable_data_ptr<float>(),
                                accum_sumsq.mutable_data_ptr<float>(),
                                found_nonfinite.mutable_data_ptr<bool>(),
                                workspace.mutable_data_ptr<float>()};
  check_launch(fa_accumulate_launch(groups.data(), num_groups, n, static_cast<float>(scale),
                                    zero_grads, out, c10::cuda::getCurrentCUDAStream().stream()),
               "accumulate_");
  return {grad_sumsq, per_tensor, accum_sumsq, found_nonfinite};
}

void check_finalize_args(at::TensorList accums, at::TensorList outs, double factor,
                         const std::optional<at::Tensor>& factor_tensor) {
  TORCH_CHECK(std::isfinite(factor), "factor must be finite, got ", factor);
  TORCH_CHECK(outs.empty() || outs.size() == accums.size(),
              "outs must be empty or as long as accums, got ", outs.size(), " and ",
              accums.size());
  for (size_t i = 0; i < accums.size(); ++i) {
    const at::ScalarType a = accums[i].scalar_type();
    TORCH_CHECK(is_kernel_dtype(a), "accums[", i, "] has dtype ", dtype_name(a),
                "; expected one of float32, bfloat16, float16");
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& o = outs[i];
    TORCH_CHECK(is_kernel_dtype(o.scalar_type()), "outs[", i, "] has dtype ",
                dtype_name(o.scalar_type()), "; expected one of float32, bfloat16, float16");
    TORCH_CHECK(o.sizes() == accums[i].sizes(), "outs[", i, "] has shape ", o.sizes(),
                " but accums[", i, "] has shape ", accums[i].sizes());
    TORCH_CHECK(!o.is_same(accums[i]), "outs[", i, "] and accums[", i,
                "] are the same tensor");
  }
  check_factor_tensor(factor_tensor);
  // factor_tensor joins the device check only when there are accumulators, as in Python.
  const bool check_ft = factor_tensor.has_value() && !accums.empty();
  check_one_cuda_device({{"accums", accums},
                         {"outs", outs},
                         {"factor_tensor", check_ft ? at::TensorList(*factor_tensor)
                                                    : at::TensorList()}});
  check_contiguous({"accums", accums});
  check_contiguous({"outs", outs});
}

void finalize_cuda(at::TensorList accums, at::TensorList outs, double factor,
                   const std::optional<at::Tensor>& factor_tensor, bool zero_accums) {
  check_finalize_args(accums, outs, factor, factor_tensor);
  if (accums.empty()) return;
  const c10::cuda::CUDAGuard guard(accums[0].device());
  // The kernels read one fp32 on the device, so a device-computed factor costs no sync.
  // .to() is a no-op for fp32 and otherwise a conversion ordered on the current stream.
  std::optional<at::Tensor> ft32;
  if (factor_tensor.has_value()) ft32 = factor_tensor->to(at::kFloat);

  const bool has_outs = !outs.empty();
  std::vector<GroupArrays> arrays;
  for (size_t i = 0; i < accums.size(); ++i) {
    const at::ScalarType out_dtype = has_outs ? outs[i].scalar_type() : at::kFloat;
    GroupArrays& g = group_for(arrays, accums[i].scalar_type(), out_dtype);
    g.firsts.push_back(accums[i].mutable_data_ptr());
    if (has_outs) g.seconds.push_back(outs[i].mutable_data_ptr());
    g.numels.push_back(accums[i].numel());
  }
  std::vector<FaFinalizeGroup> groups;
  for (const GroupArrays& g : arrays) {
    groups.push_back(FaFinalizeGroup{fa_dtype(g.first_dtype), fa_dtype(g.second_dtype),
                                     static_cast<int64_t>(g.firsts.size()), g.firsts.data(),
                                     has_outs ? g.seconds.data() : nullptr, g.numels.data()});
  }
  check_launch(fa_finalize_launch(groups.data(), static_cast<int>(groups.size()),
                                  static_cast<float>(factor),
                                  ft32.has_value() ? ft32->const_data_ptr<float>() : nullptr,
                                  zero_accums, c10::cuda::getCurrentCUDAStream().stream()),
               "finalize_");
}

}  // namespace
}  // namespace fastaccum

TORCH_LIBRARY_IMPL(fastaccum, CUDA, m) {
  m.impl("accumulate_", &fastaccum::accumulate_cuda);
  m.impl("finalize_", &fastaccum::finalize_cuda);
}
