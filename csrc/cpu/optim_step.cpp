// CPU kernels of fastaccum::sgd_window_step_ and fastaccum::adam_window_step_: at the last
// micro-batch of a window, the accumulator becomes the gradient (times the normalization,
// clip and unscale factor), the optimizer updates parameter and state, and the accumulator
// is reset, in one pass over accumulator, state and parameter.
//
// As in accumulate.cpp, one at::parallel_for covers every (tensor, chunk) work item of the
// call, and every check runs before any tensor is touched.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../optim_step_checks.h"
#include "multi_tensor.h"

#define FA_KERNELS_HEADER "optim_step_kernels.h"
#include "for_each_target.h"

namespace fastaccum {
namespace {

// Calls f(std::true_type{}) or f(std::false_type{}): turns a run-time flag into a template
// argument, so that each combination of options gets its own branch-free loop.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Up to five fp32 tensors that one work item updates element by element.
struct Pointers {
  float* param;
  float* accum;
  float* state1;  // momentum buffer, or exp_avg
  float* state2;  // exp_avg_sq
  float* state3;  // max_exp_avg_sq (amsgrad)
};

// A tensor list of the call with its schema name, for messages.
using NamedList = std::pair<at::TensorList, const char*>;

// Validates the lists of one call, params first: same lengths and shapes as params, all
// float32, contiguous, on one device, and no tensor passed twice for one parameter.
// Returns the device.
at::Device check_lists(std::initializer_list<NamedList> lists) {
  const at::TensorList params = lists.begin()->first;
  for (const auto& [list, name] : lists) {
    TORCH_CHECK(list.size() == params.size(), name, " must be as long as params, got ",
                list.size(), " and ", params.size());
    for (size_t i = 0; i < list.size(); ++i) {
      TORCH_CHECK(list[i].scalar_type() == at::kFloat, name, "[", i, "] has dtype ",
                  c10::toString(list[i].scalar_type()),
                  "; the fused optimizer steps need float32 parameters, accumulators and "
                  "state");
      TORCH_CHECK(list[i].sizes() == params[i].sizes(), name, "[", i, "] has shape ",
                  list[i].sizes(), " but params[", i, "] has shape ", params[i].sizes());
    }
  }
  for (auto a = lists.begin(); a != lists.end(); ++a) {
    for (auto b = a + 1; b != lists.end(); ++b) {
      for (size_t i = 0; i < params.size(); ++i) {
        TORCH_CHECK(!a->first[i].is_same(b->first[i]), a->second, "[", i, "] and ",
                    b->second, "[", i, "] are the same tensor");
      }
    }
  }
  const at::Device device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  for (const auto& [list, name] : lists) cpu::check_same_device(list, name, device);
  return device;
}

// Runs chunk(pointers of tensor t, begin, count) over every work item of the call; an
// empty state list gives null pointers.
template <typename Chunk>
void for_each_item(at::TensorList params, at::TensorList accums, at::TensorList state1,
                   at::TensorList state2, at::TensorList state3, const Chunk& chunk) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> numels(n);
  std::vector<Pointers> ptrs(n);
  for (int64_t i = 0; i < n; ++i) {
    numels[i] = params[i].numel();
    ptrs[i] = {params[i].data_ptr<float>(), accums[i].data_ptr<float>(),
               state1.empty() ? nullptr : state1[i].data_ptr<float>(),
               state2.empty() ? nullptr : state2[i].data_ptr<float>(),
               state3.empty() ? nullptr : state3[i].data_ptr<float>()};
  }
  const auto items = cpu::split_into_chunks(numels);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const cpu::WorkItem& w = items[k];
      const Pointers& p = ptrs[w.tensor];
      const int64_t b = w.begin;
      chunk(p.param + b, p.accum + b, p.state1 ? p.state1 + b : nullptr,
            p.state2 ? p.state2 + b : nullptr, p.state3 ? p.state3 + b : nullptr, w.end - b);
    }
  });
}

// ---------------------------------------------------------------- sgd_window_step_

using SgdChunkFn = void (*)(float*, float*, float*, int64_t, const SgdScalars&);

template <bool kDecay, bool kMomentum, bool kFirst, bool kNesterov>
SgdChunkFn pick_sgd_target() {
#ifdef FA_HAVE_AVX2_BUILD
  if (cpu::use_avx2()) return &avx2::sgd_window_step_chunk<kDecay, kMomentum, kFirst, kNesterov>;
#endif
  return &baseline::sgd_window_step_chunk<kDecay, kMomentum, kFirst, kNesterov>;
}

SgdChunkFn pick_sgd(bool decay, bool momentum, bool first, bool nesterov) {
  SgdChunkFn fn = nullptr;
  with_flag(decay, [&](auto d) {
    with_flag(momentum, [&](auto m) {
      with_flag(first, [&](auto f) {
        with_flag(nesterov, [&](auto nv) {
          fn = pick_sgd_target<decltype(d)::value, decltype(m)::value, decltype(f)::value,
                               decltype(nv)::value>();
        });
      });
    });
  });
  return fn;
}

void sgd_window_step_cpu(at::TensorList params, at::TensorList accums,
                         at::TensorList momentum_buffers, double factor,
                         const std::optional<at::Tensor>& factor_tensor, double lr,
                         double momentum, double dampening, double weight_decay, bool nesterov,
                         bool maximize, bool first_step) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_sgd_options(factor, lr, momentum, dampening, weight_decay, nesterov,
                    momentum_buffers.size());
  const bool has_momentum = momentum != 0.0;
  const at::Device device =
      has_momentum ? check_lists({{params, "params"},
                                  {accums, "accums"},
                                  {momentum_buffers, "momentum_buffers"}})
                   : check_lists({{params, "params"}, {accums, "accums"}});
  const float f = cpu::times_factor_tensor(factor, factor_tensor, n, device);
  const SgdScalars s = sgd_scalars(f, maximize, lr, momentum, dampening, weight_decay);
  const SgdChunkFn fn = pick_sgd(weight_decay != 0.0, has_momentum, first_step, nesterov);
  for_each_item(params, accums, momentum_buffers, {}, {},
                [&](float* p, float* a, float* b, float*, float*, int64_t count) {
                  fn(p, a, b, count, s);
                });
}

// ---------------------------------------------------------------- adam_window_step_

using AdamChunkFn = void (*)(float*, float*, float*, float*, float*, int64_t,
                             const AdamScalars&);

template <bool kL2, bool kDecoupled, bool kSmallWeight, bool kAmsgrad>
AdamChunkFn pick_adam_target() {
#ifdef FA_HAVE_AVX2_BUILD
  if (cpu::use_avx2()) {
    return &avx2::adam_window_step_chunk<kL2, kDecoupled, kSmallWeight, kAmsgrad>;
  }
#endif
  return &baseline::adam_window_step_chunk<kL2, kDecoupled, kSmallWeight, kAmsgrad>;
}

AdamChunkFn pick_adam(bool l2, bool decoupled, bool small_weight, bool amsgrad) {
  AdamChunkFn fn = nullptr;
  with_flag(l2, [&](auto l) {
    with_flag(decoupled, [&](auto d) {
      with_flag(small_weight, [&](auto w) {
        with_flag(amsgrad, [&](auto a) {
          fn = pick_adam_target<decltype(l)::value, decltype(d)::value, decltype(w)::value,
                                decltype(a)::value>();
        });
      });
    });
  });
  return fn;
}

void adam_window_step_cpu(at::TensorList params, at::TensorList accums, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          double factor,
                          const std::optional<at::Tensor>& factor_tensor, double lr,
                          double beta1, double beta2, double eps, double weight_decay,
                          bool decoupled_weight_decay, bool maximize, int64_t step) {
  const int64_t n = static_cast<int64_t>(params.size());
  check_adam_options(factor, lr, beta1, beta2, eps, weight_decay, step);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const at::Device device = amsgrad ? check_lists({{params, "params"},
                                                   {accums, "accums"},
                                                   {exp_avgs, "exp_avgs"},
                                                   {exp_avg_sqs, "exp_avg_sqs"},
                                                   {max_exp_avg_sqs, "max_exp_avg_sqs"}})
                                    : check_lists({{params, "params"},
                                                   {accums, "accums"},
                                                   {exp_avgs, "exp_avgs"},
                                                   {exp_avg_sqs, "exp_avg_sqs"}});
  const float f = cpu::times_factor_tensor(factor, factor_tensor, n, device);

  const AdamScalars s = adam_scalars(f, maximize, lr, beta1, beta2, eps, weight_decay, step);
  const bool l2 = weight_decay != 0.0 && !decoupled_weight_decay;
  const bool decoupled = weight_decay != 0.0 && decoupled_weight_decay;
  const AdamChunkFn fn = pick_adam(l2, decoupled, adam_lerp_weight_is_small(s), amsgrad);
  for_each_item(params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                [&](float* p, float* a, float* m, float* v, float* vmax, int64_t count) {
                  fn(p, a, m, v, vmax, count, s);
                });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("sgd_window_step_", &sgd_window_step_cpu);
  m.impl("adam_window_step_", &adam_window_step_cpu);
}

}  // namespace fastaccum
