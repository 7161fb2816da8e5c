// CPU kernels of fastaccum::accumulate_, fastaccum::finalize_ and fastaccum::sumsq.
//
// Work is split into (tensor, chunk) items so that one at::parallel_for covers every
// tensor of the call, big or small. Each item's partial sums land in its own slot and are
// reduced in item order afterwards, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "multi_tensor.h"

#define FA_KERNELS_HEADER "accumulate_kernels.h"
#include "for_each_target.h"

namespace fastaccum {
namespace {

using cpu::check_same_device;
using cpu::split_into_chunks;
using cpu::use_avx2;
using cpu::WorkItem;

bool is_grad_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

// ---------------------------------------------------------------- accumulate_

template <typename G, typename A>
baseline::ChunkStats run_accumulate(void* accum, void* grad, int64_t begin, int64_t n,
                                    float scale, bool zero_grad) {
#ifdef FA_HAVE_AVX2_BUILD
  if (use_avx2()) {
    using AG = std::conditional_t<std::is_same_v<G, baseline::Bf16Bits>, avx2::Bf16Bits, G>;
    using AA = std::conditional_t<std::is_same_v<A, baseline::Bf16Bits>, avx2::Bf16Bits, A>;
    auto s = avx2::accumulate_chunk<AG, AA>(static_cast<AA*>(accum) + begin,
                                            static_cast<AG*>(grad) + begin, n, scale,
                                            zero_grad);
    return {s.grad_sumsq, s.accum_sumsq, s.nonfinite};
  }
#endif
  return baseline::accumulate_chunk<G, A>(static_cast<A*>(accum) + begin,
                                          static_cast<G*>(grad) + begin, n, scale, zero_grad);
}

using AccumulateFn = baseline::ChunkStats (*)(void*, void*, int64_t, int64_t, float, bool);

AccumulateFn pick_accumulate(at::ScalarType grad, at::ScalarType accum) {
  using baseline::Bf16Bits;
  if (accum == at::kFloat) {
    switch (grad) {
      case at::kFloat: return &run_accumulate<float, float>;
      case at::kBFloat16: return &run_accumulate<Bf16Bits, float>;
      case at::kHalf: return &run_accumulate<_Float16, float>;
      default: break;
    }
  } else if (accum == grad) {
    if (grad == at::kBFloat16) return &run_accumulate<Bf16Bits, Bf16Bits>;
    if (grad == at::kHalf) return &run_accumulate<_Float16, _Float16>;
  }
  return nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> accumulate_cpu(
    at::TensorList accums, at::TensorList grads, double scale, bool zero_grads) {
  // Every check runs before any tensor is touched, so a rejected call changes nothing.
  TORCH_CHECK(accums.size() == grads.size(),
              "accums and grads must have the same length, got ", accums.size(), " and ",
              grads.size());
  const int64_t n = static_cast<int64_t>(accums.size());
  std::vector<AccumulateFn> fns(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    const auto g = grads[i].scalar_type();
    const auto a = accums[i].scalar_type();
    TORCH_CHECK(is_grad_dtype(g), "grads[", i, "] has dtype ", dtype_name(g),
                "; expected one of float32, bfloat16, float16");
    fns[i] = pick_accumulate(g, a);
    TORCH_CHECK(fns[i] != nullptr, "accums[", i, "] has dtype ", dtype_name(a),
                "; expected float32 or the gradient's dtype (", dtype_name(g), ")");
    TORCH_CHECK(accums[i].sizes() == grads[i].sizes(), "accums[", i, "] has shape ",
                accums[i].sizes(), " but grads[", i, "] has shape ", grads[i].sizes(),
                "; each accumulator must match its gradient");
    TORCH_CHECK(!accums[i].is_same(grads[i]), "accums[", i, "] and grads[", i,
                "] are the same tensor");
    numels[i] = accums[i].numel();
  }
  const at::Device device = n > 0 ? accums[0].device() : at::Device(at::kCPU);
  check_same_device(accums, "accums", device);
  check_same_device(grads, "grads", device);

  const auto items = split_into_chunks(numels);
  std::vector<baseline::ChunkStats> partial(items.size());
  std::vector<void*> accum_ptrs(n), grad_ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    accum_ptrs[i] = accums[i].data_ptr();
    grad_ptrs[i] = grads[i].data_ptr();
  }
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const WorkItem& w = items[k];
      partial[k] = fns[w.tensor](accum_ptrs[w.tensor], grad_ptrs[w.tensor], w.begin,
                                 w.end - w.begin, scale_f, zero_grads);
    }
  });

  auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor per_tensor = at::zeros({n}, opts);
  std::vector<double> per(n, 0.0);
  double grad_total = 0.0, accum_total = 0.0;
  bool nonfinite = false;
  for (size_t k = 0; k < items.size(); ++k) {
    per[items[k].tensor] += partial[k].grad_sumsq;
    accum_total += partial[k].accum_sumsq;
    nonfinite = nonfinite || partial[k].nonfinite;
  }
  float* per_out = per_tensor.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    per_out[i] = static_cast<float>(per[i]);
    grad_total += per[i];
  }
  return {at::scalar_tensor(grad_total, opts), per_tensor, at::scalar_tensor(accum_total, opts),
          at::scalar_tensor(nonfinite, opts.dtype(at::kBool))};
}

// ---------------------------------------------------------------- finalize_

template <typename A, typename O>
void run_finalize(void* accum, void* out, int64_t begin, int64_t n, float factor, bool zero) {
#ifdef FA_HAVE_AVX2_BUILD
  if (use_avx2()) {
    using AA = std::conditional_t<std::is_same_v<A, baseline::Bf16Bits>, avx2::Bf16Bits, A>;
    using AO = std::conditional_t<std::is_same_v<O, baseline::Bf16Bits>, avx2::Bf16Bits, O>;
    avx2::finalize_chunk<AA, AO>(static_cast<AA*>(accum) + begin,
                                 out ? static_cast<AO*>(out) + begin : nullptr, n, factor,
                                 zero);
    return;
  }
#endif
  baseline::finalize_chunk<A, O>(static_cast<A*>(accum) + begin,
                                 out ? static_cast<O*>(out) + begin : nullptr, n, factor, zero);
}

using FinalizeFn = void (*)(void*, void*, int64_t, int64_t, float, bool);

template <typename A>
FinalizeFn pick_finalize_out(at::ScalarType out) {
  switch (out) {
    case at::kFloat: return &run_finalize<A, float>;
    case at::kBFloat16: return &run_finalize<A, baseline::Bf16Bits>;
    case at::kHalf: return &run_finalize<A, _Float16>;
    default: return nullptr;
  }
}

FinalizeFn pick_finalize(at::ScalarType accum, at::ScalarType out) {
  switch (accum) {
    case at::kFloat: return pick_finalize_out<float>(out);
    case at::kBFloat16: return pick_finalize_out<baseline::Bf16Bits>(out);
    case at::kHalf: return pick_finalize_out<_Float16>(out);
    default: return nullptr;
  }
}

void finalize_cpu(at::TensorList accums, at::TensorList outs, double factor,
                  const std::optional<at::Tensor>& factor_tensor, bool zero_accums) {
  const int64_t n = static_cast<int64_t>(accums.size());
  const bool has_outs = !outs.empty();
  TORCH_CHECK(!has_outs || static_cast<int64_t>(outs.size()) == n,
              "outs must be empty or as long as accums, got ", outs.size(), " and ", n);
  std::vector<FinalizeFn> fns(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    const auto a = accums[i].scalar_type();
    TORCH_CHECK(is_grad_dtype(a), "accums[", i, "] has dtype ", dtype_name(a),
                "; expected one of float32, bfloat16, float16");
    const auto o = has_outs ? outs[i].scalar_type() : at::kFloat;
    TORCH_CHECK(is_grad_dtype(o), "outs[", i, "] has dtype ", dtype_name(o),
                "; expected one of float32, bfloat16, float16");
    if (has_outs) {
      TORCH_CHECK(outs[i].sizes() == accums[i].sizes(), "outs[", i, "] has shape ",
                  outs[i].sizes(), " but accums[", i, "] has shape ", accums[i].sizes());
      TORCH_CHECK(!outs[i].is_same(accums[i]), "outs[", i, "] and accums[", i,
                  "] are the same tensor");
    }
    fns[i] = pick_finalize(a, o);
    numels[i] = accums[i].numel();
  }
  const at::Device device = n > 0 ? accums[0].device() : at::Device(at::kCPU);
  check_same_device(accums, "accums", device);
  check_same_device(outs, "outs", device);
  const float f = cpu::times_factor_tensor(factor, factor_tensor, n, device);

  const auto items = split_into_chunks(numels);
  std::vector<void*> accum_ptrs(n), out_ptrs(n, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    accum_ptrs[i] = accums[i].data_ptr();
    if (has_outs) out_ptrs[i] = outs[i].data_ptr();
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const WorkItem& w = items[k];
      fns[w.tensor](accum_ptrs[w.tensor], out_ptrs[w.tensor], w.begin, w.end - w.begin, f,
                    zero_accums);
    }
  });
}

// ---------------------------------------------------------------- sumsq

template <typename T>
double run_sumsq(const void* x, int64_t begin, int64_t n) {
#ifdef FA_HAVE_AVX2_BUILD
  if (use_avx2()) {
    using AT = std::conditional_t<std::is_same_v<T, baseline::Bf16Bits>, avx2::Bf16Bits, T>;
    return avx2::sumsq_chunk<AT>(static_cast<const AT*>(x) + begin, n);
  }
#endif
  return baseline::sumsq_chunk<T>(static_cast<const T*>(x) + begin, n);
}

using SumsqFn = double (*)(const void*, int64_t, int64_t);

at::Tensor sumsq_cpu(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<SumsqFn> fns(n);
  std::vector<int64_t> numels(n);
  for (int64_t i = 0; i < n; ++i) {
    const auto t = tensors[i].scalar_type();
    switch (t) {
      case at::kFloat: fns[i] = &run_sumsq<float>; break;
      case at::kBFloat16: fns[i] = &run_sumsq<baseline::Bf16Bits>; break;
      case at::kHalf: fns[i] = &run_sumsq<_Float16>; break;
      default:
        TORCH_CHECK(false, "tensors[", i, "] has dtype ", dtype_name(t),
                    "; expected one of float32, bfloat16, float16");
    }
    numels[i] = tensors[i].numel();
  }
  const at::Device device = n > 0 ? tensors[0].device() : at::Device(at::kCPU);
  check_same_device(tensors, "tensors", device);
  const auto items = split_into_chunks(numels);
  std::vector<double> partial(items.size(), 0.0);
  std::vector<const void*> ptrs(n);
  for (int64_t i = 0; i < n; ++i) ptrs[i] = tensors[i].const_data_ptr();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const WorkItem& w = items[k];
      partial[k] = fns[w.tensor](ptrs[w.tensor], w.begin, w.end - w.begin);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;  // item order: the same for any thread count
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat).device(device));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("accumulate_", &accumulate_cpu);
  m.impl("finalize_", &finalize_cpu);
  m.impl("sumsq", &sumsq_cpu);
}

}  // namespace fastaccum
