// Loops of the CPU quantize_groups/dequantize_groups kernels, in plain C++ with no torch
// headers. Format and math: fastaccum/ops/quantize.py (the reference these match bit for
// bit).
//
// quantize.cpp includes this file twice, for the baseline x86-64 target and under
// `#pragma GCC target("avx2,fma,f16c")`, and picks one at run time. Everything lives in the
// nested namespace `quant` so that it cannot collide with the other kernel headers that are
// expanded into the same `baseline`/`avx2` namespaces in other translation units.
//
// Bit-exactness with the reference needs each float operation rounded on its own: a fused
// multiply-add in y = (x - mn) * inv + u would move codes that sit on a rounding boundary,
// so contraction is switched off for these functions.
//
// No include guard on purpose: expanded once per target namespace. The including file
// provides <cstdint>, <cstring>, <cmath> and FA_KERNEL_NS.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace FA_KERNEL_NS {
namespace quant {

constexpr int64_t LANES = 16;

struct Bf16Bits {
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(_Float16 x) { return static_cast<float>(x); }
inline float to_f32(Bf16Bits x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_f32(float x);
template <>
inline float from_f32<float>(float x) {
  return x;
}
template <>
inline _Float16 from_f32<_Float16>(float x) {
  return static_cast<_Float16>(x);
}
template <>
inline Bf16Bits from_f32<Bf16Bits>(float x) {
  // Round to nearest even, as torch's cast does; NaN stays a quiet NaN.
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return Bf16Bits{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

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
  if (stochastic) {
    const uint32_t key = stream_key(seed, first_index);
    const uint32_t lo = static_cast<uint32_t>(first_index);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t h = mix32((lo + static_cast<uint32_t>(i)) ^ key);
      const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f;
      const float y = (work[i] - mn) * inv;
      // y + u >= 0 (x >= mn), so truncation is floor.
      const int32_t q = static_cast<int32_t>(y + u);
      codes[i] = static_cast<uint8_t>(q < kLevels ? q : kLevels);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float y = (work[i] - mn) * inv;
      const int32_t q = static_cast<int32_t>(y + 0.5f);
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

// out[0..n) = minimum + code * scale for the codes of one group.
template <int BITS, typename T>
void dequantize_group(const uint8_t* __restrict in, int64_t n, float scale, float minimum,
                      T* __restrict out) {
  constexpr int kPerByte = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  int64_t i = 0;
  for (; i + kPerByte <= n; i += kPerByte) {
    const uint32_t byte = in[i / kPerByte];
    for (int k = 0; k < kPerByte; ++k) {
      const float q = static_cast<float>(static_cast<int32_t>((byte >> (k * BITS)) & kMask));
      out[i + k] = from_f32<T>(minimum + q * scale);
    }
  }
  for (; i < n; ++i) {
    const uint32_t byte = in[i / kPerByte];
    const float q =
        static_cast<float>(static_cast<int32_t>((byte >> ((i % kPerByte) * BITS)) & kMask));
    out[i] = from_f32<T>(minimum + q * scale);
  }
}

}  // namespace quant
}  // namespace FA_KERNEL_NS

#pragma GCC pop_options
