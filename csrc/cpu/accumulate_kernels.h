// Loops of the CPU accumulate_/finalize_ kernels, in plain C++ with no torch headers.
//
// accumulate.cpp includes this file twice, once compiled for the baseline x86-64 target
// and once under `#pragma GCC target("avx2,fma,f16c")`, then picks one at run time. The
// loops are written so that GCC vectorizes them: fixed-width lanes, conversions as bit
// operations or _Float16 casts, no branches in the body.
//
// Precision: every element is computed in fp32 (as torch does for bf16/fp16 math). Sums
// of squares are kept in LANES fp32 partial sums that are flushed into a double every
// FLUSH elements, so no fp32 sum ever adds more than FLUSH / LANES terms.
//
// This header has no include guard on purpose: it is meant to be expanded once per
// target namespace. The including file provides <cstdint>, <cstring> and FA_KERNEL_NS.

namespace FA_KERNEL_NS {

constexpr int64_t LANES = 16;
constexpr int64_t FLUSH = 4096;

// Storage types: float, Bf16Bits (bfloat16 as raw bits) and _Float16.
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
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return Bf16Bits{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

// 1 when x is NaN or +-Inf (exponent bits all set), else 0; branch free.
inline uint32_t nonfinite_bit(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
}

struct ChunkStats {
  double grad_sumsq;
  double accum_sumsq;
  bool nonfinite;
};

// accum[i] += scale * grad[i] for i < n, with the sums of squares of grad and of the
// updated accum, and the non-finite flag of grad; zeroes grad when zero_grad is set.
template <typename G, typename A>
ChunkStats accumulate_chunk(A* __restrict accum, G* __restrict grad, int64_t n, float scale,
                            bool zero_grad) {
  double gsq_total = 0.0, asq_total = 0.0;
  uint32_t bad = 0;
  int64_t i = 0;
  while (i < n) {
    const int64_t end = (n - i > FLUSH) ? i + FLUSH : n;
    float gsq[LANES] = {}, asq[LANES] = {};
    for (; i + LANES <= end; i += LANES) {
      for (int64_t l = 0; l < LANES; ++l) {
        const float g = to_f32(grad[i + l]);
        const A stored = from_f32<A>(to_f32(accum[i + l]) + scale * g);
        const float a = to_f32(stored);
        accum[i + l] = stored;
        gsq[l] += g * g;
        asq[l] += a * a;
        bad |= nonfinite_bit(g);
      }
      if (zero_grad) {
        for (int64_t l = 0; l < LANES; ++l) grad[i + l] = from_f32<G>(0.0f);
      }
    }
    for (; i < end; ++i) {  // tail shorter than one lane group
      const float g = to_f32(grad[i]);
      const A stored = from_f32<A>(to_f32(accum[i]) + scale * g);
      const float a = to_f32(stored);
      accum[i] = stored;
      gsq[0] += g * g;
      asq[0] += a * a;
      bad |= nonfinite_bit(g);
      if (zero_grad) grad[i] = from_f32<G>(0.0f);
    }
    for (int64_t l = 0; l < LANES; ++l) {
      gsq_total += gsq[l];
      asq_total += asq[l];
    }
  }
  return ChunkStats{gsq_total, asq_total, bad != 0};
}

// Sum of squares of x[0..n) (read as fp32), with the same lane and flush scheme as
// accumulate_chunk; the non-finite flag comes for free from the sum itself.
template <typename T>
double sumsq_chunk(const T* __restrict x, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  while (i < n) {
    const int64_t end = (n - i > FLUSH) ? i + FLUSH : n;
    float sq[LANES] = {};
    for (; i + LANES <= end; i += LANES) {
      for (int64_t l = 0; l < LANES; ++l) {
        const float v = to_f32(x[i + l]);
        sq[l] += v * v;
      }
    }
    for (; i < end; ++i) {
      const float v = to_f32(x[i]);
      sq[0] += v * v;
    }
    for (int64_t l = 0; l < LANES; ++l) total += sq[l];
  }
  return total;
}

// r = accum[i] * factor; out[i] = r (when out is given); accum[i] = zero ? 0 : r.
template <typename A, typename O>
void finalize_chunk(A* __restrict accum, O* __restrict out, int64_t n, float factor,
                    bool zero_accum) {
  const A zero = from_f32<A>(0.0f);
  if (out != nullptr) {
    if (zero_accum) {
      for (int64_t i = 0; i < n; ++i) {
        out[i] = from_f32<O>(to_f32(accum[i]) * factor);
        accum[i] = zero;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float r = to_f32(accum[i]) * factor;
        out[i] = from_f32<O>(r);
        accum[i] = from_f32<A>(r);
      }
    }
  } else if (zero_accum) {
    for (int64_t i = 0; i < n; ++i) accum[i] = zero;
  } else {
    for (int64_t i = 0; i < n; ++i) accum[i] = from_f32<A>(to_f32(accum[i]) * factor);
  }
}

}  // namespace FA_KERNEL_NS
