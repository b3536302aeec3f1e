// The netmerge operator library: schemas and which kernel serves which device.
// Fake (meta) implementations live in Python (netmerge_fast/_ops.py) next to the op wrappers.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "ops.h"

TORCH_LIBRARY(netmerge, m) {
  m.def(
      "topk_gating(Tensor router_logits, int k, str scoring, bool renormalize, Tensor? bias, int num_groups, "
      "int topk_groups, str group_score, bool softmax_after_topk, float scale) -> (Tensor weights, Tensor ids)");
}

TORCH_LIBRARY_IMPL(netmerge, CPU, m) { m.impl("topk_gating", &netmerge::cpu::topk_gating); }

// Importing the module runs the registrations above; it exposes nothing itself.
PYBIND11_MODULE(_C, m) { m.doc() = "netmerge_fast native ops, reached through torch.ops.netmerge"; }
