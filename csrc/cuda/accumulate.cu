// CUDA kernels of fastaccum::accumulate_ and fastaccum::finalize_ (launcher API in
// accumulate.cuh; semantics and the pure-PyTorch reference in fastaccum/ops/accumulate.py).
//
// accumulate_: accum += scale * grad, in one pass that also measures sum(grad^2) per tensor,
//   sum(accum^2) of the updated accumulators as stored, and whether a gradient is NaN/Inf.
//   Bytes per element: read grad (2 or 4 B) + read and write accum (2 x 4 B for fp32
//   accumulators), plus the grad write when zero_grads. ~6 flops per element: memory-bound
//   everywhere.
// finalize_: r = accum * factor * factor_tensor; out = r; accum = 0 or r. One read of accum,
//   one write of out, one write of accum.
//
// Structure: multi-tensor apply (multi_tensor.cuh): blocks walk (tensor, chunk) work items
// of a tensor table passed in the kernel arguments, with 16-byte packed loads and stores.
// Reductions are deterministic: every work item writes its block-reduced partial to its own
// workspace slot; then one block per tensor sums the tensor's slots in a fixed order, and
// one block sums the tensors. No floating-point atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "accumulate.cuh"
#include "multi_tensor.cuh"

namespace {

using namespace fa_multi_tensor;

constexpr int kWarps = kThreads / 32;

// For accumulate ptr[0] = grads, ptr[1] = accums; for finalize ptr[0] = accums, ptr[1] =
// outs (nullptr without outputs).
using PairTable = TensorTable<2>;
static_assert(kFitsKernelParams<2>, "PairTable does not fit kernel params");

// ------------------------------------------------------------------------- element access

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// Round to nearest even, as torch's dtype conversions do.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return __float2half_rn(v);
  }
}

// NaN and +-Inf are exactly the values whose exponent bits are all ones. Testing the bits
// keeps the check exact whatever math flags the build uses.
__device__ __forceinline__ bool is_nonfinite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// ----------------------------------------------------------------------------- reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums x and y over the block (result in thread 0) and ORs flag (result in every thread).
// The order of additions depends only on the block size, so results are reproducible.
__device__ __forceinline__ bool block_reduce(float& x, float& y, bool flag) {
  __shared__ float partial[2][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  x = warp_sum(x);
  y = warp_sum(y);
  if (lane == 0) {
    partial[0][warp] = x;
    partial[1][warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = warp_sum(lane < kWarps ? partial[0][lane] : 0.f);
    y = warp_sum(lane < kWarps ? partial[1][lane] : 0.f);
  }
  // Also the barrier that keeps `partial` from being overwritten by a next call before
  // warp 0 has read it.
  return __syncthreads_or(flag) != 0;
}

// Sums entries [first, first + n) of the (grad sumsq, accum sumsq, non-finite) arrays.
__device__ __forceinline__ bool reduce_segment(const float* grad, const float* accum,
                                               const float* flag, int64_t first, int64_t n,
                                               float& grad_sum, float& accum_sum) {
  grad_sum = 0.f;
  accum_sum = 0.f;
  bool bad = false;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    grad_sum += grad[first + i];
    accum_sum += accum[first + i];
    bad |= flag[first + i] != 0.f;
  }
  return block_reduce(grad_sum, accum_sum, bad);
}

// Where accumulate's kernels keep intermediate results: one slot per work item (chunk
// partials), then one per tensor. Floats throughout, the non-finite flag as 0/1.
struct Workspace {
  float* grad_partial;
  float* accum_partial;
  float* flag_partial;
  float* accum_per_tensor;
  float* flag_per_tensor;
};

// -------------------------------------------------------------------------- accumulate

template <typename G, typename A>
struct AccumulateOp {
  static_assert(sizeof(A) >= sizeof(G), "accumulators are fp32 or the gradient's dtype");
  static constexpr int kPack = 16 / sizeof(G);
  struct Loaded {
    Pack<G, kPack> g;
    Pack<A, kPack> a;
  };

  G* grad;
  A* accum;
  float scale;
  bool zero_grads;
  float grad_sumsq = 0.f;
  float accum_sumsq = 0.f;
  bool nonfinite = false;

  // One element: returns the updated accumulator in its dtype and records the
  // measurements. accum_sumsq is of the value stored, after rounding to a bf16/fp16
  // accumulator (the reference's definition).
  __device__ __forceinline__ A update(float g, float a) {
    nonfinite |= is_nonfinite(g);
    grad_sumsq = fmaf(g, g, grad_sumsq);
    const A stored = from_float<A>(fmaf(scale, g, a));
    const float r = to_float(stored);
    accum_sumsq = fmaf(r, r, accum_sumsq);
    return stored;
  }

  __device__ __forceinline__ void scalar(int64_t i) {
    accum[i] = update(to_float(grad[i]), to_float(accum[i]));
    if (zero_grads) grad[i] = from_float<G>(0.f);
  }

  __device__ __forceinline__ void load(int64_t i, Loaded& v) const {
    load_pack<true>(grad + i, v.g);
    load_pack<false>(accum + i, v.a);
  }

  __device__ __forceinline__ void store(int64_t i, const Loaded& v) {
    Pack<A, kPack> out;
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      out.v[j] = update(to_float(v.g.v[j]), to_float(v.a.v[j]));
    }
    store_pack(accum + i, out);
    if (zero_grads) {
      Pack<G, kPack> zeros;
#pragma unroll
      for (int j = 0; j < kPack; ++j) zeros.v[j] = from_float<G>(0.f);
      store_pack(grad + i, zeros);
    }
  }
};

// One block per work item (grid-stride): update the chunk, then write the chunk's sums of
// squares and non-finite flag to its workspace slot.
template <typename G, typename A>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const __grid_constant__ PairTable table, float scale, bool zero_grads,
                      Workspace ws) {
  // for_each_work_item's loop, written out: with the body in a lambda nvcc 13 schedules and
  // allocates registers differently here, and written out the kernel keeps the exact SASS it
  // had before multi_tensor.cuh was shared (not measured to be better or worse).
  const int32_t items = table.chunk_start[table.count];
  for (int32_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int t = find_tensor(table, w);
    AccumulateOp<G, A> op{static_cast<G*>(table.ptr[0][t]), static_cast<A*>(table.ptr[1][t]),
                          scale, zero_grads};
    const ChunkBounds chunk = chunk_bounds(table, t, w);
    run_chunk(op, chunk.begin, chunk.end,
              aligned_head<AccumulateOp<G, A>::kPack>(op.grad, sizeof(G), op.accum, sizeof(A)));
    const bool bad = block_reduce(op.grad_sumsq, op.accum_sumsq, op.nonfinite);
    if (threadIdx.x == 0) {
      const int64_t slot = int64_t{table.partial_base} + w;
      ws.grad_partial[slot] = op.grad_sumsq;
      ws.accum_partial[slot] = op.accum_sumsq;
      ws.flag_partial[slot] = bad ? 1.f : 0.f;
    }
  }
}

// One block per tensor of the table: its chunks' partials, summed in a fixed order.
__global__ void __launch_bounds__(kThreads)
    reduce_per_tensor_kernel(const __grid_constant__ PairTable table,
                             float* grad_sumsq_per_tensor, Workspace ws) {
  const int t = blockIdx.x;
  const int64_t first = int64_t{table.partial_base} + table.chunk_start[t];
  const int64_t n = table.chunk_start[t + 1] - table.chunk_start[t];
  float grad_sum;
  float accum_sum;
  const bool bad = reduce_segment(ws.grad_partial, ws.accum_partial, ws.flag_partial, first,
                                  n, grad_sum, accum_sum);
  if (threadIdx.x == 0) {
    const int32_t slot = table.slot[t];
    grad_sumsq_per_tensor[slot] = grad_sum;
    ws.accum_per_tensor[slot] = accum_sum;
    ws.flag_per_tensor[slot] = bad ? 1.f : 0.f;
  }
}

// One block: the call's totals from the per-tensor results of every group, in slot order.
__global__ void __launch_bounds__(kThreads)
    reduce_totals_kernel(int64_t num_tensors, const float* grad_sumsq_per_tensor, Workspace ws,
                         float* grad_sumsq, float* accum_sumsq, bool* found_nonfinite) {
  float grad_sum;
  float accum_sum;
  const bool bad = reduce_segment(grad_sumsq_per_tensor, ws.accum_per_tensor,
                                  ws.flag_per_tensor, 0, num_tensors, grad_sum, accum_sum);
  if (threadIdx.x == 0) {
    *grad_sumsq = grad_sum;
    *accum_sumsq = accum_sum;
    *found_nonfinite = bad;
  }
}

// ---------------------------------------------------------------------------- finalize

template <typename A, typename O, bool kHasOut>
struct FinalizeOp {
  static constexpr int kPack = 16 / (sizeof(A) < sizeof(O) ? sizeof(A) : sizeof(O));
  using Loaded = Pack<A, kPack>;

  A* accum;
  O* out;
  float factor;
  float factor_tensor;
  bool zero_accums;

  // (accum * factor) * factor_tensor, in the reference's order; factor_tensor is 1 when
  // absent, which leaves the product bit-identical.
  __device__ __forceinline__ float scaled(A a) const {
    return to_float(a) * factor * factor_tensor;
  }

  __device__ __forceinline__ void scalar(int64_t i) {
    const float r = scaled(accum[i]);
    if constexpr (kHasOut) out[i] = from_float<O>(r);
    accum[i] = from_float<A>(zero_accums ? 0.f : r);
  }

  __device__ __forceinline__ void load(int64_t i, Loaded& v) const {
    load_pack<false>(accum + i, v);
  }

  __device__ __forceinline__ void store(int64_t i, const Loaded& v) {
    Pack<A, kPack> back;
    [[maybe_unused]] Pack<O, kPack> result;
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      const float r = scaled(v.v[j]);
      if constexpr (kHasOut) result.v[j] = from_float<O>(r);
      back.v[j] = from_float<A>(zero_accums ? 0.f : r);
    }
    if constexpr (kHasOut) store_pack(out + i, result);
    store_pack(accum + i, back);
  }
};

template <typename A, typename O, bool kHasOut>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const __grid_constant__ PairTable table, float factor,
                    const float* factor_tensor, bool zero_accums) {
  const float device_factor = factor_tensor != nullptr ? *factor_tensor : 1.f;
  for_each_work_item(table, [&](int t, int32_t w) {
    FinalizeOp<A, O, kHasOut> op{static_cast<A*>(table.ptr[0][t]),
                                 static_cast<O*>(table.ptr[1][t]), factor, device_factor,
                                 zero_accums};
    const ChunkBounds chunk = chunk_bounds(table, t, w);
    // Without outputs only the accumulator's alignment matters.
    const void* other = kHasOut ? static_cast<const void*>(op.out) : op.accum;
    run_chunk(op, chunk.begin, chunk.end,
              aligned_head<FinalizeOp<A, O, kHasOut>::kPack>(
                  op.accum, sizeof(A), other, kHasOut ? int(sizeof(O)) : int(sizeof(A))));
  });
}

// ---------------------------------------------------------------------------- host side

using AccumulateKernel = void (*)(PairTable, float, bool, Workspace);
using FinalizeKernel = void (*)(PairTable, float, const float*, bool);

AccumulateKernel accumulate_kernel_for(FaDtype grad, FaDtype accum) {
  if (accum == FaDtype::kFloat32) {
    switch (grad) {
      case FaDtype::kFloat32: return &accumulate_kernel<float, float>;
      case FaDtype::kBFloat16: return &accumulate_kernel<__nv_bfloat16, float>;
      case FaDtype::kFloat16: return &accumulate_kernel<__half, float>;
    }
  } else if (accum == grad) {
    switch (grad) {
      case FaDtype::kFloat32: return &accumulate_kernel<float, float>;
      case FaDtype::kBFloat16: return &accumulate_kernel<__nv_bfloat16, __nv_bfloat16>;
      case FaDtype::kFloat16: return &accumulate_kernel<__half, __half>;
    }
  }
  return nullptr;
}

template <typename A>
FinalizeKernel finalize_kernel_to(bool has_out, FaDtype out) {
  if (!has_out) return &finalize_kernel<A, A, false>;
  switch (out) {
    case FaDtype::kFloat32: return &finalize_kernel<A, float, true>;
    case FaDtype::kBFloat16: return &finalize_kernel<A, __nv_bfloat16, true>;
    case FaDtype::kFloat16: return &finalize_kernel<A, __half, true>;
  }
  return nullptr;
}

FinalizeKernel finalize_kernel_for(FaDtype accum, bool has_out, FaDtype out) {
  switch (accum) {
    case FaDtype::kFloat32: return finalize_kernel_to<float>(has_out, out);
    case FaDtype::kBFloat16: return finalize_kernel_to<__nv_bfloat16>(has_out, out);
    case FaDtype::kFloat16: return finalize_kernel_to<__half>(has_out, out);
  }
  return nullptr;
}

}  // namespace

int64_t fa_accumulate_workspace_floats(const FaAccumulateGroup* groups, int num_groups,
                                       int64_t num_tensors) {
  int64_t chunks = 0;
  for (int gi = 0; gi < num_groups; ++gi) {
    for (int64_t m = 0; m < groups[gi].count; ++m) chunks += chunks_of(groups[gi].numels[m]);
  }
  if (chunks > INT32_MAX) return -1;
  return 3 * chunks + 2 * num_tensors;
}

cudaError_t fa_accumulate_launch(const FaAccumulateGroup* groups, int num_groups,
                                 int64_t num_tensors, float scale, bool zero_grads,
                                 const FaAccumulateOutputs& out, cudaStream_t stream) {
  const int64_t floats = fa_accumulate_workspace_floats(groups, num_groups, num_tensors);
  if (floats < 0) return cudaErrorInvalidValue;
  const int64_t chunks = (floats - 2 * num_tensors) / 3;
  Workspace ws{out.workspace, out.workspace + chunks, out.workspace + 2 * chunks,
               out.workspace + 3 * chunks, out.workspace + 3 * chunks + num_tensors};
  int32_t partial_base = 0;
  for (int gi = 0; gi < num_groups; ++gi) {
    const FaAccumulateGroup& group = groups[gi];
    const AccumulateKernel kernel = accumulate_kernel_for(group.grad_dtype, group.accum_dtype);
    if (kernel == nullptr) return cudaErrorInvalidValue;
    void* const* const lists[2] = {group.grads, group.accums};
    const cudaError_t err = for_each_batch(
        group.count, lists, group.numels, group.slots, &partial_base,
        [&](const PairTable& table, int32_t items) {
          if (items > 0) {
            kernel<<<grid_for(items), kThreads, 0, stream>>>(table, scale, zero_grads, ws);
            const cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess) return e;
          }
          // Also for tensors without elements, so that every slot gets written.
          reduce_per_tensor_kernel<<<unsigned(table.count), kThreads, 0, stream>>>(
              table, out.grad_sumsq_per_tensor, ws);
          return cudaGetLastError();
        });
    if (err != cudaSuccess) return err;
  }
  reduce_totals_kernel<<<1, kThreads, 0, stream>>>(num_tensors, out.grad_sumsq_per_tensor, ws,
                                                   out.grad_sumsq, out.accum_sumsq,
                                                   out.found_nonfinite);
  return cudaGetLastError();
}

cudaError_t fa_finalize_launch(const FaFinalizeGroup* groups, int num_groups, float factor,
                               const float* factor_tensor, bool zero_accums,
                               cudaStream_t stream) {
  for (int gi = 0; gi < num_groups; ++gi) {
    const FaFinalizeGroup& group = groups[gi];
    const FinalizeKernel kernel =
        finalize_kernel_for(group.accum_dtype, group.outs != nullptr, group.out_dtype);
    if (kernel == nullptr) return cudaErrorInvalidValue;
    int32_t partial_base = 0;  // finalize keeps no partials; this only numbers work items
    void* const* const lists[2] = {group.accums, group.outs};
    const cudaError_t err = for_each_batch(
        group.count, lists, group.numels, nullptr, &partial_base,
        [&](const PairTable& table, int32_t items) {
          if (items == 0) return cudaSuccess;
          kernel<<<grid_for(items), kThreads, 0, stream>>>(table, factor, factor_tensor,
                                                          zero_accums);
          return cudaGetLastError();
        });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
