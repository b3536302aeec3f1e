// What moe_experts and moe_experts_packed share on CPU: the activations (vectorised), the permutation of the
// token slots by expert, cached scratch buffers, and the weighted combine. Compiled into each instruction-set
// build (netmerge::cpu::<isa>).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <array>
#include <vector>

#include "kernels/moe_activation.h"
#include "kernels/moe_align.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace moe {

namespace K = netmerge::kernels;
using K::Activation;

inline Activation parse_activation(c10::string_view name, bool gated) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(name == "swiglu_oai", "moe_experts: unknown activation ", name);
  TORCH_CHECK(gated, "moe_experts: swiglu_oai needs gated=True");
  return Activation::kSwigluOai;
}

template <typename V>
V act(Activation a, V x) {
  using T = typename V::value_type;
  switch (a) {
    case Activation::kSilu:
      return x / (V(T(1)) + x.neg().exp());
    case Activation::kGelu:
      return V(T(0.5)) * x * (V(T(1)) + (x * V(T(K::kSqrtHalf))).erf());
    case Activation::kGeluTanh: {
      const V inner = V(T(K::kSqrtTwoOverPi)) * (x + V(T(K::kGeluTanhCubic)) * x * x * x);
      return V(T(0.5)) * x * (V(T(1)) + inner.tanh());
    }
    case Activation::kRelu:
      return at::vec::maximum(x, V(T(0)));
    default:
      TORCH_CHECK(false, "moe_experts: swiglu_oai is gated only");
  }
}

template <typename V>
V gated_act(Activation a, V gate, V up) {
  using T = typename V::value_type;
  if (a != Activation::kSwigluOai) return act(a, gate) * up;
  const V limit(T(K::kSwigluOaiLimit));
  const V g = at::vec::minimum(gate, limit);
  const V u = at::vec::clamp(up, limit.neg(), limit);
  return (u + V(T(1))) * g / (V(T(1)) + (g * V(T(K::kSwigluOaiAlpha))).neg().exp());
}

// Intermediate buffers that outlive the call, one set per calling thread: a fresh multi-megabyte allocation
// costs a page fault per 4 KB on every call, as much as the activation pass itself. Beyond kScratchBytes a
// buffer is allocated per call instead, so one huge batch does not pin its memory for the process's lifetime.
constexpr int64_t kScratchBytes = int64_t{256} << 20;

// Scratch slot `slot` itself: a 1-D buffer of at least n elements, for callers that only need its memory (no view
// is made: a narrow and a view cost ~2 us a call, and a decode step of a layer makes three).
inline at::Tensor scratch_buffer(int slot, int64_t n, const at::TensorOptions& options) {
  const int64_t need = std::max<int64_t>(n, 1);
  if (need * static_cast<int64_t>(options.dtype().itemsize()) > kScratchBytes) return at::empty({need}, options);
  thread_local std::array<at::Tensor, 4> cache;
  at::Tensor& buffer = cache[slot];
  // A buffer made under torch.inference_mode is an inference tensor, which ATen refuses to write outside it (and
  // the reverse holds for a normal one inside it, as views): one made in the other mode is replaced.
  const bool inference = c10::InferenceMode::is_enabled();
  if (!buffer.defined() || buffer.numel() < need || buffer.dtype() != options.dtype() ||
      buffer.is_inference() != inference)
    buffer = at::empty({need}, options);
  return buffer;
}

// Scratch slot `slot` as a [rows, cols] tensor.
inline at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return scratch_buffer(slot, rows * cols, options).narrow(0, 0, rows * cols).view({rows, cols});
}

// The T * k slots grouped by expert with one stable counting sort (increasing slot index within an expert).
struct Permutation {
  at::Tensor ids;       // [T, k] int32: topk_ids, contiguous
  at::Tensor sorted;    // [T * k] int32: slot ids, expert by expert; slots routed nowhere (-1) last
  at::Tensor position;  // [T * k] int32: where each slot went
  at::Tensor offsets;   // [E + 1] int32
  std::vector<int64_t> starts;      // the same offsets on the host, E + 2 values
  std::vector<int32_t> row_expert;  // [rows]: the expert of each sorted row
  int64_t rows = 0;                 // slots routed to an expert
};

// Raises the Python API's ValueError unless every id is in [-1, E). Checked in the ids' own integer type, before
// the narrowing to int32 could wrap a bad id into the range.
inline void check_expert_ids(const at::Tensor& ids, int64_t E) {
  const auto scan = [&](auto tag) {
    using id_t = decltype(tag);
    const id_t* p = ids.const_data_ptr<id_t>();
    const int64_t n = ids.numel();
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) bad |= (p[i] < -1) | (p[i] >= E);
    if (!bad) return;
    const auto [low, high] = std::minmax_element(p, p + n);
    TORCH_CHECK_VALUE(false, "topk_ids must be in [-1, E=", E, ") (-1: routed nowhere), got values in [", *low, ", ",
                      *high, "]");
  };
  if (ids.scalar_type() == at::kInt) {
    scan(int32_t{});
  } else {
    scan(int64_t{});
  }
}

// topk_ids [T, k] (any integer type) checked, as int32, and its slots sorted by expert.
inline Permutation permute(const at::Tensor& topk_ids, int64_t E, const at::TensorOptions& options) {
  Permutation p;
  const bool int32_or_64 = topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong;
  const at::Tensor given = int32_or_64 ? topk_ids.contiguous() : topk_ids.to(at::kLong).contiguous();
  check_expert_ids(given, E);
  p.ids = given.to(at::kInt);  // no-op for contiguous int32 ids (no flattening view: only the memory is read)
  const int32_t* ids = p.ids.const_data_ptr<int32_t>();
  const int64_t slots = p.ids.numel();
  std::vector<int64_t> counts(E + 1), cursor(E + 1);
  p.starts.resize(E + 2);
  auto int32 = options.dtype(at::kInt);
  p.sorted = at::empty({slots}, int32);
  p.position = at::empty({slots}, int32);
  p.offsets = at::empty({E + 1}, int32);
  K::count_slots(ids, slots, E, counts.data());
  K::segment_starts(counts.data(), E, p.starts.data());
  K::place_slots(ids, slots, E, p.starts.data(), cursor.data(), p.sorted.data_ptr<int32_t>(),
                 p.position.data_ptr<int32_t>());
  int32_t* offsets = p.offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(p.starts[e]);
  p.rows = p.starts[E];
  p.row_expert.resize(p.rows);
  for (int64_t e = 0; e < E; ++e)
    std::fill(p.row_expert.begin() + p.starts[e], p.row_expert.begin() + p.starts[e + 1], static_cast<int32_t>(e));
  return p;
}

// out[t] = sum over t's slots, in slot order, of weight * (y[position] + b_down[e]) in opmath precision, no
// atomics. y: [rows, H] expert outputs in sorted order (scalar_t, or float holding scalar_t-rounded values).
template <typename scalar_t, typename y_t>
void combine(const y_t* y, const scalar_t* b_down, const int32_t* ids, const int32_t* position,
             const at::opmath_type<scalar_t>* weights, bool weights_applied, int64_t T, int64_t k, int64_t H,
             scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<opmath_t>;
  constexpr int64_t L = V::size();
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(H * k, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<opmath_t> acc(at::divup(H, L) * L);
    std::vector<opmath_t> row(acc.size()), bias_row(H);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j, e = ids[slot];
        if (e < 0) continue;
        at::vec::convert(y + static_cast<int64_t>(position[slot]) * H, row.data(), H);
        if (b_down) {
          at::vec::convert(b_down + e * H, bias_row.data(), H);
          for (int64_t h = 0; h < H; ++h) row[h] += bias_row[h];
        }
        const V w(weights_applied ? opmath_t(1) : weights[slot]);
        for (int64_t h = 0; h < H; h += L)
          at::vec::fmadd(V::loadu(row.data() + h), w, V::loadu(acc.data() + h)).store(acc.data() + h);
      }
      at::vec::convert(acc.data(), out + t * H, H);
    }
  });
}

}  // namespace moe
}  // namespace netmerge::cpu::NETMERGE_ISA
