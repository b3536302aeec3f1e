// CUDA kernel of logit_statistics (and of the per-expert statistics combine_logits ranks by): one group of lanes
// per (row, expert) segment, running the passes of kernels/logit_statistics.h with the group's lanes striding
// over the segment's logits and shuffles merging their accumulators. Quartiles by bisection on order-preserving
// keys: 32 counting passes each, whatever the values and the segment's length.
#include "cuda/segment_groups.cuh"

namespace netmerge::cuda {
namespace {

namespace K = netmerge::kernels;
using Math = K::ScalarMath;

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
      float* dst = out + (b * experts + table.first_expert + e) * slots + stats.first_slot;
      for (int32_t i = 0; i < stats.size; ++i) dst[i] = K::finish_statistic<Math>(stats.code[i], s);
    }
  });
}

template <typename T>
cudaError_t launch(const SegmentTable& table, int64_t rows, const StatisticList& stats, int32_t slots,
                   int32_t experts, float* out, cudaStream_t stream) {
  const int lanes = group_lanes(table.max_count);
  const int64_t groups = rows * table.size;
  segment_statistics_kernel<T>
      <<<grid_for(groups, lanes), kThreads, 0, stream>>>(table, rows, stats, slots, experts, lanes, out);
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
