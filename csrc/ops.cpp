// The netmerge operator library: schemas and which kernel serves which device.
// Fake (meta) implementations live in Python (netmerge_fast/_ops.py) next to the op wrappers.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "cpu/isa.h"
#include "ops.h"

namespace {

namespace cpu = netmerge::cpu;

// The build of a CPU kernel for the active instruction set; levels that were not built fall back to the one below.
#if defined(NETMERGE_BUILT_avx512)
#define NETMERGE_CPU(name) &cpu::IsaDispatch<&cpu::baseline::name, &cpu::avx2::name, &cpu::avx512::name>::call
#elif defined(NETMERGE_BUILT_avx2)
#define NETMERGE_CPU(name) &cpu::IsaDispatch<&cpu::baseline::name, &cpu::avx2::name, &cpu::avx2::name>::call
#else
#define NETMERGE_CPU(name) &cpu::baseline::name
#endif

}  // namespace

namespace netmerge {
void bind_python_calls(pybind11::module_& m);  // csrc/python_calls.cpp
}

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
  // Expert weights packed by netmerge_fast.pack_experts (the layout is in the shapes and dtypes; see dispatch.py).
  m.def(
      "moe_experts_packed(Tensor hidden, Tensor gate_up, Tensor down, Tensor? gate_up_scales, Tensor? down_scales, "
      "int intermediate, int group_size, Tensor topk_weights, Tensor topk_ids, str activation, bool gated, "
      "Tensor? b_gate_up, Tensor? b_down, bool apply_weights_on_input) -> Tensor");
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
  m.impl("topk_gating", NETMERGE_CPU(topk_gating));
  m.impl("moe_align", &cpu::moe_align);
  m.impl("moe_experts", NETMERGE_CPU(moe_experts));
  m.impl("moe_experts_packed", NETMERGE_CPU(moe_experts_packed));
  m.impl("apply_capacity", &cpu::apply_capacity);
  m.impl("grouped_mm", NETMERGE_CPU(grouped_mm));
  m.impl("grouped_mm_weight_grad", NETMERGE_CPU(grouped_mm_weight_grad));
  m.impl("logit_statistics", NETMERGE_CPU(logit_statistics));
  m.impl("combine_logits", NETMERGE_CPU(combine_logits));
}

#ifdef NETMERGE_WITH_CUDA
TORCH_LIBRARY_IMPL(netmerge, CUDA, m) {
  m.impl("logit_statistics", &netmerge::cuda::logit_statistics);
  m.impl("combine_logits", &netmerge::cuda::combine_logits);
}
#endif

// Importing the module runs the registrations above. It exposes the CPU kernels' instruction set (for
// netmerge_fast._backends and the tests), the register-only FMA rate (for the benchmarks) and direct entries
// for the per-token ops (csrc/python_calls.cpp).
PYBIND11_MODULE(_C, m) {
  m.doc() = "netmerge_fast native ops, reached through torch.ops.netmerge";
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("detected_cpu_isa", [] { return std::string(cpu::isa_name(cpu::detected_isa())); });
  m.def("set_cpu_isa", &cpu::set_cpu_isa, "Cap the CPU kernels' instruction set: auto, baseline, avx2, avx512, "
        "avx512_bf16 (no higher than detected_cpu_isa())");
  m.def("fma_peak", NETMERGE_CPU(fma_peak), pybind11::arg("seconds") = 0.2,
        "FLOP/s of register-only float32 FMA chains on every thread (the machine's arithmetic peak)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  netmerge::bind_python_calls(m);
#ifdef NETMERGE_WITH_CUDA
  m.attr("cuda_built") = true;  // the CUDA dispatch key has kernels (netmerge_fast._backends reads this)
#else
  m.attr("cuda_built") = false;
#endif
}
