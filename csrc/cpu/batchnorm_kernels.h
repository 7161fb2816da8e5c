// Loops of the CPU batch-norm kernels (fastaccum::bn_*), in plain C++ with no torch headers.
//
// batchnorm.cpp expands this file once per CPU target (see for_each_target.h), as
// accumulate.cpp does with accumulate_kernels.h, whose storage types and conversions
// (Bf16Bits, to_f32, from_f32, LANES) this file reuses from the same namespace.
//
// Two layouts, both read in memory order:
//   planar  x[n][c][s]  contiguous NC*, S = prod(spatial) >= 2; a channel is N runs of S.
//   rows    x[m][c]     channels-last (and 2-D (N, C)); M = N * S rows of C channels.
// A work item is a piece of one channel (planar: channel c, planes n0..n1, positions
// s0..s1) or a range of rows (rows: every channel). Per-element math is fp32.
//
// Statistics: every value is first shifted by one sample of its channel (`shift`), so a
// large mean (1e4 with std 1) costs no digits. Blocks of up to BN_BLOCK elements are read
// twice while they are in cache (the corrected two-pass algorithm: the block's mean, then
// sums of the deviations from it), and the blocks' (count, mean, M2) are merged in double
// with Chan et al.'s update. Memory is still read once.
//
// This header has no include guard on purpose (see accumulate_kernels.h). The including
// file provides <cstdint>, <cstring>, <type_traits>, <vector> and FA_KERNEL_NS.
#include "accumulate_kernels.h"

#ifndef FA_BN_ARGS_DEFINED
#define FA_BN_ARGS_DEFINED
namespace fastaccum {
namespace cpu {

enum class BnStorage { kFloat, kBFloat16, kHalf };

// What one call's kernels share: the tensors' dtype and geometry, and the per-channel fp32
// constants [C] of the op (null when unused).
struct BnArgs {
  BnStorage dtype;
  bool planar;  // planar x[n][c][s], else rows x[m][c]
  bool relu;
  int64_t C;
  int64_t S;            // positions per plane (planar only)
  const float* shift;   // statistics: one sample of each channel
  const float* mean;    // the batch (or running) mean
  const float* mul;     // weight * invstd
  const float* add;     // bias
  const float* mean_dy; // sum_dy / count
  const float* k;       // sum_dy_xhat * invstd / count
};

// One work item. Planar: channel c of planes [n0, n1), positions [s0, s1) of each. Rows:
// rows [n0, n1), every channel (c, s0, s1 unused).
struct BnItem {
  int64_t c, n0, n1, s0, s1;
};

}  // namespace cpu
}  // namespace fastaccum
#endif

namespace FA_KERNEL_NS {

// Elements per two-pass block: 16 KiB of fp32, so that the second pass reads from cache.
constexpr int64_t BN_BLOCK = 4096;
// The same for a block of rows (64 KiB of fp32, in L2): larger, since each block costs a
// merge per channel.
constexpr int64_t BN_ROWS_BLOCK = 16384;
// Rows per fp32 partial sum in the rows layout (see rows_moments).
constexpr int64_t BN_ROWS_RUN = 64;

// (count, mean, M2) of one channel; mean relative to the channel's shift.
struct Moments {
  double count = 0.0;
  double mean = 0.0;
  double m2 = 0.0;

  // Chan et al.'s pairwise update with the moments of disjoint samples (count_b > 0).
  void merge(double count_b, double mean_b, double m2_b) {
    const double n = count + count_b;
    const double delta = mean_b - mean;
    mean += delta * (count_b / n);
    m2 += m2_b + delta * delta * (count * count_b / n);
    count = n;
  }
};

// --------------------------------------------------------------------------- statistics

// 8 fp32 lanes as a GCC vector (one AVX register in the AVX2 build, two SSE registers in
// the baseline one). The reductions below use it directly: written as LANES-wide scalar
// loops, GCC vectorizes them across iterations with shuffles and runs ~10x slower. Vectors
// are passed by reference only, since by value the baseline build's ABI differs (-Wpsabi).
typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));

inline void load8(F8& v, const float* p) { std::memcpy(&v, p, sizeof v); }
inline void load8(F8& v, const Bf16Bits* p) {
  typedef uint16_t U16x8 __attribute__((vector_size(16)));
  U16x8 h;
  std::memcpy(&h, p, sizeof h);
  const U8 w = __builtin_convertvector(h, U8) << 16;
  std::memcpy(&v, &w, sizeof v);
}
inline void load8(F8& v, const _Float16* p) {
  float t[8];
  for (int l = 0; l < 8; ++l) t[l] = static_cast<float>(p[l]);
  std::memcpy(&v, t, sizeof v);
}
inline float lane_sum(const F8& v) {
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Independent vector accumulators per sum: 32 elements per iteration, so that the adds'
// latency (a chain through one accumulator) does not bound the loop.
constexpr int kAcc = 4;

inline float lane_sum(const F8 (&acc)[kAcc]) { return lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])); }

// Sum of (x[i] - shift), i < len.
template <typename T>
inline float sum_shifted(const T* __restrict x, int64_t len, float shift) {
  F8 acc[kAcc] = {};
  int64_t i = 0;
  for (; i + 8 * kAcc <= len; i += 8 * kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      F8 u;
      load8(u, x + i + 8 * k);
      acc[k] += u - shift;
    }
  }
  for (; i + 8 <= len; i += 8) {
    F8 u;
    load8(u, x + i);
    acc[0] += u - shift;
  }
  float s = lane_sum(acc);
  for (; i < len; ++i) s += to_f32(x[i]) - shift;
  return s;
}

// Two fp32 sums.
struct SumPair {
  float first = 0.0f;
  float second = 0.0f;
};

// sum(e) and sum(e^2) with e = (x[i] - shift) - center, i < len.
template <typename T>
inline SumPair centered_sums(const T* __restrict x, int64_t len, float shift, float center) {
  F8 s1[kAcc] = {}, s2[kAcc] = {};
  int64_t i = 0;
  for (; i + 8 * kAcc <= len; i += 8 * kAcc) {
    for (int k = 0; k < kAcc; ++k) {
      F8 u;
      load8(u, x + i + 8 * k);
      const F8 e = (u - shift) - center;
      s1[k] += e;
      s2[k] += e * e;
    }
  }
  for (; i + 8 <= len; i += 8) {
    F8 u;
    load8(u, x + i);
    const F8 e = (u - shift) - center;
    s1[0] += e;
    s2[0] += e * e;
  }
  SumPair out{lane_sum(s1), lane_sum(s2)};
  for (; i < len; ++i) {
    const float e = (to_f32(x[i]) - shift) - center;
    out.first += e;
    out.second += e * e;
  }
  return out;
}

// Moments of `segs` runs of `len` elements, run k at x + k * stride, merged into m.
template <typename T>
inline void planar_block_moments(const T* x, int64_t segs, int64_t stride, int64_t len,
                                 float shift, Moments& m) {
  float s = 0.0f;
  for (int64_t k = 0; k < segs; ++k) s += sum_shifted(x + k * stride, len, shift);
  const double count = static_cast<double>(segs * len);
  const float center = static_cast<float>(s / count);
  float se = 0.0f, see = 0.0f;
  for (int64_t k = 0; k < segs; ++k) {
    const SumPair p = centered_sums(x + k * stride, len, shift, center);
    se += p.first;
    see += p.second;
  }
  // The corrected two-pass form: sum(e) is ~0 and fixes the rounding of `center`.
  m.merge(count, center + se / count, see - static_cast<double>(se) * se / count);
}

// Moments of channel c over planes [n0, n1), positions [s0, s1) of a planar tensor.
template <typename T>
void planar_moments(const T* x, int64_t C, int64_t S, int64_t c, int64_t n0, int64_t n1,
                    int64_t s0, int64_t s1, float shift, Moments& m) {
  const int64_t len = s1 - s0;
  const int64_t plane_stride = C * S;
  // Whole short planes are grouped into one block; long ones are cut into blocks.
  const int64_t planes_per_block = len >= BN_BLOCK ? 1 : BN_BLOCK / len;
  for (int64_t n = n0; n < n1; n += planes_per_block) {
    const int64_t segs = (n1 - n < planes_per_block) ? n1 - n : planes_per_block;
    const T* base = x + (n * C + c) * S;
    for (int64_t s = s0; s < s1; s += BN_BLOCK) {
      const int64_t piece = (s1 - s < BN_BLOCK) ? s1 - s : BN_BLOCK;
      planar_block_moments(base + s, segs, plane_stride, piece, shift, m);
    }
  }
}

// Moments of every channel over rows [m0, m1) of a rows-layout tensor, merged into
// mean[C] and m2[C] (double, relative to shift) with the rows counted in count. scratch
// holds 3 * C floats and dscratch 3 * C doubles.
//
// In this layout each channel's fp32 sum is one sequential chain (the vector lanes run
// across channels), so fp32 partial sums cover at most BN_ROWS_RUN rows before they are
// added into double. Every channel has the same count, so the merge weights are computed
// once per block and the merge is a vector loop over the channels.
template <typename T>
void rows_moments(const T* x, int64_t C, int64_t m0, int64_t m1, const float* __restrict shift,
                  float* __restrict scratch, double* __restrict dscratch,
                  double* __restrict mean, double* __restrict m2, double& count) {
  float* __restrict center = scratch;
  float* __restrict run1 = scratch + C;
  float* __restrict run2 = scratch + 2 * C;
  double* __restrict sum_x = dscratch;
  double* __restrict se = dscratch + C;
  double* __restrict see = dscratch + 2 * C;
  const int64_t rows_per_block = BN_ROWS_BLOCK > C ? BN_ROWS_BLOCK / C : 1;
  for (int64_t r0 = m0; r0 < m1; r0 += rows_per_block) {
    const int64_t r1 = (m1 - r0 < rows_per_block) ? m1 : r0 + rows_per_block;
    for (int64_t c = 0; c < C; ++c) sum_x[c] = se[c] = see[c] = 0.0;
    for (int64_t q = r0; q < r1; q += BN_ROWS_RUN) {  // pass 1: the block's mean
      const int64_t q1 = (r1 - q < BN_ROWS_RUN) ? r1 : q + BN_ROWS_RUN;
      for (int64_t c = 0; c < C; ++c) run1[c] = 0.0f;
      for (int64_t r = q; r < q1; ++r) {
        const T* __restrict row = x + r * C;
        for (int64_t c = 0; c < C; ++c) run1[c] += to_f32(row[c]) - shift[c];
      }
      for (int64_t c = 0; c < C; ++c) sum_x[c] += run1[c];
    }
    const double n_b = static_cast<double>(r1 - r0), inv_nb = 1.0 / n_b;
    for (int64_t c = 0; c < C; ++c) center[c] = static_cast<float>(sum_x[c] * inv_nb);
    for (int64_t q = r0; q < r1; q += BN_ROWS_RUN) {  // pass 2: deviations from it
      const int64_t q1 = (r1 - q < BN_ROWS_RUN) ? r1 : q + BN_ROWS_RUN;
      for (int64_t c = 0; c < C; ++c) run1[c] = run2[c] = 0.0f;
      for (int64_t r = q; r < q1; ++r) {
        const T* __restrict row = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const float e = (to_f32(row[c]) - shift[c]) - center[c];
          run1[c] += e;
          run2[c] += e * e;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        se[c] += run1[c];
        see[c] += run2[c];
      }
    }
    // Moments::merge for every channel at once, with the block's count n_b.
    const double n = count + n_b, w_b = n_b / n, w_ab = count * n_b / n;
    for (int64_t c = 0; c < C; ++c) {
      const double delta = (center[c] + se[c] * inv_nb) - mean[c];
      mean[c] += delta * w_b;
      m2[c] += (see[c] - se[c] * se[c] * inv_nb) + delta * delta * w_ab;
    }
    count = n;
  }
}

// --------------------------------------------------------------------------- forward

// y = max?((x - mean) * mul + add) over one piece of a planar tensor, channel c.
template <typename T, bool kRelu>
void planar_apply(const T* x, T* y, int64_t C, int64_t S, int64_t c, int64_t n0, int64_t n1,
                  int64_t s0, int64_t s1, float mean, float mul, float add) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* __restrict xp = x + (n * C + c) * S;
    T* __restrict yp = y + (n * C + c) * S;
    for (int64_t s = s0; s < s1; ++s) {
      float z = (to_f32(xp[s]) - mean) * mul + add;
      if (kRelu) z = z < 0.0f ? 0.0f : z;  // NaN stays NaN, as torch.relu keeps it
      yp[s] = from_f32<T>(z);
    }
  }
}

// The same over rows [m0, m1) of a rows-layout tensor, per-channel mean/mul/add[C].
template <typename T, bool kRelu>
void rows_apply(const T* x, T* y, int64_t C, int64_t m0, int64_t m1, const float* __restrict mean,
                const float* __restrict mul, const float* __restrict add) {
  for (int64_t r = m0; r < m1; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict yr = y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      float z = (to_f32(xr[c]) - mean[c]) * mul[c] + add[c];
      if (kRelu) z = z < 0.0f ? 0.0f : z;
      yr[c] = from_f32<T>(z);
    }
  }
}

// --------------------------------------------------------------------------- backward

// The incoming gradient with the ReLU's mask applied: zero where the pre-activation
// (d * mul + add, the forward's own expression) is not positive, as threshold_backward.
// A bit mask rather than a select: GCC then vectorizes every loop that uses it.
template <bool kRelu>
inline float masked_grad(float g, float d, float mul, float add) {
  if (!kRelu) return g;
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof bits);
  bits &= 0u - static_cast<uint32_t>(d * mul + add > 0.0f);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Adds sum(g) and sum(g * (x - mean)) of channel c over one planar piece to sums[0..1]
// (fp32 within a run of at most BN_BLOCK elements, then double).
template <typename T, bool kRelu>
void planar_grad_sums(const T* dy, const T* x, int64_t C, int64_t S, int64_t c, int64_t n0,
                      int64_t n1, int64_t s0, int64_t s1, float mean, float mul, float add,
                      double* sums) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * C + c) * S;
    const T* __restrict gp = dy + base;
    const T* __restrict xp = x + base;
    for (int64_t s = s0; s < s1; s += BN_BLOCK) {
      const int64_t end = (s1 - s < BN_BLOCK) ? s1 : s + BN_BLOCK;
      F8 a1[kAcc] = {}, a2[kAcc] = {};
      int64_t i = s;
      for (; i + 8 * kAcc <= end; i += 8 * kAcc) {
        for (int k = 0; k < kAcc; ++k) {
          F8 d, g;
          load8(d, xp + i + 8 * k);
          load8(g, gp + i + 8 * k);
          d -= mean;
          if (kRelu) g = (F8)((U8)g & (U8)(d * mul + add > 0.0f));  // the mask of masked_grad
          a1[k] += g;
          a2[k] += g * d;
        }
      }
      float t1 = lane_sum(a1), t2 = lane_sum(a2);
      for (; i < end; ++i) {  // at most 31 elements
        const float d = to_f32(xp[i]) - mean;
        const float g = masked_grad<kRelu>(to_f32(gp[i]), d, mul, add);
        t1 += g;
        t2 += g * d;
      }
      sums[0] += t1;
      sums[1] += t2;
    }
  }
}

// The same for every channel over rows [m0, m1): adds to sum_dy[C] and sum_dy_xmu[C].
// scratch holds 2 * C floats.
template <typename T, bool kRelu>
void rows_grad_sums(const T* dy, const T* x, int64_t C, int64_t m0, int64_t m1,
                    const float* __restrict mean, const float* __restrict mul,
                    const float* __restrict add, float* __restrict scratch,
                    double* __restrict sum_dy, double* __restrict sum_dy_xmu) {
  float* __restrict a1 = scratch;
  float* __restrict a2 = scratch + C;
  for (int64_t r0 = m0; r0 < m1; r0 += BN_ROWS_RUN) {  // fp32 runs, as in rows_moments
    const int64_t r1 = (m1 - r0 < BN_ROWS_RUN) ? m1 : r0 + BN_ROWS_RUN;
    for (int64_t c = 0; c < C; ++c) a1[c] = a2[c] = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict gr = dy + r * C;
      const T* __restrict xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float d = to_f32(xr[c]) - mean[c];
        const float g = masked_grad<kRelu>(to_f32(gr[c]), d, mul[c], add[c]);
        a1[c] += g;
        a2[c] += g * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += a1[c];
      sum_dy_xmu[c] += a2[c];
    }
  }
}

// grad_x = mul * ((g - mean_dy) - (x - mean) * k) over one planar piece of channel c,
// with g the masked incoming gradient (mul = weight * invstd, mean_dy = sum_dy / count,
// k = sum_dy_xhat * invstd / count).
template <typename T, bool kRelu>
void planar_grad_input(const T* dy, const T* x, T* gx, int64_t C, int64_t S, int64_t c,
                       int64_t n0, int64_t n1, int64_t s0, int64_t s1, float mean, float mul,
                       float add, float mean_dy, float k) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = (n * C + c) * S;
    const T* __restrict gp = dy + base;
    const T* __restrict xp = x + base;
    T* __restrict op = gx + base;
    for (int64_t s = s0; s < s1; ++s) {
      const float d = to_f32(xp[s]) - mean;
      const float g = masked_grad<kRelu>(to_f32(gp[s]), d, mul, add);
      op[s] = from_f32<T>(mul * ((g - mean_dy) - d * k));
    }
  }
}

// The same over rows [m0, m1), per-channel constants [C].
template <typename T, bool kRelu>
void rows_grad_input(const T* dy, const T* x, T* gx, int64_t C, int64_t m0, int64_t m1,
                     const float* __restrict mean, const float* __restrict mul,
                     const float* __restrict add, const float* __restrict mean_dy,
                     const float* __restrict k) {
  for (int64_t r = m0; r < m1; ++r) {
    const T* __restrict gr = dy + r * C;
    const T* __restrict xr = x + r * C;
    T* __restrict orow = gx + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float d = to_f32(xr[c]) - mean[c];
      const float g = masked_grad<kRelu>(to_f32(gr[c]), d, mul[c], add[c]);
      orow[c] = from_f32<T>(mul[c] * ((g - mean_dy[c]) - d * k[c]));
    }
  }
}

// --------------------------------------------------------------------------- entry points
// One work item of each op, for any storage dtype, layout and ReLU flag: batchnorm.cpp
// calls these through function pointers of the target it picked.

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
inline void with_storage(fastaccum::cpu::BnStorage dtype, F&& f) {
  using fastaccum::cpu::BnStorage;
  switch (dtype) {
    case BnStorage::kFloat: f(float{}); break;
    case BnStorage::kBFloat16: f(Bf16Bits{}); break;
    case BnStorage::kHalf: f(_Float16{}); break;
  }
}

// Moments (count, mean relative to shift, M2) as out[0..2] (planar: of channel it.c) or
// out[3c..3c+2] for every channel c (rows). scratch: 3 * C floats.
inline void bn_stats_item(const void* x, const fastaccum::cpu::BnArgs& a,
                          const fastaccum::cpu::BnItem& it, float* scratch, double* out) {
  with_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    if (a.planar) {
      Moments m;
      planar_moments(xt, a.C, a.S, it.c, it.n0, it.n1, it.s0, it.s1, a.shift[it.c], m);
      out[0] = m.count;
      out[1] = m.mean;
      out[2] = m.m2;
      return;
    }
    std::vector<double> mean(a.C, 0.0), m2(a.C, 0.0), dscratch(3 * a.C);
    double count = 0.0;
    rows_moments(xt, a.C, it.n0, it.n1, a.shift, scratch, dscratch.data(), mean.data(), m2.data(),
                 count);
    for (int64_t c = 0; c < a.C; ++c) {
      out[3 * c] = count;
      out[3 * c + 1] = mean[c];
      out[3 * c + 2] = m2[c];
    }
  });
}

inline void bn_apply_item(const void* x, void* y, const fastaccum::cpu::BnArgs& a,
                          const fastaccum::cpu::BnItem& it) {
  with_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    auto run = [&](auto relu) {
      constexpr bool kRelu = decltype(relu)::value;
      if (a.planar) {
        planar_apply<T, kRelu>(xt, yt, a.C, a.S, it.c, it.n0, it.n1, it.s0, it.s1,
                               a.mean[it.c], a.mul[it.c], a.add[it.c]);
      } else {
        rows_apply<T, kRelu>(xt, yt, a.C, it.n0, it.n1, a.mean, a.mul, a.add);
      }
    };
    a.relu ? run(std::true_type{}) : run(std::false_type{});
  });
}

// Adds sum(g) and sum(g * (x - mean)) to out[0..1] (planar, channel it.c) or to
// out[c] and out[C + c] for every channel (rows). scratch: 2 * C floats.
inline void bn_grad_sums_item(const void* dy, const void* x, const fastaccum::cpu::BnArgs& a,
                              const fastaccum::cpu::BnItem& it, float* scratch, double* out) {
  with_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    auto run = [&](auto relu) {
      constexpr bool kRelu = decltype(relu)::value;
      if (a.planar) {
        planar_grad_sums<T, kRelu>(gt, xt, a.C, a.S, it.c, it.n0, it.n1, it.s0, it.s1,
                                   a.mean[it.c], a.mul[it.c], a.add[it.c], out);
      } else {
        rows_grad_sums<T, kRelu>(gt, xt, a.C, it.n0, it.n1, a.mean, a.mul, a.add, scratch, out,
                                 out + a.C);
      }
    };
    a.relu ? run(std::true_type{}) : run(std::false_type{});
  });
}

inline void bn_grad_input_item(const void* dy, const void* x, void* gx,
                               const fastaccum::cpu::BnArgs& a, const fastaccum::cpu::BnItem& it) {
  with_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gt = static_cast<const T*>(dy);
    const T* xt = static_cast<const T*>(x);
    T* ot = static_cast<T*>(gx);
    auto run = [&](auto relu) {
      constexpr bool kRelu = decltype(relu)::value;
      if (a.planar) {
        const int64_t c = it.c;
        planar_grad_input<T, kRelu>(gt, xt, ot, a.C, a.S, c, it.n0, it.n1, it.s0, it.s1,
                                    a.mean[c], a.mul[c], a.add[c], a.mean_dy[c], a.k[c]);
      } else {
        rows_grad_input<T, kRelu>(gt, xt, ot, a.C, it.n0, it.n1, a.mean, a.mul, a.add,
                                  a.mean_dy, a.k);
      }
    };
    a.relu ? run(std::true_type{}) : run(std::false_type{});
  });
}

}  // namespace FA_KERNEL_NS
