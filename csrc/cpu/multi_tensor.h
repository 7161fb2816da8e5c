// What every multi-tensor CPU kernel of fastaccum shares: the split of a call's tensors
// into (tensor, chunk) work items for one at::parallel_for, the run-time choice of the
// AVX2 build of a kernel, and the checks every op runs before it touches memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The kernels' loops are also compiled under `#pragma GCC target("avx2,fma,f16c")`.
#define FA_HAVE_AVX2_BUILD 1
#endif

namespace fastaccum {
namespace cpu {

// Elements per work item: big enough to amortize scheduling, small enough to balance
// a 124M-parameter set across threads.
constexpr int64_t kChunk = 1 << 16;

// True when this CPU runs the AVX2/FMA/F16C build of the loops.
inline bool use_avx2() {
#ifdef FA_HAVE_AVX2_BUILD
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Work items of kChunk elements at most, tensor by tensor, in order.
inline std::vector<WorkItem> split_into_chunks(const std::vector<int64_t>& numels) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      items.push_back({t, b, std::min(b + kChunk, numels[t])});
    }
  }
  return items;
}

// Every tensor of `tensors` on `device` and contiguous; `name` is the list's schema name.
inline void check_same_device(at::TensorList tensors, const char* name,
                              const at::Device& device) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device,
                "all tensors of one call must be on one device: expected ", device, " but ",
                name, "[", i, "] is on ", tensors[i].device());
    TORCH_CHECK(tensors[i].is_contiguous(), name, "[", i,
                "] is not contiguous; the kernels update memory in place and need "
                "contiguous tensors");
  }
}

// factor x factor_tensor as one fp32 multiplier. factor_tensor (optional) must be a
// one-element floating-point tensor on `device` (checked only when the call has tensors,
// n > 0); on the CPU reading it costs no device sync.
inline float times_factor_tensor(double factor, const std::optional<at::Tensor>& factor_tensor,
                                 int64_t n, const at::Device& device) {
  float f = static_cast<float>(factor);
  if (factor_tensor.has_value()) {
    const at::Tensor& ft = *factor_tensor;
    TORCH_CHECK(ft.numel() == 1 && ft.is_floating_point(),
                "factor_tensor must be a floating-point tensor with one element, got shape ",
                ft.sizes(), " and dtype ", c10::toString(ft.scalar_type()));
    TORCH_CHECK(n == 0 || ft.device() == device, "factor_tensor is on ", ft.device(),
                " but the accumulators are on ", device);
    f *= ft.item<float>();
  }
  return f;
}

}  // namespace cpu
}  // namespace fastaccum
