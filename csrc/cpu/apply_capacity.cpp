// CPU launcher of apply_capacity.
//
// Token order is one pass with a running count per expert; past 64K slots the slots are cut into chunks counted
// in parallel, and a prefix over the chunks gives each chunk its experts' starting counts. Score order groups
// the slots by expert with moe_align's stable counting sort, then each over-full expert selects its `capacity`
// best keys (kernels/apply_capacity.h: distinct, so the selected set is exact) with nth_element, experts in
// parallel. Both write only the dropped slots over a copy of the ids.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "kernels/apply_capacity.h"
#include "kernels/moe_align.h"
#include "ops.h"

namespace netmerge::cpu {
namespace {

namespace K = netmerge::kernels;
constexpr int64_t kChunk = 1 << 16;

template <typename id_t>
void token_order(const id_t* ids, int64_t slots, int64_t E, int64_t capacity, id_t* out, int64_t* total) {
  const int64_t chunks = std::min<int64_t>(at::divup(slots, kChunk), at::get_num_threads());
  const int64_t per_chunk = at::divup(slots, std::max<int64_t>(chunks, 1));
  // seen[c][e]: slots of expert e before chunk c (after the prefix below).
  std::vector<int64_t> seen((chunks + 1) * E, 0);
  auto routed = [E](int64_t id) { return id >= 0 && id < E; };
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* count = seen.data() + (c + 1) * E;
      for (int64_t s = c * per_chunk; s < std::min(slots, (c + 1) * per_chunk); ++s) {
        const int64_t id = static_cast<int64_t>(ids[s]);
        if (routed(id)) ++count[id];
      }
    }
  });
  for (int64_t c = 1; c <= chunks; ++c)
    for (int64_t e = 0; e < E; ++e) seen[c * E + e] += seen[(c - 1) * E + e];
  for (int64_t e = 0; e < E; ++e) total[e] = seen[chunks * E + e];
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* count = seen.data() + c * E;
      for (int64_t s = c * per_chunk; s < std::min(slots, (c + 1) * per_chunk); ++s) {
        const int64_t id = static_cast<int64_t>(ids[s]);
        if (routed(id) && count[id]++ >= capacity) out[s] = static_cast<id_t>(-1);
      }
    }
  });
}

template <typename id_t>
void score_order(const id_t* ids, const float* priority, int64_t slots, int64_t E, int64_t capacity, id_t* out,
                 int64_t* total) {
  std::vector<int64_t> starts(E + 2), cursor(E + 1);
  std::vector<int32_t> sorted(slots);
  K::count_slots(ids, slots, E, total);  // total has E + 1 entries: the last counts the slots routed nowhere
  K::segment_starts(total, E, starts.data());
  K::place_slots(ids, slots, E, starts.data(), cursor.data(), sorted.data(), static_cast<int32_t*>(nullptr));
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t n = total[e];
      if (n <= capacity) continue;
      keys.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = sorted[starts[e] + i];
        keys[i] = K::capacity_key(priority[s], s);
      }
      std::nth_element(keys.begin(), keys.begin() + capacity, keys.end(), std::greater<uint64_t>());
      for (int64_t i = capacity; i < n; ++i) out[K::slot_of_key(keys[i])] = static_cast<id_t>(-1);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_capacity(const at::Tensor& topk_ids, const std::optional<at::Tensor>& priority,
                                                  int64_t num_experts, int64_t capacity, c10::string_view order) {
  const auto id_type = topk_ids.scalar_type();
  TORCH_CHECK(id_type == at::kInt || id_type == at::kLong, "apply_capacity: topk_ids must be int32 or int64");
  TORCH_CHECK(num_experts >= 1, "apply_capacity: num_experts must be >= 1");
  TORCH_CHECK(capacity >= 0, "apply_capacity: capacity must be >= 0");
  TORCH_CHECK(order == "token" || order == "score", "apply_capacity: order must be token|score");
  const bool by_score = order == "score";
  const int64_t slots = topk_ids.numel(), E = num_experts;
  TORCH_CHECK(slots < (int64_t{1} << 31), "apply_capacity: too many token slots for int32 positions");
  at::Tensor priority_f;
  if (by_score) {
    TORCH_CHECK(priority.has_value() && priority->numel() == slots, "apply_capacity: score order needs a priority "
                "per slot");
    priority_f = priority->to(at::kFloat).contiguous();
  }
  const auto ids = topk_ids.contiguous();
  auto out = ids.clone();
  auto total = at::zeros({E + 1}, ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(id_type, "apply_capacity_cpu", [&] {
    const index_t* id_ptr = ids.const_data_ptr<index_t>();
    index_t* out_ptr = out.data_ptr<index_t>();
    int64_t* total_ptr = total.data_ptr<int64_t>();
    if (by_score) {
      score_order(id_ptr, priority_f.const_data_ptr<float>(), slots, E, capacity, out_ptr, total_ptr);
    } else {
      token_order(id_ptr, slots, E, capacity, out_ptr, total_ptr);
    }
  });
  auto dropped = at::empty({E}, total.options());
  for (int64_t e = 0; e < E; ++e)
    dropped.data_ptr<int64_t>()[e] = std::max<int64_t>(total.const_data_ptr<int64_t>()[e] - capacity, 0);
  return {out.view(topk_ids.sizes()), dropped};
}

}  // namespace netmerge::cpu
