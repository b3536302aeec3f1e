// Launchers of the logit_statistics / combine_logits CUDA kernels: plain C++ types, raw pointers and a stream,
// so that the .cu files compile with nvcc alone and the torch glue (combine_glue.cpp) needs no CUDA syntax.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/logit_statistics.h"

namespace netmerge::cuda {

enum class ElementType : int32_t { kFloat32, kFloat16, kBFloat16 };

// Up to kTableSize experts per launch, passed by value as a kernel parameter: no device-side table to allocate
// or copy (so launches are CUDA-graph safe); more experts take several launches. Sized to keep every kernel's
// parameters under the 4 KB limit of sm_80 (a table is 3,080 bytes).
constexpr int32_t kTableSize = 96;

struct SegmentTable {
  const void* base[kTableSize];  // row 0, first column; columns are contiguous
  int64_t row_stride[kTableSize];  // elements
  int64_t column[kTableSize];      // first column in the packed output row
  int32_t count[kTableSize];       // classes
  int32_t expert[kTableSize];      // index among all experts
  int32_t size;                    // experts in this table
  int32_t max_count;
};

// Statistics computed by one launch; a longer list takes several launches.
constexpr int32_t kStatisticsPerLaunch = 32;

struct StatisticList {
  int32_t code[kStatisticsPerLaunch];  // kernels::Statistic
  int32_t size;
  int32_t first_slot;  // where code[0] goes in the output's last dimension
};

// out[b][expert[e]][first_slot + s] (row stride experts * slots, expert stride slots) for the table's experts and
// every row b < rows.
cudaError_t launch_segment_statistics(ElementType type, const SegmentTable& table, int64_t rows,
                                      const StatisticList& stats, int32_t slots, int32_t experts, float* out,
                                      cudaStream_t stream);

// Per row: the winner (-1 for none) and the row's value for the assembly: the winner's minimum (selecting
// methods), the total of the experts' sums (overall_ratio). stats is [rows][experts][slots] as written above,
// gate [rows][experts] float32 (0/1 for a claims mask).
cudaError_t launch_select_winner(const float* stats, int32_t slots, int32_t min_slot, int64_t rows,
                                 int32_t experts, kernels::CombineRule rule, const float* gate, int64_t* winner,
                                 float* row_value, cudaStream_t stream);

// The combined logits of the table's experts: out[b * columns + column] in the logits' type.
cudaError_t launch_assemble(ElementType type, const SegmentTable& table, int64_t rows, int32_t experts,
                            kernels::CombineKind kind, const float* stats, int32_t slots, const int64_t* winner,
                            const float* row_value, void* out, int64_t columns, cudaStream_t stream);

}  // namespace netmerge::cuda
