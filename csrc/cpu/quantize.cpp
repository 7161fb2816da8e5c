// CPU kernels of fastaccum::quantize_groups and fastaccum::dequantize_groups.
//
// One at::parallel_for over groups; each group is read once into an fp32 scratch buffer
// (min/max pass), then coded and packed from that buffer. The rounding offsets depend only
// on (seed, element index), so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define FA_KERNELS_HEADER "quantize_kernels.h"
#include "for_each_target.h"

namespace fastaccum {
namespace {

using cpu::use_avx2;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_format(int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be one of 2, 4, 8, got ", bits);
  TORCH_CHECK(group_size >= 32 && group_size <= 4096 && (group_size & (group_size - 1)) == 0,
              "group_size must be a power of two from 32 to 4096, got ", group_size);
}

// Groups per parallel task: enough elements to amortize scheduling.
int64_t grain(int64_t group_size) { return std::max<int64_t>(1, (int64_t{1} << 15) / group_size); }

// ---------------------------------------------------------------- quantize_groups

using QuantizeFn = void (*)(const void*, int64_t, int64_t, uint64_t, uint64_t, bool, uint8_t*,
                            float*, float*, float*, uint8_t*);

template <int BITS, typename T>
void run_quantize(const void* x, int64_t n, int64_t group_size, uint64_t seed, uint64_t first,
                  bool stochastic, uint8_t* out, float* scale, float* minimum, float* work,
                  uint8_t* codes) {
#ifdef FA_HAVE_AVX2_BUILD
  if (use_avx2()) {
    using AT = std::conditional_t<std::is_same_v<T, baseline::Bf16Bits>, avx2::Bf16Bits, T>;
    avx2::quant::quantize_group<BITS, AT>(static_cast<const AT*>(x) + first, n, group_size, seed,
                                          first, stochastic, out, scale, minimum, work, codes);
    return;
  }
#endif
  baseline::quant::quantize_group<BITS, T>(static_cast<const T*>(x) + first, n, group_size, seed,
                                           first, stochastic, out, scale, minimum, work, codes);
}

template <int BITS>
QuantizeFn pick_quantize_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &run_quantize<BITS, float>;
    case at::kBFloat16: return &run_quantize<BITS, baseline::Bf16Bits>;
    case at::kHalf: return &run_quantize<BITS, _Float16>;
    default: return nullptr;
  }
}

QuantizeFn pick_quantize(int64_t bits, at::ScalarType t) {
  switch (bits) {
    case 2: return pick_quantize_dtype<2>(t);
    case 4: return pick_quantize_dtype<4>(t);
    default: return pick_quantize_dtype<8>(t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_groups_cpu(const at::Tensor& x,
                                                                   int64_t bits,
                                                                   int64_t group_size,
                                                                   int64_t seed,
                                                                   bool stochastic) {
  check_format(bits, group_size);
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x has dtype ", c10::toString(x.scalar_type()),
              "; expected one of float32, bfloat16, float16");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous (it is read flat, in memory order); "
              "call .contiguous() first");
  TORCH_CHECK(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  const int64_t n = x.numel();
  const int64_t groups = (n + group_size - 1) / group_size;
  const int64_t group_bytes = group_size * bits / 8;
  auto opts = x.options();
  at::Tensor packed = at::empty({groups * group_bytes}, opts.dtype(at::kByte));
  at::Tensor scale = at::empty({groups}, opts.dtype(at::kFloat));
  at::Tensor minimum = at::empty({groups}, opts.dtype(at::kFloat));
  const QuantizeFn fn = pick_quantize(bits, x.scalar_type());
  const void* src = x.data_ptr();
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* scale_out = scale.data_ptr<float>();
  float* min_out = minimum.data_ptr<float>();
  at::parallel_for(0, groups, grain(group_size), [&](int64_t lo, int64_t hi) {
    std::vector<float> work(group_size);
    std::vector<uint8_t> codes(group_size);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t first = g * group_size;
      fn(src, std::min(group_size, n - first), group_size, static_cast<uint64_t>(seed),
         static_cast<uint64_t>(first), stochastic, out + g * group_bytes, scale_out + g,
         min_out + g, work.data(), codes.data());
    }
  });
  return {packed, scale, minimum};
}

// ---------------------------------------------------------------- dequantize_groups

using DequantizeFn = void (*)(const uint8_t*, int64_t, float, float, float*, void*, int64_t);

template <int BITS, typename T>
void run_dequantize(const uint8_t* in, int64_t n, float scale, float minimum, float* work,
                    void* out, int64_t first) {
#ifdef FA_HAVE_AVX2_BUILD
  if (use_avx2()) {
    using AT = std::conditional_t<std::is_same_v<T, baseline::Bf16Bits>, avx2::Bf16Bits, T>;
    avx2::quant::dequantize_group<BITS, AT>(in, n, scale, minimum, work,
                                            static_cast<AT*>(out) + first);
    return;
  }
#endif
  baseline::quant::dequantize_group<BITS, T>(in, n, scale, minimum, work,
                                             static_cast<T*>(out) + first);
}

template <int BITS>
DequantizeFn pick_dequantize_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &run_dequantize<BITS, float>;
    case at::kBFloat16: return &run_dequantize<BITS, baseline::Bf16Bits>;
    case at::kHalf: return &run_dequantize<BITS, _Float16>;
    default: return nullptr;
  }
}

DequantizeFn pick_dequantize(int64_t bits, at::ScalarType t) {
  switch (bits) {
    case 2: return pick_dequantize_dtype<2>(t);
    case 4: return pick_dequantize_dtype<4>(t);
    default: return pick_dequantize_dtype<8>(t);
  }
}

at::Tensor dequantize_groups_cpu(const at::Tensor& packed, const at::Tensor& scale,
                                 const at::Tensor& minimum, int64_t bits, int64_t group_size,
                                 int64_t numel, at::ScalarType dtype) {
  check_format(bits, group_size);
  TORCH_CHECK(is_float_dtype(dtype), "dtype must be one of float32, bfloat16, float16, got ",
              c10::toString(dtype));
  TORCH_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
  const int64_t groups = (numel + group_size - 1) / group_size;
  const int64_t group_bytes = group_size * bits / 8;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.numel() == groups * group_bytes,
              "packed must be a 1-D uint8 tensor of ", groups * group_bytes, " bytes for ", numel,
              " values at ", bits, " bits in groups of ", group_size, ", got ",
              c10::toString(packed.scalar_type()), " of shape ", packed.sizes());
  for (const at::Tensor* t : {&scale, &minimum}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->numel() == groups,
                t == &scale ? "scale" : "minimum", " must be a 1-D float32 tensor of ", groups,
                " groups, got ", c10::toString(t->scalar_type()), " of shape ", t->sizes());
    TORCH_CHECK(t->device() == packed.device(), "scale, minimum and packed must be on one device");
  }
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && minimum.is_contiguous(),
              "packed, scale and minimum must be contiguous");
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const DequantizeFn fn = pick_dequantize(bits, dtype);
  const uint8_t* in = packed.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const float* m = minimum.data_ptr<float>();
  void* dst = out.data_ptr();
  at::parallel_for(0, groups, grain(group_size), [&](int64_t lo, int64_t hi) {
    std::vector<float> work(group_size);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t first = g * group_size;
      fn(in + g * group_bytes, std::min(group_size, numel - first), s[g], m[g], work.data(), dst,
         first);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaccum, CPU, m) {
  m.impl("quantize_groups", &quantize_groups_cpu);
  m.impl("dequantize_groups", &dequantize_groups_cpu);
}

}  // namespace fastaccum
