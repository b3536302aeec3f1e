// Direct Python entries for the ops a decode step calls once per layer, where the call itself is most of the cost.
// torch.ops parses each call's arguments against the op's schema in Python's binding (about 3 us for these ops'
// 10-14 arguments, against ~0.3 us of routing one token); these entries take pybind11's typed arguments and call
// the same registered op through the C++ dispatcher, so every dispatch key still applies (Python modes, fake
// tensors, profiling). Not traceable by torch.compile: the Python wrappers use them only in eager mode and for
// plain tensors (no __torch_function__ overrides), and torch.ops otherwise.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace {

namespace py = pybind11;
using Tensor = at::Tensor;
using MaybeTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TopkGating = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, std::string_view, bool, const MaybeTensor&,
                                              int64_t, int64_t, std::string_view, bool, double);
using MoeExperts = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, std::string_view, bool,
                                                              const MaybeTensor&, const MaybeTensor&, bool, bool,
                                                              bool);
using MoeExpertsPacked = Tensor(const Tensor&, const Tensor&, const Tensor&, const MaybeTensor&, const MaybeTensor&,
                                int64_t, int64_t, const Tensor&, const Tensor&, std::string_view, bool,
                                const MaybeTensor&, const MaybeTensor&, bool);

}  // namespace

namespace netmerge {

void bind_python_calls(py::module_& m) {
  // The kernels run without the GIL, as under torch.ops (other Python threads go on meanwhile).
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "topk_gating",
      [](const Tensor& logits, int64_t k, std::string_view scoring, bool renormalize, const MaybeTensor& bias,
         int64_t num_groups, int64_t topk_groups, std::string_view group_score, bool softmax_after_topk,
         double scale) {
        static const auto op = handle<TopkGating>("netmerge::topk_gating");
        return op.call(logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score,
                       softmax_after_topk, scale);
      },
      "torch.ops.netmerge.topk_gating, called directly (same arguments)", no_gil);
  m.def(
      "moe_experts",
      [](const Tensor& hidden, const Tensor& w_gate_up, const Tensor& w_down, const Tensor& topk_weights,
         const Tensor& topk_ids, std::string_view activation, bool gated, const MaybeTensor& b_gate_up,
         const MaybeTensor& b_down, bool apply_weights_on_input, bool save_gate_up, bool gate_up_interleaved) {
        static const auto op = handle<MoeExperts>("netmerge::moe_experts");
        return op.call(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down,
                       apply_weights_on_input, save_gate_up, gate_up_interleaved);
      },
      "torch.ops.netmerge.moe_experts, called directly (same arguments)", no_gil);
  m.def(
      "moe_experts_packed",
      [](const Tensor& hidden, const Tensor& gate_up, const Tensor& down, const MaybeTensor& gate_up_scales,
         const MaybeTensor& down_scales, int64_t intermediate, int64_t group_size, const Tensor& topk_weights,
         const Tensor& topk_ids, std::string_view activation, bool gated, const MaybeTensor& b_gate_up,
         const MaybeTensor& b_down, bool apply_weights_on_input) {
        static const auto op = handle<MoeExpertsPacked>("netmerge::moe_experts_packed");
        return op.call(hidden, gate_up, down, gate_up_scales, down_scales, intermediate, group_size, topk_weights,
                       topk_ids, activation, gated, b_gate_up, b_down, apply_weights_on_input);
      },
      "torch.ops.netmerge.moe_experts_packed, called directly (same arguments)", no_gil);
}

}  // namespace netmerge
