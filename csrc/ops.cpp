// The netmerge operator library: schemas and which kernel serves which device.
// Fake (meta) implementations live in Python (netmerge_fast/_ops.py) next to the op wrappers.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "ops.h"

TORCH_LIBRARY(netmerge, m) {
  m.def(
      "topk_gating(Tensor router_logits, int k, str scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_groups, str group_score, bool softmax_after_topk, float scale) -> (Tensor weights, Tensor ids)");
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_size) -> (Tensor sorted_token_ids, "
      "Tensor expert_offsets, Tensor block_expert_ids, Tensor padded_length)");
  m.def(
      "moe_experts(Tensor hidden, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, Tensor topk_ids, "
      "str activation, bool gated, Tensor? b_gate_up, Tensor? b_down, bool apply_weights_on_input, "
      "bool save_gate_up, bool gate_up_interleaved=False) -> "
      "(Tensor out, Tensor sorted_token_ids, Tensor expert_offsets, Tensor gate_up)");
  m.def(
      "apply_capacity(Tensor topk_ids, Tensor? priority, int num_experts, int capacity, str order, "
      "int group_size) -> (Tensor ids, Tensor dropped)");
  m.def("grouped_mm(Tensor x, Tensor w, Tensor expert_offsets) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor a, Tensor b, Tensor expert_offsets) -> Tensor");
  // logits: one packed [B, sum C] tensor, or one [B, C_i] tensor per expert.
  m.def("logit_statistics(Tensor[] logits, int[] class_counts, str[] stats) -> Tensor");
  m.def(
      "combine_logits(Tensor[] logits, int[] class_counts, str method, Tensor? gate) "
      "-> (Tensor combined, Tensor winner)");
}

TORCH_LIBRARY_IMPL(netmerge, CPU, m) {
  m.impl("topk_gating", &netmerge::cpu::topk_gating);
  m.impl("moe_align", &netmerge::cpu::moe_align);
  m.impl("moe_experts", &netmerge::cpu::moe_experts);
  m.impl("apply_capacity", &netmerge::cpu::apply_capacity);
  m.impl("grouped_mm", &netmerge::cpu::grouped_mm);
  m.impl("grouped_mm_weight_grad", &netmerge::cpu::grouped_mm_weight_grad);
  m.impl("logit_statistics", &netmerge::cpu::logit_statistics);
  m.impl("combine_logits", &netmerge::cpu::combine_logits);
}

#ifdef NETMERGE_WITH_CUDA
TORCH_LIBRARY_IMPL(netmerge, CUDA, m) {
  m.impl("logit_statistics", &netmerge::cuda::logit_statistics);
  m.impl("combine_logits", &netmerge::cuda::combine_logits);
}
#endif

// Importing the module runs the registrations above; it exposes nothing itself.
PYBIND11_MODULE(_C, m) {
  m.doc() = "netmerge_fast native ops, reached through torch.ops.netmerge";
#ifdef NETMERGE_WITH_CUDA
  m.attr("cuda_built") = true;  // the CUDA dispatch key has kernels (netmerge_fast._backends reads this)
#else
  m.attr("cuda_built") = false;
#endif
}
