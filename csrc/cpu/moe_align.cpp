// CPU launcher of moe_align: one counting pass and one placing pass over the T * k slots (sequential: the
// work is a few instructions per slot, less than waking a second thread would cost at any realistic T).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <vector>

#include "kernels/moe_align.h"
#include "ops.h"

namespace netmerge::cpu {

namespace K = netmerge::kernels;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_align(const at::Tensor& topk_ids, int64_t num_experts,
                                                                     int64_t block_size) {
  TORCH_CHECK(!at::isFloatingType(topk_ids.scalar_type()), "moe_align: topk_ids must be an integer tensor");
  TORCH_CHECK(num_experts >= 1, "moe_align: num_experts must be >= 1");
  TORCH_CHECK(block_size >= 0, "moe_align: block_size must be >= 0 (0: no padding)");
  const auto ids = topk_ids.contiguous();
  const int64_t slots = ids.numel(), E = num_experts;
  const int64_t capacity = block_size > 0 ? slots + E * (block_size - 1) : slots;
  TORCH_CHECK(capacity < (int64_t{1} << 31), "moe_align: too many token slots for int32 indices");

  std::vector<int64_t> counts(E + 1), starts(E + 2), cursor(E + 1);
  auto int32 = ids.options().dtype(at::kInt);
  auto offsets = at::empty({E + 1}, int32);
  auto sorted = at::empty({slots}, int32);
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "moe_align_cpu", [&] {
    const scalar_t* id_ptr = ids.const_data_ptr<scalar_t>();
    K::count_slots(id_ptr, slots, E, counts.data());
    K::segment_starts(counts.data(), E, starts.data());
    K::place_slots(id_ptr, slots, E, starts.data(), cursor.data(), sorted.data_ptr<int32_t>(),
                   static_cast<int32_t*>(nullptr));
  });
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t e = 0; e <= E; ++e) off[e] = static_cast<int32_t>(starts[e]);
  if (block_size == 0) return {sorted, offsets, at::empty({0}, int32), at::empty({0}, int32)};

  // Padded layout: expert e's slots start at a multiple of block_size; padding holds the sentinel `slots`.
  auto padded = at::full({capacity}, slots, int32);
  auto block_expert = at::full({capacity / block_size}, -1, int32);
  int32_t* padded_ptr = padded.data_ptr<int32_t>();
  int32_t* block_ptr = block_expert.data_ptr<int32_t>();
  const int32_t* sorted_ptr = sorted.const_data_ptr<int32_t>();
  int64_t at_ = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = 0; r < counts[e]; ++r) padded_ptr[at_ + r] = sorted_ptr[starts[e] + r];
    const int64_t end = at_ + K::round_up(counts[e], block_size);
    for (int64_t b = at_ / block_size; b < end / block_size; ++b) block_ptr[b] = static_cast<int32_t>(e);
    at_ = end;
  }
  auto padded_length = at::full({1}, at_, int32);
  return {padded, offsets, block_expert, padded_length};
}

}  // namespace netmerge::cpu
