// Declarations of the backend implementations registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace netmerge::cpu {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                               bool renormalize, const std::optional<at::Tensor>& bias,
                                               int64_t num_groups, int64_t topk_groups,
                                               c10::string_view group_score, bool softmax_after_topk,
                                               double scale);

at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts, at::ArrayRef<std::string> stats);
std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,
                                                  c10::string_view method, const std::optional<at::Tensor>& gate);

}  // namespace netmerge::cpu

namespace netmerge::cuda {

at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts, at::ArrayRef<std::string> stats);
std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,
                                                  c10::string_view method, const std::optional<at::Tensor>& gate);

}  // namespace netmerge::cuda
