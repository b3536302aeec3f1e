// CUDA kernels of logit_statistics (and of the per-expert statistics combine_logits ranks by), running the passes
// of kernels/logit_statistics.h. Two kernels, by segment length:
//
//   short segments (<= kLongSegment logits): one group of lanes per (row, expert) segment, the group's lanes
//       striding over the segment and shuffles merging their accumulators; quartiles by bisection on
//       order-preserving keys (at most 8 keys per lane, every pass in L1).
//   long segments: one block per (row, expert) segment, 16-byte vector loads, block-wide merges; quartiles by
//       radix select: four passes of 8-bit digits, each a shared-memory histogram of the keys still candidates,
//       its bin found by one warp (instead of 32 bisection passes over the whole segment).
//
// Sums run in a different order from the CPU's (the results agree to rounding); order statistics are exact.
#include "cuda/segment_groups.cuh"

namespace netmerge::cuda {
namespace {

namespace K = netmerge::kernels;
using Math = K::ScalarMath;

// Segments longer than this get a block each.
constexpr int32_t kLongSegment = 256;
constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / kWarp;

// ---- short segments: groups of lanes ----

__device__ K::Moments<Math> merged(K::Moments<Math> m, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    K::Moments<Math> other;
    other.sum = __shfl_xor_sync(kFullMask, m.sum, offset);
    other.lo = __shfl_xor_sync(kFullMask, m.lo, offset);
    other.hi = __shfl_xor_sync(kFullMask, m.hi, offset);
    other.second = __shfl_xor_sync(kFullMask, m.second, offset);
    m.merge(other);
  }
  return m;
}

__device__ float group_add(float v, int lanes) {
  return group_reduce(v, lanes, [](float a, float b) { return a + b; });
}

template <typename T>
__device__ int64_t count_below(const T* x, int64_t n, int lane, int lanes, bool active, int32_t key) {
  long long count = 0;
  if (active)
    for (int64_t j = lane; j < n; j += lanes) count += K::ordered_key(load_float(x + j)) < key;
  return group_sum(count, lanes);
}

// The q = quarters / 4 quantile of the group's segment (every lane of the group gets it).
template <typename T>
__device__ float quartile(const T* x, int64_t n, int32_t quarters, int lane, int lanes, bool active) {
  const K::QuantileRank rank = K::quantile_rank(quarters, n);
  const int32_t lower = K::select_key(rank.lower, [&](int32_t key) {
    return count_below(x, n, lane, lanes, active, key);
  });
  // The next order statistic, even where the weight is 0: the groups of a warp differ in length (so in weight),
  // and every lane must take part in every shuffle.
  long long not_above = 0;
  int32_t smallest_above = INT32_MAX;
  if (active) {
    for (int64_t j = lane; j < n; j += lanes) {
      const int32_t key = K::ordered_key(load_float(x + j));
      not_above += key <= lower;
      smallest_above = key > lower && key < smallest_above ? key : smallest_above;
    }
  }
  not_above = group_sum(not_above, lanes);
  smallest_above = group_reduce(smallest_above, lanes, [](int32_t a, int32_t b) { return a < b ? a : b; });
  const int32_t upper = K::next_key(lower, rank.lower, not_above, smallest_above);
  return K::lerp_with_limits<Math>(K::key_value(lower), K::key_value(upper), rank.weight);
}

template <typename T>
__global__ void segment_statistics_kernel(SegmentTable table, int64_t rows, StatisticList stats, int32_t slots,
                                          int32_t experts, int lanes, float* out) {
  const K::Needs needs = K::needs_of(stats.code, stats.size);
  const int lane = threadIdx.x % lanes;
  for_each_group(rows * table.size, lanes, [&](int64_t group, bool active) {
    const int64_t b = active ? group / table.size : 0;
    const int e = active ? static_cast<int>(group % table.size) : 0;
    const int64_t n = active ? table.count[e] : 1;
    const T* x = static_cast<const T*>(table.base[e]) + b * table.row_stride[e];

    K::SegmentSummary<Math> s;
    s.n = n;
    s.moments = K::Moments<Math>::empty();
    if (active) {
      for (int64_t j = lane; j < n; j += lanes) {
        if (needs.second) {
          s.moments.add_with_second(load_float(x + j));
        } else {
          s.moments.add(load_float(x + j));
        }
      }
    }
    s.moments = merged(s.moments, lanes);
    if (needs.deviations) {
      const float mean = s.moments.mean(n);
      s.deviations = K::Deviations<Math>::empty();
      if (active)
        for (int64_t j = lane; j < n; j += lanes) s.deviations.add(load_float(x + j), mean);
      s.deviations.m2 = group_add(s.deviations.m2, lanes);
    }
    if (needs.softmax) {
      s.softmax = K::SoftmaxSums<Math>::empty();
      if (active)
        for (int64_t j = lane; j < n; j += lanes) s.softmax.add(load_float(x + j), s.moments.hi);
      s.softmax.z = group_add(s.softmax.z, lanes);
      s.softmax.s = group_add(s.softmax.s, lanes);
    }
    for (int32_t q = 1; q <= 3; ++q) {
      s.quartile[q] = needs.quartile[q] ? quartile(x, n, q, lane, lanes, active) : K::quiet_nan();
    }
    if (active && lane == 0) {
      float* dst = out + (b * experts + table.expert[e]) * slots + stats.first_slot;
      for (int32_t i = 0; i < stats.size; ++i) dst[i] = K::finish_statistic<Math>(stats.code[i], s);
    }
  });
}

// ---- long segments: a block each ----

// Calls f(value) for this thread's share of x[0, n): a scalar head up to 16-byte alignment, 16-byte vectors, a
// scalar tail. Every thread of the block must call it (it assumes blockDim.x threads share the segment).
template <typename T, typename F>
__device__ void for_each_value(const T* x, int64_t n, F f) {
  constexpr int kPerVector = 16 / sizeof(T);
  const auto address = reinterpret_cast<uintptr_t>(x);
  int64_t head = static_cast<int64_t>((16 - (address & 15)) & 15) / static_cast<int64_t>(sizeof(T));
  head = head < n ? head : n;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(load_float(x + j));
  const int64_t vectors = (n - head) / kPerVector;
  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const uint4 raw = body[i];
    const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int u = 0; u < kPerVector; ++u) f(load_float(values + u));
  }
  for (int64_t j = head + vectors * kPerVector + threadIdx.x; j < n; j += blockDim.x) f(load_float(x + j));
}

// An accumulator of Real fields (kernels/logit_statistics.h) merged across the block, in warp order; every thread
// gets the result. `shared` holds kBlockWarps + 1 of them.
template <typename Acc>
__device__ Acc block_merge(Acc a, Acc* shared) {
  constexpr int kFields = sizeof(Acc) / sizeof(float);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Acc other;
    const float* mine = reinterpret_cast<const float*>(&a);
    float* theirs = reinterpret_cast<float*>(&other);
#pragma unroll
    for (int f = 0; f < kFields; ++f) theirs[f] = __shfl_xor_sync(kFullMask, mine[f], offset);
    a.merge(other);
  }
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) shared[warp] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = shared[0];
    for (int w = 1; w < kBlockWarps; ++w) total.merge(shared[w]);
    shared[kBlockWarps] = total;
  }
  __syncthreads();
  const Acc total = shared[kBlockWarps];
  __syncthreads();  // `shared` is free again
  return total;
}

// Block-wide (sum, min) of (count, key).
__device__ void block_count_and_min(long long* count, int32_t* key, long long* shared_count, int32_t* shared_key) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    *count += __shfl_xor_sync(kFullMask, *count, offset);
    const int32_t other = __shfl_xor_sync(kFullMask, *key, offset);
    *key = other < *key ? other : *key;
  }
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    shared_count[warp] = *count;
    shared_key[warp] = *key;
  }
  __syncthreads();
  *count = 0;
  *key = INT32_MAX;
  for (int w = 0; w < kBlockWarps; ++w) {
    *count += shared_count[w];
    *key = shared_key[w] < *key ? shared_key[w] : *key;
  }
  __syncthreads();
}

struct RadixShared {
  unsigned histogram[K::kRadixBins];
  long long rank;
  int digit;
  long long count[kBlockWarps];
  int32_t key[kBlockWarps];
};

// The rank-th smallest key of the block's segment: kernels/logit_statistics.h's radix select, each pass's
// histogram built by the whole block in shared memory and its bin found by warp 0 (8 bins a lane).
template <typename T>
__device__ int32_t block_select_key(const T* x, int64_t n, int64_t rank, RadixShared& shared) {
  uint32_t prefix = 0;
  for (int pass = 0; pass < K::kRadixPasses; ++pass) {
    for (int d = threadIdx.x; d < K::kRadixBins; d += blockDim.x) shared.histogram[d] = 0;
    __syncthreads();
    for_each_value(x, n, [&](float v) {
      const uint32_t bits = K::radix_bits(K::ordered_key(v));
      if (K::radix_candidate(bits, prefix, pass)) atomicAdd(&shared.histogram[K::radix_digit(bits, pass)], 1u);
    });
    __syncthreads();
    if (threadIdx.x < kWarp) {
      constexpr int kBinsPerLane = K::kRadixBins / kWarp;
      const int lane = threadIdx.x;
      unsigned long long mine = 0;
#pragma unroll
      for (int i = 0; i < kBinsPerLane; ++i) mine += shared.histogram[lane * kBinsPerLane + i];
      unsigned long long inclusive = mine;
      for (int offset = 1; offset < kWarp; offset *= 2) {
        const unsigned long long up = __shfl_up_sync(kFullMask, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      // The first lane whose bins reach past the rank holds it (the candidates outnumber the rank).
      const unsigned reaching = __ballot_sync(kFullMask, inclusive > static_cast<unsigned long long>(rank));
      if (lane == __ffs(reaching) - 1) {
        int64_t within = rank - static_cast<int64_t>(inclusive - mine);
        shared.digit = lane * kBinsPerLane + K::radix_bin(shared.histogram + lane * kBinsPerLane, kBinsPerLane, &within);
        shared.rank = within;
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(shared.digit) << (24 - 8 * pass);
    rank = shared.rank;
    __syncthreads();  // the histogram and the results are free again
  }
  return K::radix_key(prefix);
}

template <typename T>
__device__ float block_quartile(const T* x, int64_t n, int32_t quarters, RadixShared& shared) {
  const K::QuantileRank rank = K::quantile_rank(quarters, n);
  const int32_t lower = block_select_key(x, n, rank.lower, shared);
  int32_t upper = lower;
  if (rank.weight > 0.f) {  // the same for the whole block
    long long not_above = 0;
    int32_t smallest_above = INT32_MAX;
    for_each_value(x, n, [&](float v) {
      const int32_t key = K::ordered_key(v);
      not_above += key <= lower;
      smallest_above = key > lower && key < smallest_above ? key : smallest_above;
    });
    block_count_and_min(&not_above, &smallest_above, shared.count, shared.key);
    upper = K::next_key(lower, rank.lower, not_above, smallest_above);
  }
  return K::lerp_with_limits<Math>(K::key_value(lower), K::key_value(upper), rank.weight);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    long_segment_statistics_kernel(SegmentTable table, int64_t rows, StatisticList stats, int32_t slots,
                                   int32_t experts, float* out) {
  __shared__ K::Moments<Math> moments_shared[kBlockWarps + 1];
  __shared__ K::Deviations<Math> deviations_shared[kBlockWarps + 1];
  __shared__ K::SoftmaxSums<Math> softmax_shared[kBlockWarps + 1];
  __shared__ RadixShared radix;
  const K::Needs needs = K::needs_of(stats.code, stats.size);
  for (int64_t segment = blockIdx.x; segment < rows * table.size; segment += gridDim.x) {
    const int64_t b = segment / table.size;
    const int e = static_cast<int>(segment % table.size);
    const int64_t n = table.count[e];
    const T* x = static_cast<const T*>(table.base[e]) + b * table.row_stride[e];

    K::SegmentSummary<Math> s;
    s.n = n;
    K::Moments<Math> moments = K::Moments<Math>::empty();
    if (needs.second) {
      for_each_value(x, n, [&](float v) { moments.add_with_second(v); });
    } else {
      for_each_value(x, n, [&](float v) { moments.add(v); });
    }
    s.moments = block_merge(moments, moments_shared);
    if (needs.deviations) {
      const float mean = s.moments.mean(n);
      K::Deviations<Math> deviations = K::Deviations<Math>::empty();
      for_each_value(x, n, [&](float v) { deviations.add(v, mean); });
      s.deviations = block_merge(deviations, deviations_shared);
    }
    if (needs.softmax) {
      const float hi = s.moments.hi;
      K::SoftmaxSums<Math> softmax = K::SoftmaxSums<Math>::empty();
      for_each_value(x, n, [&](float v) { softmax.add(v, hi); });
      s.softmax = block_merge(softmax, softmax_shared);
    }
    const bool has_nan = s.moments.hi != s.moments.hi;  // every statistic is NaN: no order statistics needed
    for (int32_t q = 1; q <= 3; ++q) {
      s.quartile[q] = needs.quartile[q] && !has_nan ? block_quartile(x, n, q, radix) : K::quiet_nan();
    }
    if (threadIdx.x == 0) {
      float* dst = out + (b * experts + table.expert[e]) * slots + stats.first_slot;
      for (int32_t i = 0; i < stats.size; ++i) dst[i] = K::finish_statistic<Math>(stats.code[i], s);
    }
  }
}

// The entries of `table` whose segments are (not) longer than kLongSegment.
SegmentTable part_of(const SegmentTable& table, bool long_segments) {
  SegmentTable part{};
  for (int32_t i = 0; i < table.size; ++i) {
    if ((table.count[i] > kLongSegment) != long_segments) continue;
    const int32_t at = part.size++;
    part.base[at] = table.base[i];
    part.row_stride[at] = table.row_stride[i];
    part.column[at] = table.column[i];
    part.count[at] = table.count[i];
    part.expert[at] = table.expert[i];
    part.max_count = part.max_count > table.count[i] ? part.max_count : table.count[i];
  }
  return part;
}

template <typename T>
cudaError_t launch(const SegmentTable& table, int64_t rows, const StatisticList& stats, int32_t slots,
                   int32_t experts, float* out, cudaStream_t stream) {
  const SegmentTable short_part = part_of(table, false), long_part = part_of(table, true);
  if (short_part.size > 0) {
    const int lanes = group_lanes(short_part.max_count);
    segment_statistics_kernel<T><<<grid_for(rows * short_part.size, lanes), kThreads, 0, stream>>>(
        short_part, rows, stats, slots, experts, lanes, out);
  }
  if (long_part.size > 0) {
    const int64_t segments = rows * long_part.size;
    const unsigned blocks = static_cast<unsigned>(segments < (1 << 20) ? segments : (1 << 20));
    long_segment_statistics_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(long_part, rows, stats, slots, experts,
                                                                            out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_segment_statistics(ElementType type, const SegmentTable& table, int64_t rows,
                                      const StatisticList& stats, int32_t slots, int32_t experts, float* out,
                                      cudaStream_t stream) {
  if (rows == 0 || table.size == 0) return cudaSuccess;
  switch (type) {
    case ElementType::kFloat32: return launch<float>(table, rows, stats, slots, experts, out, stream);
    case ElementType::kFloat16: return launch<__half>(table, rows, stats, slots, experts, out, stream);
    case ElementType::kBFloat16: return launch<__nv_bfloat16>(table, rows, stats, slots, experts, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace netmerge::cuda
