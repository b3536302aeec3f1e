// Device helpers shared by the logit_statistics / combine_logits kernels: loads of every logits type as float,
// and "groups": L consecutive lanes of a warp (L a power of two, L <= 32) that share one (row, expert) segment.
//
// Every lane of a warp runs the same number of loop iterations and shuffles (lanes without a segment take part
// with empty accumulators), so the full-warp shuffles are always legal.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/logit_statistics.h"

namespace netmerge::cuda {

__device__ inline float load_float(const float* p) { return *p; }
__device__ inline float load_float(const __half* p) { return __half2float(*p); }
__device__ inline float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Lanes per segment: enough that each lane reads about 8 logits, at most a warp.
inline int32_t group_lanes(int32_t max_count) {
  int32_t lanes = 1;
  while (lanes < kWarp && lanes * 8 < max_count) lanes *= 2;
  return lanes;
}

// Reductions across a group, leaving the result in every lane of it (xor butterfly within aligned groups).
template <typename V, typename Op>
__device__ V group_reduce(V v, int lanes, Op op) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
__device__ inline long long group_sum(long long v, int lanes) {
  return group_reduce(v, lanes, [](long long a, long long b) { return a + b; });
}

// Calls body(group, active) for every group slot of the grid: group g covers (row g / table.size, expert
// g % table.size) of the table; `active` is false for the padding slots past the end.
template <typename Body>
__device__ void for_each_group(int64_t groups, int lanes, Body body) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t per_warp = kWarp / lanes;
  const int64_t lane_group = (threadIdx.x % kWarp) / lanes;
  for (int64_t first = warp * per_warp; first < groups; first += warps * per_warp) {
    const int64_t group = first + lane_group;
    body(group, group < groups);
  }
}

// Enough blocks of kThreads to give every group its lanes once (the loop above covers the rest).
constexpr int kThreads = 256;
inline unsigned grid_for(int64_t groups, int lanes) {
  const int64_t threads = groups * lanes;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace netmerge::cuda
