// CPU launcher of moe_experts: permute -> grouped GEMM (gate/up) -> fused activation -> grouped GEMM (down)
// -> weighted combine, every step in C++ and parallel, no loop over experts outside a parallel region.
//
// 1. One counting sort groups the T * k slots by expert (stable: increasing slot index within an expert).
// 2. The rows of each expert are gathered into one contiguous block (scaled by the routing weight when it
//    applies to the input), so every expert's GEMM reads a plain [rows, H] slice.
// 3. gate_up = rows @ w_gate_up[e]^T, per expert (cpu/grouped_gemm.cpp). The weights are read by strides:
//    the nn.Linear layout or its transpose (GPT-OSS's storage) as they are, without a copy.
// 4. Bias and activation in one vectorised pass, in opmath precision (float, or double for double). Gate and
//    up columns are concatenated ([gate; up]) or interleaved (gate = even columns, up = odd: GPT-OSS).
// 5. y = act @ w_down[e]^T, per expert.
// 6. out[t] = sum over t's slots, in slot order, of weight * (y + b_down): float accumulation, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "cpu/grouped_gemm.h"
#include "cpu/moe_common.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using namespace moe;

// Rows [r0, r1) of gate_up (+ bias, written back: the backward needs the pre-activation) -> act.
template <typename scalar_t>
void activate_rows(scalar_t* gate_up, const scalar_t* bias, const int32_t* row_expert, int64_t r0, int64_t r1,
                   int64_t I, bool gated, bool interleaved, Activation a, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<opmath_t>;
  constexpr int64_t L = V::size();
  const int64_t width = gated ? 2 * I : I;
  std::vector<opmath_t> buf(at::divup(width, L) * L + L, opmath_t(0)), bias_buf(width), res(I);
  std::vector<opmath_t> split(interleaved ? 2 * I : 0);
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* row = gate_up + r * width;
    const scalar_t* b = bias ? bias + static_cast<int64_t>(row_expert[r]) * width : nullptr;
    at::vec::convert(row, buf.data(), width);
    if (b) {
      // Round the biased pre-activation as a separate add would, so the saved value is what act() sees.
      at::vec::convert(b, bias_buf.data(), width);
      for (int64_t i = 0; i < width; ++i) buf[i] += bias_buf[i];
      at::vec::convert(buf.data(), row, width);
      at::vec::convert(row, buf.data(), width);
    }
    opmath_t* g = buf.data();
    opmath_t* u = gated ? buf.data() + I : nullptr;
    if (interleaved) {  // gate = even columns, up = odd columns
      for (int64_t i = 0; i < I; ++i) split[i] = buf[2 * i], split[I + i] = buf[2 * i + 1];
      g = split.data(), u = split.data() + I;
    }
    for (int64_t i = 0; i < I; i += L) {
      const int64_t n = std::min(L, I - i);
      const V gv = V::loadu(g + i, n);
      const V y = gated ? gated_act(a, gv, V::loadu(u + i, n)) : act(a, gv);
      y.store(res.data() + i, n);
    }
    at::vec::convert(res.data(), out + r * I, I);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts(
    const at::Tensor& hidden, const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& topk_weights,
    const at::Tensor& topk_ids, c10::string_view activation, bool gated, const std::optional<at::Tensor>& b_gate_up,
    const std::optional<at::Tensor>& b_down, bool apply_weights_on_input, bool save_gate_up,
    bool gate_up_interleaved) {
  TORCH_CHECK(hidden.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3, "moe_experts: bad ranks");
  const int64_t T = hidden.size(0), H = hidden.size(1), E = w_gate_up.size(0), I = w_down.size(2);
  const int64_t width = gated ? 2 * I : I;
  TORCH_CHECK(w_gate_up.size(1) == width && w_gate_up.size(2) == H, "moe_experts: w_gate_up must be [E, 2I|I, H]");
  TORCH_CHECK(w_down.size(0) == E && w_down.size(1) == H, "moe_experts: w_down must be [E, H, I]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
              "moe_experts: topk_weights and topk_ids must be [T, k]");
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(w_gate_up.scalar_type() == dtype && w_down.scalar_type() == dtype,
              "moe_experts: weights must have hidden's dtype");
  const Activation a = parse_activation(activation, gated);
  TORCH_CHECK(!gate_up_interleaved || gated, "moe_experts: gate_up_interleaved needs gated=True");
  const int64_t k = topk_ids.size(1), slots = T * k;

  const auto x = hidden.contiguous();
  // Rows or columns of unit stride (the nn.Linear layout, or its transpose) are read in place.
  const auto in_place = [](const at::Tensor& w) { return w.stride(2) == 1 || w.stride(1) == 1; };
  const auto wgu = in_place(w_gate_up) ? w_gate_up : w_gate_up.contiguous();
  const auto wd = in_place(w_down) ? w_down : w_down.contiguous();
  const auto weights = topk_weights.contiguous().to(hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor bgu, bd;
  if (b_gate_up) bgu = b_gate_up->to(dtype).contiguous();
  if (b_down) bd = b_down->to(dtype).contiguous();

  // 1. Permutation: sorted slot ids, each slot's row, each row's expert.
  const Permutation perm = permute(topk_ids, E, hidden.options());
  const int32_t* id_ptr = perm.ids.const_data_ptr<int32_t>();
  const int64_t rows = perm.rows;
  const auto& starts = perm.starts;
  const auto& sorted = perm.sorted;
  const auto& offsets = perm.offsets;

  auto out = at::empty({T, H}, hidden.options());
  // The backward needs the pre-activation of every slot (zero for slots routed nowhere); inference does not.
  auto gate_up = save_gate_up ? at::empty({slots, width}, hidden.options()) : scratch(0, rows, width, hidden.options());
  if (save_gate_up) gate_up.narrow(0, rows, slots - rows).zero_();
  if (T == 0) return {out, sorted, offsets, gate_up.narrow(0, 0, save_gate_up ? slots : 0)};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "moe_experts_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const opmath_t* w_ptr = weights.const_data_ptr<opmath_t>();
    const int32_t* sorted_ptr = sorted.const_data_ptr<int32_t>();

    // 2. Gather (and scale) the rows.
    auto xs = scratch(1, rows, H, hidden.options());
    scalar_t* xs_ptr = xs.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t slot = sorted_ptr[r];
        const scalar_t* src = x_ptr + (slot / k) * H;
        scalar_t* dst = xs_ptr + r * H;
        if (apply_weights_on_input) {
          const opmath_t w = w_ptr[slot];
          for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(static_cast<opmath_t>(src[h]) * w);
        } else {
          std::copy(src, src + H, dst);
        }
      }
    });

    // 3-5. Expert MLPs.
    grouped_gemm(xs, wgu, starts.data(), gate_up);
    auto hidden_act = scratch(2, rows, I, hidden.options());
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), [&](int64_t r0, int64_t r1) {
      activate_rows(gate_up.data_ptr<scalar_t>(), bgu.defined() ? bgu.const_data_ptr<scalar_t>() : nullptr,
                    perm.row_expert.data(), r0, r1, I, gated, gate_up_interleaved, a, hidden_act.data_ptr<scalar_t>());
    });
    auto y = scratch(3, rows, H, hidden.options());
    grouped_gemm(hidden_act, wd, starts.data(), y);

    // 6. Combine, slot order per token.
    combine(y.const_data_ptr<scalar_t>(), bd.defined() ? bd.const_data_ptr<scalar_t>() : nullptr, id_ptr,
            perm.position.const_data_ptr<int32_t>(), w_ptr, apply_weights_on_input, T, k, H,
            out.data_ptr<scalar_t>());
  });
  return {out, sorted, offsets, save_gate_up ? gate_up : at::empty({0, width}, hidden.options())};
}

}  // namespace netmerge::cpu::NETMERGE_ISA
