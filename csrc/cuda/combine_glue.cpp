// Torch glue of the CUDA logit_statistics and combine_logits: checks, outputs, and the launches of
// logit_statistics.cu / combine_logits.cu on the current stream. Compiled only with NETMERGE_WITH_CUDA.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/logit_statistics.h"
#include "ops.h"
#include "segment_layout.h"

namespace netmerge::cuda {
namespace {

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: return ElementType::kFloat32;  // segment_layout admits nothing else
  }
}

void check(cudaError_t error, const char* op) { TORCH_CHECK(error == cudaSuccess, op, ": ", cudaGetErrorString(error)); }

// The layout's experts in launch-sized tables.
std::vector<SegmentTable> tables_of(const SegmentLayout& layout) {
  const auto& segments = layout.segments;
  const int64_t E = static_cast<int64_t>(segments.size());
  std::vector<SegmentTable> tables;
  for (int64_t first = 0; first < E; first += kTableSize) {
    SegmentTable table{};
    table.size = static_cast<int32_t>(std::min<int64_t>(kTableSize, E - first));
    for (int32_t i = 0; i < table.size; ++i) {
      const Segment& s = segments[first + i];
      TORCH_CHECK(s.count <= std::numeric_limits<int32_t>::max(), "combine: an expert has too many classes");
      table.base[i] = s.base;
      table.row_stride[i] = s.row_stride;
      table.column[i] = s.column;
      table.count[i] = static_cast<int32_t>(s.count);
      table.expert[i] = static_cast<int32_t>(first + i);
      table.max_count = std::max(table.max_count, table.count[i]);
    }
    tables.push_back(table);
  }
  return tables;
}

// out[b][e][s] for every expert and every statistic in `codes`.
void launch_statistics(const SegmentLayout& layout, const std::vector<int32_t>& codes, float* out,
                       cudaStream_t stream, const char* op) {
  const int32_t experts = static_cast<int32_t>(layout.segments.size());
  const int32_t slots = static_cast<int32_t>(codes.size());
  for (const SegmentTable& table : tables_of(layout)) {
    for (int32_t first = 0; first < slots; first += kStatisticsPerLaunch) {
      StatisticList list{};
      list.size = std::min(kStatisticsPerLaunch, slots - first);
      list.first_slot = first;
      std::copy(codes.begin() + first, codes.begin() + first + list.size, list.code);
      check(launch_segment_statistics(element_type(layout.dtype), table, layout.rows, list, slots, experts, out,
                                      stream),
            op);
    }
  }
}

}  // namespace

at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts, at::ArrayRef<std::string> stats) {
  const std::vector<int32_t> codes = statistic_codes(stats, "logit_statistics");
  const SegmentLayout layout = segment_layout(logits, class_counts, c10::DeviceType::CUDA, "logit_statistics");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const int64_t E = static_cast<int64_t>(layout.segments.size()), S = static_cast<int64_t>(codes.size());
  auto out = at::empty({layout.rows, E, S}, logits[0].options().dtype(at::kFloat));
  launch_statistics(layout, codes, out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(), "logit_statistics");
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,
                                                  c10::string_view method, const std::optional<at::Tensor>& gate) {
  const CombinePlan plan = combine_plan(method, gate.has_value() && gate->scalar_type() == at::kBool);
  const SegmentLayout layout = segment_layout(logits, class_counts, c10::DeviceType::CUDA, "combine_logits");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const at::Tensor gate_f = gate_as_float(plan, gate, layout, logits[0]);
  const int64_t B = layout.rows, E = static_cast<int64_t>(layout.segments.size());
  auto combined = at::empty({B, layout.columns}, logits[0].options());
  auto winner = at::empty({B}, logits[0].options().dtype(at::kLong));
  if (B == 0) return {combined, winner};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t slots = static_cast<int32_t>(plan.stats.size());
  at::Tensor stats, row_value = at::empty({B}, logits[0].options().dtype(at::kFloat));
  if (slots > 0) {
    stats = at::empty({B, E, slots}, logits[0].options().dtype(at::kFloat));
    launch_statistics(layout, plan.stats, stats.data_ptr<float>(), stream, "combine_logits");
  }
  const float* stats_ptr = stats.defined() ? stats.const_data_ptr<float>() : nullptr;
  check(launch_select_winner(stats_ptr, slots, static_cast<int32_t>(plan.min_slot), B, static_cast<int32_t>(E),
                             plan.rule, gate_f.defined() ? gate_f.const_data_ptr<float>() : nullptr,
                             winner.data_ptr<int64_t>(), row_value.data_ptr<float>(), stream),
        "combine_logits");
  for (const SegmentTable& table : tables_of(layout)) {
    check(launch_assemble(element_type(layout.dtype), table, B, static_cast<int32_t>(E), plan.rule.kind, stats_ptr,
                          slots, winner.const_data_ptr<int64_t>(), row_value.const_data_ptr<float>(),
                          combined.data_ptr(), layout.columns, stream),
          "combine_logits");
  }
  return {combined, winner};
}

}  // namespace netmerge::cuda
