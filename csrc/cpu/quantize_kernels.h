// Loops of the CPU quantize_groups/dequantize_groups kernels, in plain C++ with no torch
// headers. Format and math: fastaccum/ops/quantize.py (the reference these match bit for
// bit).
//
// quantize.cpp includes this file twice, for the baseline x86-64 target and under
// `#pragma GCC target("avx2,fma,f16c")`, and picks one at run time. The storage types and
// their fp32 conversions (Bf16Bits, to_f32, from_f32) come from accumulate_kernels.h,
// expanded into the same namespace; everything defined here lives in the nested namespace
// `quant`.
//
// Bit-exactness with the reference needs each float operation rounded on its own. GCC may
// fuse a multiply and a following add into one fma (as in (x - mn) * inv + u), so each
// product goes through a scratch array and the add runs in a separate loop: a value read
// back from memory is never fused.
//
// No include guard on purpose: expanded once per target namespace. The including file
// provides <cstdint>, <cstring>, <cmath> and FA_KERNEL_NS.

#include "accumulate_kernels.h"

namespace FA_KERNEL_NS {
namespace quant {

// The reference's 32-bit hash (xor-shift-multiply rounds); uint32 arithmetic wraps.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-group part of the rounding offsets; constant over a group because a group (a power
// of two of at most 4096 elements, aligned to its size) never crosses a 2**32 boundary.
inline uint32_t stream_key(uint64_t seed, uint64_t first_index) {
  const uint32_t hi = static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(first_index >> 32);
  return mix32(static_cast<uint32_t>(seed) ^ mix32(hi + 0x9E3779B9u));
}

// min, max and "holds a NaN or +-Inf" of x[0..n), each element also written to work[] in
// fp32 for the second pass.
template <typename T>
inline void group_range(const T* __restrict x, int64_t n, float* __restrict work, float& mn,
                        float& mx, bool& bad) {
  float lo[LANES], hi[LANES];
  uint32_t nonfinite = 0;
  const float first = to_f32(x[0]);
  for (int64_t l = 0; l < LANES; ++l) lo[l] = hi[l] = first;
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int64_t l = 0; l < LANES; ++l) {
      const float v = to_f32(x[i + l]);
      work[i + l] = v;
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
      // NaN compares false, so "not |v| < inf" catches NaN and +-Inf with one comparison.
      nonfinite |= static_cast<uint32_t>(!(std::fabs(v) < INFINITY));
    }
  }
  for (; i < n; ++i) {
    const float v = to_f32(x[i]);
    work[i] = v;
    lo[0] = v < lo[0] ? v : lo[0];
    hi[0] = v > hi[0] ? v : hi[0];
    nonfinite |= static_cast<uint32_t>(!(std::fabs(v) < INFINITY));
  }
  mn = lo[0];
  mx = hi[0];
  for (int64_t l = 1; l < LANES; ++l) {
    mn = lo[l] < mn ? lo[l] : mn;
    mx = hi[l] > mx ? hi[l] : mx;
  }
  bad = nonfinite != 0;
}

// Codes of one group into out[0 .. group_size * BITS / 8), scale and minimum into *scale
// and *minimum. x holds n <= group_size elements; first_index is the flat index of x[0].
// work (group_size floats) and codes (group_size bytes) are scratch.
template <int BITS, typename T>
void quantize_group(const T* __restrict x, int64_t n, int64_t group_size, uint64_t seed,
                    uint64_t first_index, bool stochastic, uint8_t* __restrict out,
                    float* __restrict scale, float* __restrict minimum, float* __restrict work,
                    uint8_t* __restrict codes) {
  constexpr int kPerByte = 8 / BITS;
  constexpr int32_t kLevels = (1 << BITS) - 1;
  const float levels = static_cast<float>(kLevels);
  float mn, mx;
  bool bad;
  group_range(x, n, work, mn, mx, bad);
  const float range = mx - mn;
  if (bad || !(std::fabs(range) < INFINITY)) {
    std::memset(out, 0, static_cast<size_t>(group_size / kPerByte));
    *scale = NAN;
    *minimum = NAN;
    return;
  }
  *scale = range / levels;
  *minimum = mn;
  float inv = levels / range;
  if (!(inv < INFINITY)) inv = 0.0f;  // a constant group: every code is 0
  for (int64_t i = 0; i < n; ++i) work[i] = (work[i] - mn) * inv;
  if (stochastic) {
    const uint32_t key = stream_key(seed, first_index);
    const uint32_t lo = static_cast<uint32_t>(first_index);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t h = mix32((lo + static_cast<uint32_t>(i)) ^ key);
      const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f;
      // work[i] + u >= 0 (x >= mn), so truncation is floor.
      const int32_t q = static_cast<int32_t>(work[i] + u);
      codes[i] = static_cast<uint8_t>(q < kLevels ? q : kLevels);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const int32_t q = static_cast<int32_t>(work[i] + 0.5f);
      codes[i] = static_cast<uint8_t>(q < kLevels ? q : kLevels);
    }
  }
  for (int64_t i = n; i < group_size; ++i) codes[i] = 0;
  for (int64_t b = 0; b < group_size / kPerByte; ++b) {
    uint32_t byte = 0;
    for (int k = 0; k < kPerByte; ++k) byte |= static_cast<uint32_t>(codes[b * kPerByte + k]) << (k * BITS);
    out[b] = static_cast<uint8_t>(byte);
  }
}

// out[0..n) = minimum + code * scale for the codes of one group; work (n floats) is scratch.
template <int BITS, typename T>
void dequantize_group(const uint8_t* __restrict in, int64_t n, float scale, float minimum,
                      float* __restrict work, T* __restrict out) {
  constexpr int kPerByte = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t byte = in[i / kPerByte];
    const uint32_t q = (byte >> ((i % kPerByte) * BITS)) & kMask;
    work[i] = static_cast<float>(static_cast<int32_t>(q)) * scale;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = from_f32<T>(minimum + work[i]);
}

}  // namespace quant
}  // namespace FA_KERNEL_NS
