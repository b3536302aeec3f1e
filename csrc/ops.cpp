// The netmerge operator library: schemas and which kernel serves which device.
// Fake (meta) implementations live in Python (netmerge_fast/_ops.py) next to the op wrappers.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "ops.h"

TORCH_LIBRARY(netmerge, m) {
  m.def(
      "topk_gating(Tensor router_logits, int k, str scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_groups, str group_score, bool softmax_after_topk, float scale) -> (Tensor weights, Tensor ids)");
  // logits: one packed [B, sum C] tensor, or one [B, C_i] tensor per expert.
  m.def("logit_statistics(Tensor[] logits, int[] class_counts, str[] stats) -> Tensor");
  m.def(
      "combine_logits(Tensor[] logits, int[] class_counts, str method, Tensor? gate) "
      "-> (Tensor combined, Tensor winner)");
}

TORCH_LIBRARY_IMPL(netmerge, CPU, m) {
  m.impl("topk_gating", &netmerge::cpu::topk_gating);
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
