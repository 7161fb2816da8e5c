// Multi-tensor apply for fastaccum's CUDA kernels (accumulate.cu, optim_step.cu): the tensor
// table passed in kernel arguments, the (tensor, chunk) work items, and the chunk walk with
// 16-byte packed loads and stores. Plain CUDA, included by .cu files only.
//
// - Each tensor is cut into chunks of kChunk elements; a work item is one (tensor, chunk).
// - Up to kMaxTensorsPerLaunch tensors travel in the kernel arguments (a TensorTable of 16 to
//   25 KB; CUDA 12.1+ allows 32764 bytes of parameters), so there is no host-to-device table
//   copy. Longer lists take several launches.
// - Blocks walk work items with a grid-stride loop and find their tensor by binary search in
//   the table's chunk prefix sums.
// - Inside a chunk: 16-byte packed loads and stores where every tensor of the work item can
//   be 16-byte aligned at the same element, scalar code for the rest (a tensor may start at
//   any element offset of its storage).
//
// Everything here is inline or a template in a named namespace: each .cu file gets the
// same definitions, and a file that does not use one gets no unused-function warning.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace fa_multi_tensor {

inline constexpr int kThreads = 256;  // threads per block, every kernel
// 16 Ki elements per work item: large enough that the per-item overhead (tensor lookup,
// block reduction) is noise, small enough that 124M-element models give thousands of items
// and the tail of the last wave stays short. A multiple of every pack width, so chunk
// starts keep a tensor's alignment.
inline constexpr int64_t kChunk = 16384;
inline constexpr int kUnroll = 4;  // packs each thread has in flight before it computes
inline constexpr int kMaxTensorsPerLaunch = 512;
// The grid-stride loop makes any grid correct; this cap only bounds the launch size.
inline constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// The tensors of one launch: kLists pointers per tensor (ptr[l][t] is list l's tensor t, or
// nullptr where a list is absent). Chunks of tensor t are work items
// [chunk_start[t], chunk_start[t + 1]). Kernels that reduce write their per-item partials to
// workspace slots partial_base + work item and the tensor's results to position slot[t] of
// the call; the others leave both zero.
template <int kLists>
struct TensorTable {
  void* ptr[kLists][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int32_t chunk_start[kMaxTensorsPerLaunch + 1];
  int32_t slot[kMaxTensorsPerLaunch];
  int32_t count;
  int32_t partial_base;
};
// Kernel parameters are limited to 32764 bytes; keep room for the scalar arguments.
template <int kLists>
inline constexpr bool kFitsKernelParams = sizeof(TensorTable<kLists>) + 256 <= 32764;

// ------------------------------------------------------------------------- element access

// N elements of T moved as 16-byte words (N * sizeof(T) is a multiple of 16).
template <typename T, int N>
struct alignas(16) Pack {
  static_assert(N * sizeof(T) % 16 == 0, "a pack must be whole 16-byte words");
  T v[N];
};

// kStreaming marks data read once (gradients): evict-first, so it does not push the
// accumulators out of L2.
template <bool kStreaming, typename T, int N>
__device__ __forceinline__ void load_pack(const T* src, Pack<T, N>& dst) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(&dst);
#pragma unroll
  for (int w = 0; w < int(sizeof(dst) / 16); ++w) d[w] = kStreaming ? __ldcs(s + w) : s[w];
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& src) {
  const uint4* s = reinterpret_cast<const uint4*>(&src);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int w = 0; w < int(sizeof(src) / 16); ++w) d[w] = s[w];
}

// First element index h < N at which both x (elements of xsize bytes) and y are 16-byte
// aligned, or -1 when there is none (then the pair takes the scalar path). Pass y = x when
// there is only one tensor.
template <int N>
__device__ __forceinline__ int aligned_head(const void* x, int xsize, const void* y,
                                            int ysize) {
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x);
  const uintptr_t ya = reinterpret_cast<uintptr_t>(y);
#pragma unroll
  for (int h = 0; h < N; ++h) {
    if ((xa + uintptr_t(h) * xsize) % 16 == 0 && (ya + uintptr_t(h) * ysize) % 16 == 0) {
      return h;
    }
  }
  return -1;
}

// --------------------------------------------------------------------------- chunk walk

// The tensor whose chunks contain work item w: the last t with chunk_start[t] <= w
// (tensors without elements have an empty range and are never returned).
template <typename Table>
__device__ __forceinline__ int find_tensor(const Table& table, int32_t w) {
  int lo = 0;
  int hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.chunk_start[mid] <= w) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Elements [begin, end) of tensor t that work item w covers.
struct ChunkBounds {
  int64_t begin;
  int64_t end;
};
template <typename Table>
__device__ __forceinline__ ChunkBounds chunk_bounds(const Table& table, int t, int32_t w) {
  const int64_t begin = int64_t{w - table.chunk_start[t]} * kChunk;
  const int64_t numel = table.numel[t];
  return {begin, numel - begin < kChunk ? numel : begin + kChunk};
}

// Calls f(t, w) for the work items w of this block (grid-stride), t being w's tensor.
template <typename Table, typename F>
__device__ __forceinline__ void for_each_work_item(const Table& table, F&& f) {
  const int32_t items = table.chunk_start[table.count];
  for (int32_t w = blockIdx.x; w < items; w += gridDim.x) f(find_tensor(table, w), w);
}

// Applies `op` to elements [begin, end) of one tensor: Op::scalar(i) on the misaligned
// head and the tail, Op::load(i) / Op::store(i, loaded) on aligned packs of Op::kPack
// elements, starting at begin + head (head < 0: no aligned packs). kUnroll loads are issued
// before the first store so that each thread keeps several 16-byte requests in flight
// (stores to the same tensors stop the compiler from reordering loads across them by
// itself).
template <typename Op>
__device__ __forceinline__ void run_chunk(Op& op, int64_t begin, int64_t end, int head) {
  constexpr int N = Op::kPack;
  int64_t vbegin = end;
  int64_t vend = end;
  if (head >= 0) {
    vbegin = begin + head < end ? begin + head : end;
    vend = vbegin + (end - vbegin) / N * N;
  }
  for (int64_t i = begin + threadIdx.x; i < vbegin; i += kThreads) op.scalar(i);
  const int64_t npack = (vend - vbegin) / N;
  for (int64_t base = threadIdx.x; base < npack; base += int64_t{kThreads} * kUnroll) {
    typename Op::Loaded loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + int64_t{u} * kThreads;
      if (k < npack) op.load(vbegin + k * N, loaded[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + int64_t{u} * kThreads;
      if (k < npack) op.store(vbegin + k * N, loaded[u]);
    }
  }
  for (int64_t i = vend + threadIdx.x; i < end; i += kThreads) op.scalar(i);
}

// ---------------------------------------------------------------------------- host side

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline unsigned grid_for(int32_t items) {
  return unsigned(items < kMaxBlocks ? items : kMaxBlocks);
}

// Fills `table` with members [first, first + table.count) of the caller's lists (lists[l]
// may be null: that list is absent; slots may be null). Returns false when the chunk
// indices would overflow int32.
template <int kLists, typename P>
bool fill_table(TensorTable<kLists>& table, P* const* const (&lists)[kLists],
                const int64_t* numels, const int64_t* slots, int64_t first,
                int32_t partial_base) {
  int64_t chunks = 0;
  table.partial_base = partial_base;
  for (int32_t t = 0; t < table.count; ++t) {
    const int64_t m = first + t;
    for (int l = 0; l < kLists; ++l) {
      table.ptr[l][t] = lists[l] != nullptr ? lists[l][m] : nullptr;
    }
    table.numel[t] = numels[m];
    table.slot[t] = slots != nullptr ? int32_t(slots[m]) : 0;
    table.chunk_start[t] = int32_t(chunks);
    chunks += chunks_of(numels[m]);
    if (int64_t{partial_base} + chunks > INT32_MAX) return false;
  }
  table.chunk_start[table.count] = int32_t(chunks);
  return true;
}

// Invokes launch(table, work items) for consecutive batches of at most kMaxTensorsPerLaunch
// of the `count` tensors of `lists`, numbering work items from *partial_base on (advanced
// past them). Returns the first error launch returns, or cudaErrorInvalidValue when the
// work item indices would overflow int32.
template <int kLists, typename P, typename Launch>
cudaError_t for_each_batch(int64_t count, P* const* const (&lists)[kLists],
                           const int64_t* numels, const int64_t* slots, int32_t* partial_base,
                           Launch launch) {
  TensorTable<kLists> table;  // up to ~25 KB; each launch copies it into the kernel's params
  for (int64_t first = 0; first < count; first += kMaxTensorsPerLaunch) {
    const int64_t left = count - first;
    table.count = int32_t(left < kMaxTensorsPerLaunch ? left : kMaxTensorsPerLaunch);
    if (!fill_table(table, lists, numels, slots, first, *partial_base)) {
      return cudaErrorInvalidValue;
    }
    const int32_t items = table.chunk_start[table.count];
    const cudaError_t err = launch(table, items);
    if (err != cudaSuccess) return err;
    *partial_base += items;
  }
  return cudaSuccess;
}

}  // namespace fa_multi_tensor
