// Declarations of the backend implementations registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace netmerge::cpu {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                               bool renormalize, const std::optional<at::Tensor>& bias,
                                               int64_t num_groups, int64_t topk_groups,
                                               c10::string_view group_score, bool softmax_after_topk,
                                               double scale);

}  // namespace netmerge::cpu
