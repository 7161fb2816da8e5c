// CPU kernels of the fused batch-norm ops: fastaccum::bn_stats, bn_apply,
// bn_backward_reduce and bn_backward_apply (semantics: fastaccum/ops/batchnorm.py).
//
// x is (N, C, *spatial) with the channels in dim 1, fp32/bf16/fp16, either contiguous
// (read as planes) or channels-last, any rank (read as rows of C channels); any other
// layout is copied to contiguous first. Outputs keep x's layout. Per-channel tensors of
// any floating dtype are read as fp32; statistics are fp32 (or float64 when asked) and
// gradient sums fp32.
//
// The work is cut into items that depend on the shapes alone (batchnorm_kernels.h), and
// per-channel partial results are merged in item order, so results do not depend on the
// number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define FA_KERNELS_HEADER "batchnorm_kernels.h"
#include "for_each_target.h"

namespace fastaccum {
namespace {

using cpu::BnArgs;
using cpu::BnItem;
using cpu::BnStorage;

#ifdef FA_HAVE_AVX2_BUILD
#define FA_BN_KERNEL(name) (cpu::use_avx2() ? &avx2::name : &baseline::name)
#else
#define FA_BN_KERNEL(name) (&baseline::name)
#endif

// At most this many row items per call: a rows item's partial statistics are C values, so
// the merge and its memory stay small next to the data even when C is large.
constexpr int64_t kMaxRowItems = 128;

// ---------------------------------------------------------------- layout and checks

// Dense with the channels innermost: dims ordered (0, 2, ..., d-1, 1) from outer to inner,
// as torch.channels_last / channels_last_3d lay out 4-D / 5-D tensors. Size-1 dims may
// have any stride, as in Tensor.is_contiguous.
bool is_channels_last_like(const at::Tensor& x) {
  int64_t expected = 1;
  auto fits = [&](int64_t d) {
    if (x.size(d) == 1) return true;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  if (!fits(1)) return false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (!fits(d)) return false;
  }
  return fits(0);
}

// x itself when the kernels can read it (contiguous or channels-last), else a contiguous copy.
at::Tensor in_kernel_layout(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last_like(x)) return x;
  return x.contiguous();
}

struct Geometry {
  int64_t N, C, S;
  bool planar;
};

Geometry geometry_of(const at::Tensor& x) {  // x in a kernel layout
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C > 0 ? x.numel() / (N * C) : 0;
  // A contiguous tensor with one position per plane is also rows of C channels.
  return {N, C, S, x.is_contiguous() && S > 1};
}

// t (same shape as x) in x's layout, copied only when it is not already.
at::Tensor in_layout_of(const at::Tensor& t, const Geometry& g) {
  if (g.planar) return t.contiguous();
  if (is_channels_last_like(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// An uninitialized tensor shaped and laid out like x (x in a kernel layout).
at::Tensor empty_in_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return at::empty(x.sizes(), x.options());
  std::vector<int64_t> sizes{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  sizes.push_back(x.size(1));
  return at::empty(sizes, x.options()).movedim(-1, 1);
}

BnStorage storage_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return BnStorage::kFloat;
    case at::kBFloat16: return BnStorage::kBFloat16;
    case at::kHalf: return BnStorage::kHalf;
    default:
      TORCH_CHECK(false, name, " has dtype ", c10::toString(x.scalar_type()),
                  "; expected one of float32, bfloat16, float16");
  }
  return BnStorage::kFloat;
}

// Checks x (or grad_y against x) and returns C.
int64_t check_input(const at::Tensor& x) {
  storage_of(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have shape (N, C) or (N, C, *spatial), got ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "x has no channels (shape ", x.sizes(), "); expected C >= 1");
  return x.size(1);
}

void check_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y has shape ", grad_y.sizes(),
              " but x has shape ", x.sizes(), "; they must match");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y has dtype ",
              c10::toString(grad_y.scalar_type()), " but x has dtype ",
              c10::toString(x.scalar_type()), "; they must match");
  TORCH_CHECK(grad_y.device() == x.device(), "grad_y is on ", grad_y.device(), " but x is on ",
              x.device());
}

void check_count(int64_t count, const at::Tensor& x) {
  TORCH_CHECK(count > 0, "x has no elements per channel (shape ", x.sizes(),
              "); batch statistics need at least one");
}

// A per-channel tensor as C contiguous fp32 values.
at::Tensor channel_values(const at::Tensor& t, const char* name, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, name, " must have shape (", C,
              ",), one value per channel of x (shape ", x.sizes(), "), got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got dtype ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ",
              x.device());
  return t.to(at::kFloat).contiguous();
}

at::Tensor optional_channel_values(const std::optional<at::Tensor>& t, const char* name,
                                   const at::Tensor& x, float fill) {
  if (t.has_value()) return channel_values(*t, name, x);
  return at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
}

// ---------------------------------------------------------------- work items

std::vector<BnItem> split_items(const Geometry& g) {
  std::vector<BnItem> items;
  const int64_t chunk = cpu::kChunk;
  if (g.planar) {
    // Items run along one channel: (c, planes n0..n1) or, for planes longer than a chunk,
    // (c, one plane, positions s0..s1). Ordered by channel, then by plane.
    for (int64_t c = 0; c < g.C; ++c) {
      if (g.S >= chunk) {
        for (int64_t n = 0; n < g.N; ++n) {
          for (int64_t s = 0; s < g.S; s += chunk) {
            items.push_back({c, n, n + 1, s, std::min(s + chunk, g.S)});
          }
        }
      } else {
        const int64_t planes = chunk / g.S;
        for (int64_t n = 0; n < g.N; n += planes) {
          items.push_back({c, n, std::min(n + planes, g.N), 0, g.S});
        }
      }
    }
    return items;
  }
  const int64_t M = g.N * g.S;
  const int64_t rows = std::max((chunk + g.C - 1) / g.C, (M + kMaxRowItems - 1) / kMaxRowItems);
  for (int64_t m = 0; m < M; m += rows) items.push_back({0, m, std::min(m + rows, M), 0, 0});
  return items;
}

BnArgs base_args(const at::Tensor& x, const Geometry& g, bool relu) {
  BnArgs a{};
  a.dtype = storage_of(x, "x");
  a.planar = g.planar;
  a.relu = relu;
  a.C = g.C;
  a.S = g.S;
  return a;
}

template <typename Fn>
void for_each_item(const std::vector<BnItem>& items, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(items[i]);
  });
}

// The sample each channel's statistics are taken relative to: x[0, c, 0, ...].
at::Tensor first_sample(const at::Tensor& x) {
  at::Tensor first = x.select(0, 0);
  while (first.dim() > 1) first = first.select(1, 0);
  return first.to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in,
                                                std::optional<at::ScalarType> dtype) {
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kDouble,
              "dtype (of the statistics) must be float32 or float64, got ",
              c10::toString(out_type));
  const int64_t C = check_input(x_in);
  const at::Tensor x = in_kernel_layout(x_in);
  check_count(x.numel() / C, x);
  const Geometry g = geometry_of(x);
  const auto items = split_items(g);
  const at::Tensor shift = first_sample(x);
  BnArgs a = base_args(x, g, false);
  a.shift = shift.data_ptr<float>();

  const int64_t per_item = g.planar ? 3 : 3 * C;
  std::vector<double> partial(items.size() * per_item);
  const void* xp = x.data_ptr();
  const auto kernel = FA_BN_KERNEL(bn_stats_item);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(g.planar ? 0 : 3 * C);
    for (int64_t i = lo; i < hi; ++i) {
      kernel(xp, a, items[i], scratch.data(), partial.data() + i * per_item);
    }
  });

  std::vector<baseline::Moments> total(C);
  for (size_t i = 0; i < items.size(); ++i) {  // in item order: deterministic
    const double* p = partial.data() + i * per_item;
    if (g.planar) {
      total[items[i].c].merge(p[0], p[1], p[2]);
    } else {
      for (int64_t c = 0; c < C; ++c) total[c].merge(p[3 * c], p[3 * c + 1], p[3 * c + 2]);
    }
  }
  // The moments are double here. A float64 mean keeps the digits that a large mean has
  // beyond fp32's 24 bits: rounded to fp32 (an error of up to 5e-4 at 1e4), it enters the
  // mean differences of a later Chan merge of micro-batches (AccumBatchNorm) as an error
  // of that size.
  at::Tensor mean = at::empty({C}, x.options().dtype(out_type));
  at::Tensor m2 = at::empty({C}, x.options().dtype(out_type));
  auto write = [&](auto* mean_out, auto* m2_out) {
    using T = std::remove_pointer_t<decltype(mean_out)>;
    for (int64_t c = 0; c < C; ++c) {
      mean_out[c] = static_cast<T>(static_cast<double>(a.shift[c]) + total[c].mean);
      m2_out[c] = static_cast<T>(total[c].m2);
    }
  };
  if (out_type == at::kDouble) {
    write(mean.data_ptr<double>(), m2.data_ptr<double>());
  } else {
    write(mean.data_ptr<float>(), m2.data_ptr<float>());
  }
  return {mean, m2};
}

at::Tensor bn_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, bool relu) {
  check_input(x_in);
  const at::Tensor mean_f = channel_values(mean, "mean", x_in);
  const at::Tensor mul = channel_values(invstd, "invstd", x_in) *
                         optional_channel_values(weight, "weight", x_in, 1.0f);
  const at::Tensor add = optional_channel_values(bias, "bias", x_in, 0.0f);
  const at::Tensor x = in_kernel_layout(x_in);
  at::Tensor y = empty_in_layout(x);
  if (x.numel() == 0) return y;
  const Geometry g = geometry_of(x);
  BnArgs a = base_args(x, g, relu);
  a.mean = mean_f.data_ptr<float>();
  a.mul = mul.data_ptr<float>();
  a.add = add.data_ptr<float>();
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  const auto kernel = FA_BN_KERNEL(bn_apply_item);
  for_each_item(split_items(g), [&](const BnItem& it) { kernel(xp, yp, a, it); });
  return y;
}

// What both backward ops share: checked inputs in one layout and the per-channel constants.
struct Backward {
  at::Tensor x, dy, mean, invstd, mul, add;
  Geometry g;
  BnArgs a;
};

Backward prepare_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                          const at::Tensor& mean, const at::Tensor& invstd,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, bool relu) {
  const int64_t C = check_input(x_in);
  check_grad(grad_y, x_in);
  check_count(x_in.numel() / C, x_in);
  Backward b;
  b.mean = channel_values(mean, "mean", x_in);
  b.invstd = channel_values(invstd, "invstd", x_in);
  b.mul = b.invstd * optional_channel_values(weight, "weight", x_in, 1.0f);
  b.add = optional_channel_values(bias, "bias", x_in, 0.0f);
  b.x = in_kernel_layout(x_in);
  b.g = geometry_of(b.x);
  b.dy = in_layout_of(grad_y, b.g);
  b.a = base_args(b.x, b.g, relu);
  b.a.mean = b.mean.data_ptr<float>();
  b.a.mul = b.mul.data_ptr<float>();
  b.a.add = b.add.data_ptr<float>();
  return b;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool relu) {
  const Backward b = prepare_backward(grad_y, x, mean, invstd, weight, bias, relu);
  const int64_t C = b.g.C;
  const auto items = split_items(b.g);
  const int64_t per_item = b.g.planar ? 2 : 2 * C;
  std::vector<double> partial(items.size() * per_item, 0.0);
  const void* gp = b.dy.data_ptr();
  const void* xp = b.x.data_ptr();
  const auto kernel = FA_BN_KERNEL(bn_grad_sums_item);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(b.g.planar ? 0 : 2 * C);
    for (int64_t i = lo; i < hi; ++i) {
      kernel(gp, xp, b.a, items[i], scratch.data(), partial.data() + i * per_item);
    }
  });

  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  for (size_t i = 0; i < items.size(); ++i) {  // in item order: deterministic
    const double* p = partial.data() + i * per_item;
    if (b.g.planar) {
      sum_dy[items[i].c] += p[0];
      sum_dy_xmu[items[i].c] += p[1];
    } else {
      for (int64_t c = 0; c < C; ++c) {
        sum_dy[c] += p[c];
        sum_dy_xmu[c] += p[C + c];
      }
    }
  }
  auto opts = b.x.options().dtype(at::kFloat);
  at::Tensor out_dy = at::empty({C}, opts), out_dy_xhat = at::empty({C}, opts);
  float* o1 = out_dy.data_ptr<float>();
  float* o2 = out_dy_xhat.data_ptr<float>();
  const float* inv = b.invstd.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    o1[c] = static_cast<float>(sum_dy[c]);
    o2[c] = static_cast<float>(sum_dy_xmu[c] * inv[c]);
  }
  return {out_dy, out_dy_xhat};
}

at::Tensor bn_backward_apply_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                 int64_t count, bool relu) {
  Backward b = prepare_backward(grad_y, x, mean, invstd, weight, bias, relu);
  TORCH_CHECK(count > 0, "count must be >= 1 (elements per channel), got ", count);
  const double inv_count = 1.0 / static_cast<double>(count);
  const at::Tensor mean_dy = channel_values(sum_dy, "sum_dy", x) * inv_count;
  const at::Tensor k = channel_values(sum_dy_xhat, "sum_dy_xhat", x) * b.invstd * inv_count;
  b.a.mean_dy = mean_dy.data_ptr<float>();
  b.a.k = k.data_ptr<float>();
  at::Tensor gx = empty_in_layout(b.x);
  const void* gp = b.dy.data_ptr();
  const void* xp = b.x.data_ptr();
  void* op = gx.data_ptr();
  const auto kernel = FA_BN_KERNEL(bn_grad_input_item);
  for_each_item(split_items(b.g), [&](const BnItem& it) { kernel(gp, xp, op, b.a, it); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
}

}  // namespace fastaccum
