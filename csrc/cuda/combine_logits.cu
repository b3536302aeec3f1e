// CUDA kernels of combine_logits, after the per-expert statistics (logit_statistics.cu): one thread per row
// picks the winner with the rules of kernels/logit_statistics.h, then one group of lanes per (row, expert)
// writes that expert's slots of the combined row.
#include "cuda/segment_groups.cuh"

namespace netmerge::cuda {
namespace {

namespace K = netmerge::kernels;
using Math = K::ScalarMath;

__global__ void select_winner_kernel(const float* stats, int32_t slots, int32_t min_slot, int64_t rows,
                                     int32_t experts, K::CombineRule rule, const float* gate, int64_t* winner,
                                     float* row_value) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < rows; b += step) {
    const float* row_stats = stats + b * experts * slots;
    float chosen = -1.f, value = 0.f;
    if (rule.kind == K::kSelect || rule.kind == K::kGateScores) {
      auto selection = K::Selection<Math>::empty();
      for (int32_t e = 0; e < experts; ++e) {
        const float c = rule.kind == K::kSelect ? row_stats[e * slots] : gate[b * experts + e];
        selection.consider(static_cast<float>(e), c, rule.lower_wins);
      }
      chosen = selection.winner;
    } else if (rule.kind == K::kGateClaims) {
      auto claims = K::Claims<Math>::empty();
      for (int32_t e = 0; e < experts; ++e) claims.consider(static_cast<float>(e), gate[b * experts + e] != 0.f);
      chosen = claims.winner();
    } else if (rule.kind == K::kOverallRatio) {
      for (int32_t e = 0; e < experts; ++e) value += row_stats[e * slots];
    }
    const int64_t w = static_cast<int64_t>(chosen);
    if (w >= 0) value = row_stats[w * slots + min_slot];
    winner[b] = w;
    row_value[b] = value;
  }
}

template <typename T>
__global__ void assemble_kernel(SegmentTable table, int64_t rows, int32_t experts, K::CombineKind kind,
                                const float* stats, int32_t slots, const int64_t* winner, const float* row_value,
                                T* out, int64_t columns, int lanes) {
  const int lane = threadIdx.x % lanes;
  for_each_group(rows * table.size, lanes, [&](int64_t group, bool active) {
    if (!active) return;
    const int64_t b = group / table.size;
    const int e = static_cast<int>(group % table.size);
    const int64_t n = table.count[e], w = winner[b];
    const T* x = static_cast<const T*>(table.base[e]) + b * table.row_stride[e];
    T* dst = out + b * columns + table.column[e];
    if (kind == K::kRatio || kind == K::kOverallRatio) {
      // IEEE division (not the fast-math approximation, nor a multiplication by the inverse): the same rounding
      // as the other backends.
      const float divisor = kind == K::kRatio ? stats[(b * experts + table.expert[e]) * slots] : row_value[b];
      for (int64_t j = lane; j < n; j += lanes) dst[j] = from_float<T>(__fdiv_rn(load_float(x + j), divisor));
    } else if (w < 0 || w == table.expert[e]) {
      for (int64_t j = lane; j < n; j += lanes) dst[j] = x[j];
    } else {
      const T fill = from_float<T>(row_value[b]);  // the winner's minimum: exact in T
      for (int64_t j = lane; j < n; j += lanes) dst[j] = fill;
    }
  });
}

template <typename T>
cudaError_t launch(const SegmentTable& table, int64_t rows, int32_t experts, K::CombineKind kind,
                   const float* stats, int32_t slots, const int64_t* winner, const float* row_value, void* out,
                   int64_t columns, cudaStream_t stream) {
  const int lanes = group_lanes(table.max_count);
  const int64_t groups = rows * table.size;
  assemble_kernel<T><<<grid_for(groups, lanes), kThreads, 0, stream>>>(
      table, rows, experts, kind, stats, slots, winner, row_value, static_cast<T*>(out), columns, lanes);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_select_winner(const float* stats, int32_t slots, int32_t min_slot, int64_t rows,
                                 int32_t experts, K::CombineRule rule, const float* gate, int64_t* winner,
                                 float* row_value, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  select_winner_kernel<<<grid_for(rows, 1), kThreads, 0, stream>>>(stats, slots, min_slot, rows, experts, rule,
                                                                   gate, winner, row_value);
  return cudaGetLastError();
}

cudaError_t launch_assemble(ElementType type, const SegmentTable& table, int64_t rows, int32_t experts,
                            K::CombineKind kind, const float* stats, int32_t slots, const int64_t* winner,
                            const float* row_value, void* out, int64_t columns, cudaStream_t stream) {
  if (rows == 0 || table.size == 0) return cudaSuccess;
  switch (type) {
    case ElementType::kFloat32:
      return launch<float>(table, rows, experts, kind, stats, slots, winner, row_value, out, columns, stream);
    case ElementType::kFloat16:
      return launch<__half>(table, rows, experts, kind, stats, slots, winner, row_value, out, columns, stream);
    case ElementType::kBFloat16:
      return launch<__nv_bfloat16>(table, rows, experts, kind, stats, slots, winner, row_value, out, columns,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace netmerge::cuda
