// Declarations of the backend implementations registered in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

namespace netmerge::cpu {

// The kernels with SIMD code, compiled once per instruction set (CMakeLists.txt) into netmerge::cpu::<isa>;
// ops.cpp registers, for each, a function that calls the build cpu/isa.h selects.
#define NETMERGE_CPU_ISA_KERNELS                                                                                   \
  std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k, c10::string_view scoring,    \
                                                 bool renormalize, const std::optional<at::Tensor>& bias,          \
                                                 int64_t num_groups, int64_t topk_groups,                          \
                                                 c10::string_view group_score, bool softmax_after_topk,            \
                                                 double scale);                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts(                                          \
      const at::Tensor& hidden, const at::Tensor& w_gate_up, const at::Tensor& w_down,                             \
      const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation, bool gated,         \
      const std::optional<at::Tensor>& b_gate_up, const std::optional<at::Tensor>& b_down,                        \
      bool apply_weights_on_input, bool save_gate_up, bool gate_up_interleaved);                                   \
  at::Tensor moe_experts_packed(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,      \
                                const std::optional<at::Tensor>& gate_up_scales,                                   \
                                const std::optional<at::Tensor>& down_scales, int64_t intermediate,                \
                                int64_t group_size, const at::Tensor& topk_weights, const at::Tensor& topk_ids,    \
                                c10::string_view activation, bool gated, const std::optional<at::Tensor>& b_gate_up, \
                                const std::optional<at::Tensor>& b_down, bool apply_weights_on_input);            \
  at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets);              \
  at::Tensor grouped_mm_weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets);  \
  at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts,                                 \
                              at::ArrayRef<std::string> stats);                                                    \
  std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,          \
                                                    c10::string_view method,                                      \
                                                    const std::optional<at::Tensor>& gate);                        \
  double fma_peak(double seconds);

namespace baseline {
NETMERGE_CPU_ISA_KERNELS
}
namespace avx2 {
NETMERGE_CPU_ISA_KERNELS
}
namespace avx512 {
NETMERGE_CPU_ISA_KERNELS
}
#undef NETMERGE_CPU_ISA_KERNELS

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& topk_ids, int64_t num_experts,
                                                                     int64_t block_size);

std::tuple<at::Tensor, at::Tensor> apply_capacity(const at::Tensor& topk_ids, const std::optional<at::Tensor>& priority,
                                                  int64_t num_experts, int64_t capacity, c10::string_view order,
                                                  int64_t group_size);

}  // namespace netmerge::cpu

namespace netmerge::cuda {

at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts, at::ArrayRef<std::string> stats);
std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,
                                                  c10::string_view method, const std::optional<at::Tensor>& gate);

}  // namespace netmerge::cuda
