// Where each expert's logits are, from the ops' arguments: the same checks and description for the CPU launcher
// and the CUDA glue. `logits` is one packed [B, sum C] tensor, or one [B, C_i] tensor per expert.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/logit_statistics.h"

namespace netmerge {

// One expert's logits: row b starts at base + b * row_stride (elements); its columns are contiguous.
struct Segment {
  const char* base;
  int64_t row_stride;
  int64_t count;
  int64_t column;  // first column in the packed row
};

struct SegmentLayout {
  std::vector<Segment> segments;
  int64_t rows = 0, columns = 0, max_count = 0, element_size = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<at::Tensor> owned;  // contiguous copies of inputs with strided columns
};

// The op's arguments, checked again here (the Python API validates them first, with friendlier messages).
inline SegmentLayout segment_layout(at::TensorList logits, at::IntArrayRef class_counts, c10::DeviceType device,
                                    const char* op) {
  TORCH_CHECK(!logits.empty() && !class_counts.empty(), op, ": needs at least one expert");
  const bool packed = logits.size() == 1;
  TORCH_CHECK(packed || logits.size() == class_counts.size(), op,
              ": logits must be one packed tensor or one tensor per class count");
  SegmentLayout layout;
  layout.dtype = logits[0].scalar_type();
  TORCH_CHECK(layout.dtype == at::kFloat || layout.dtype == at::kHalf || layout.dtype == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16");
  layout.rows = logits[0].size(0);
  layout.element_size = logits[0].element_size();
  std::vector<at::Tensor> tensors;
  for (const auto& t : logits) {
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == layout.dtype && t.size(0) == layout.rows &&
                    t.device() == logits[0].device() && t.device().type() == device,
                op, ": every logits tensor must be 2-D, on the same ", c10::DeviceTypeName(device),
                " device, with the same dtype and rows");
    tensors.push_back(t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t);
    if (!tensors.back().is_same(t)) layout.owned.push_back(tensors.back());
  }
  int64_t column = 0;
  for (size_t e = 0; e < class_counts.size(); ++e) {
    const int64_t count = class_counts[e];
    TORCH_CHECK(count >= 1, op, ": every class count must be >= 1");
    const at::Tensor& t = tensors[packed ? 0 : e];
    TORCH_CHECK(packed || t.size(1) == count, op, ": tensor ", e, " has ", t.size(1), " columns, class count ", count);
    const int64_t offset = packed ? column : 0;
    layout.segments.push_back({static_cast<const char*>(t.const_data_ptr()) + offset * layout.element_size,
                               t.stride(0), count, column});
    column += count;
    layout.max_count = std::max(layout.max_count, count);
  }
  TORCH_CHECK(!packed || column == tensors[0].size(1), op, ": class counts sum to ", column,
              " but the packed logits have ", tensors[0].size(1), " columns");
  layout.columns = column;
  return layout;
}

// Statistic names -> kernels::Statistic codes; unknown names are an error.
inline std::vector<int32_t> statistic_codes(at::ArrayRef<std::string> names, const char* op) {
  std::vector<int32_t> codes;
  for (const auto& name : names) {
    const int32_t code = kernels::statistic_code(name);
    TORCH_CHECK(code >= 0, op, ": unknown statistic '", name, "'");
    codes.push_back(code);
  }
  TORCH_CHECK(!codes.empty(), op, ": needs at least one statistic");
  return codes;
}

// What combine_logits computes per expert for a method: the selecting criterion and the minimum (the winner-
// takes-all fill), or the sum (ratios).
struct CombinePlan {
  kernels::CombineRule rule;
  std::vector<int32_t> stats;  // per expert, in this order
  int64_t min_slot = -1;       // where the expert's minimum logit is in `stats`
};

inline CombinePlan combine_plan(c10::string_view method, bool gate_is_bool) {
  namespace K = kernels;
  bool known = false;
  CombinePlan plan;
  plan.rule = K::combine_rule(std::string_view(method.data(), method.size()), gate_is_bool, &known);
  TORCH_CHECK(known, "combine_logits: unknown method '", std::string(method), "'");
  switch (plan.rule.kind) {
    case K::kRatio:
    case K::kOverallRatio: plan.stats = {K::kSum}; break;
    case K::kSelect: plan.stats = {plan.rule.criterion, K::kMin}, plan.min_slot = 1; break;
    case K::kGateScores:
    case K::kGateClaims: plan.stats = {K::kMin}, plan.min_slot = 0; break;
    case K::kConcat: break;
  }
  return plan;
}

// The gate as float32 [B, E] (a boolean mask as 0/1), checked against the layout; undefined if not needed.
inline at::Tensor gate_as_float(const CombinePlan& plan, const std::optional<at::Tensor>& gate,
                                const SegmentLayout& layout, const at::Tensor& logits) {
  const bool uses_gate = plan.rule.kind == kernels::kGateScores || plan.rule.kind == kernels::kGateClaims;
  TORCH_CHECK(uses_gate == gate.has_value(), "combine_logits: a gate is needed by, and only by, method 'gate'");
  if (!uses_gate) return {};
  const int64_t E = static_cast<int64_t>(layout.segments.size());
  TORCH_CHECK(gate->dim() == 2 && gate->size(0) == layout.rows && gate->size(1) == E &&
                  gate->device() == logits.device(),
              "combine_logits: gate must be [B, E] = [", layout.rows, ", ", E, "] on the logits' device");
  return gate->to(at::kFloat).contiguous();
}

}  // namespace netmerge
