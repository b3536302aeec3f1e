// CPU launcher of apply_capacity.
//
// Capacity holds per group of `group_size` consecutive tokens (Switch Transformers: per sequence). Token order
// is one pass per group with a running count per expert, groups in parallel; one group past 64K slots is cut into
// chunks counted in parallel, and a prefix over the chunks gives each chunk its experts' starting counts. Score
// order groups the slots by (group, expert) with moe_align's stable counting sort, then each over-full bucket
// selects its `capacity` best keys (kernels/apply_capacity.h: distinct, so the selected set is exact) with
// nth_element, buckets in parallel. Both write only the dropped slots over a copy of the ids.
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

// Tasks of about kChunk slots: below that, waking a second thread costs more than the work.
int64_t grain_for(int64_t tasks, int64_t slots) {
  return std::max<int64_t>(1, at::divup(tasks * kChunk, std::max<int64_t>(slots, 1)));
}

// Slots of one group, one pass with a running count per expert; count[e] ends as the group's load of e.
template <typename id_t>
void token_order_pass(const id_t* ids, int64_t begin, int64_t end, int64_t E, int64_t capacity, int64_t* count,
                      id_t* out) {
  for (int64_t s = begin; s < end; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    if (id >= 0 && id < E && count[id]++ >= capacity) out[s] = static_cast<id_t>(-1);
  }
}

// loads[g * E + e]: slots of expert e in group g. Groups run in parallel; one large group is cut into chunks
// whose loads are counted first, so that each chunk starts from the counts of the chunks before it.
template <typename id_t>
void token_order(const id_t* ids, int64_t slots, int64_t group_slots, int64_t E, int64_t capacity, id_t* out,
                 std::vector<int64_t>& loads) {
  const int64_t groups = at::divup(slots, group_slots);
  loads.assign(groups * E, 0);
  if (groups > 1 || slots <= kChunk) {
    at::parallel_for(0, groups, grain_for(groups, slots), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        token_order_pass(ids, g * group_slots, std::min(slots, (g + 1) * group_slots), E, capacity,
                         loads.data() + g * E, out);
    });
    return;
  }
  const int64_t chunks = std::min<int64_t>(at::divup(slots, kChunk), at::get_num_threads());
  const int64_t per_chunk = at::divup(slots, chunks);
  std::vector<int64_t> seen((chunks + 1) * E, 0);  // seen[c][e]: slots of expert e before chunk c
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* count = seen.data() + (c + 1) * E;
      for (int64_t s = c * per_chunk; s < std::min(slots, (c + 1) * per_chunk); ++s) {
        const int64_t id = static_cast<int64_t>(ids[s]);
        if (id >= 0 && id < E) ++count[id];
      }
    }
  });
  for (int64_t c = 1; c <= chunks; ++c)
    for (int64_t e = 0; e < E; ++e) seen[c * E + e] += seen[(c - 1) * E + e];
  std::copy(seen.begin() + chunks * E, seen.end(), loads.begin());
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      token_order_pass(ids, c * per_chunk, std::min(slots, (c + 1) * per_chunk), E, capacity,
                       seen.data() + c * E, out);
  });
}

// Buckets are (group, expert) pairs, v = g * E + e: moe_align's counting sort over them, then a selection per
// over-full bucket.
template <typename id_t>
void score_order(const id_t* ids, const float* priority, int64_t slots, int64_t group_slots, int64_t E,
                 int64_t capacity, id_t* out, std::vector<int64_t>& loads) {
  const int64_t groups = at::divup(slots, group_slots), V = groups * E;
  std::vector<int64_t> bucket(slots), counts(V + 1), starts(V + 2), cursor(V + 1);
  std::vector<int32_t> sorted(slots);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    bucket[s] = (id >= 0 && id < E) ? (s / group_slots) * E + id : -1;
  }
  K::count_slots(bucket.data(), slots, V, counts.data());
  K::segment_starts(counts.data(), V, starts.data());
  K::place_slots(bucket.data(), slots, V, starts.data(), cursor.data(), sorted.data(), static_cast<int32_t*>(nullptr));
  at::parallel_for(0, V, grain_for(V, slots), [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t v = begin; v < end; ++v) {
      const int64_t n = counts[v];
      if (n <= capacity) continue;
      keys.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = sorted[starts[v] + i];
        keys[i] = K::capacity_key(priority[s], s);
      }
      std::nth_element(keys.begin(), keys.begin() + capacity, keys.end(), std::greater<uint64_t>());
      for (int64_t i = capacity; i < n; ++i) out[K::slot_of_key(keys[i])] = static_cast<id_t>(-1);
    }
  });
  loads.assign(counts.begin(), counts.begin() + V);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_capacity(const at::Tensor& topk_ids, const std::optional<at::Tensor>& priority,
                                                  int64_t num_experts, int64_t capacity, c10::string_view order,
                                                  int64_t group_size) {
  const auto id_type = topk_ids.scalar_type();
  TORCH_CHECK(id_type == at::kInt || id_type == at::kLong, "apply_capacity: topk_ids must be int32 or int64");
  TORCH_CHECK(topk_ids.dim() == 2, "apply_capacity: topk_ids must be [T, k]");
  TORCH_CHECK(num_experts >= 1, "apply_capacity: num_experts must be >= 1");
  TORCH_CHECK(capacity >= 0, "apply_capacity: capacity must be >= 0");
  TORCH_CHECK(group_size >= 1, "apply_capacity: group_size must be >= 1");
  TORCH_CHECK(order == "token" || order == "score", "apply_capacity: order must be token|score");
  const bool by_score = order == "score";
  const int64_t slots = topk_ids.numel(), E = num_experts;
  TORCH_CHECK(slots < (int64_t{1} << 31), "apply_capacity: too many token slots for int32 positions");
  const int64_t group_slots = std::max<int64_t>(1, std::min(group_size, topk_ids.size(0)) * topk_ids.size(1));
  at::Tensor priority_f;
  if (by_score) {
    TORCH_CHECK(priority.has_value() && priority->sizes() == topk_ids.sizes(),
                "apply_capacity: score order needs a priority per slot");
    priority_f = priority->to(at::kFloat).contiguous();
  }
  const auto ids = topk_ids.contiguous();
  auto out = ids.clone();
  std::vector<int64_t> loads;  // [groups * E]
  AT_DISPATCH_INDEX_TYPES(id_type, "apply_capacity_cpu", [&] {
    const index_t* id_ptr = ids.const_data_ptr<index_t>();
    index_t* out_ptr = out.data_ptr<index_t>();
    if (by_score) {
      score_order(id_ptr, priority_f.const_data_ptr<float>(), slots, group_slots, E, capacity, out_ptr, loads);
    } else {
      token_order(id_ptr, slots, group_slots, E, capacity, out_ptr, loads);
    }
  });
  auto dropped = at::zeros({E}, ids.options().dtype(at::kLong));
  int64_t* dropped_ptr = dropped.data_ptr<int64_t>();
  for (size_t i = 0; i < loads.size(); ++i) dropped_ptr[i % E] += std::max<int64_t>(loads[i] - capacity, 0);
  return {out, dropped};
}

}  // namespace netmerge::cpu
