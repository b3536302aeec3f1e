// Stable counting sort of token slots by expert, free of any framework so every backend shares one definition.
//
// A slot is one (token, k) pair, numbered t * k + j. Slots are grouped by expert in increasing slot order;
// slots routed nowhere (id outside [0, E), e.g. -1) come after every expert. Optionally each expert's segment
// is padded to a multiple of block_size with the sentinel `slots` (the layout of vLLM's moe_align_block_size).
#pragma once

#include <cstdint>

#include "kernels/common.h"

namespace netmerge::kernels {

// counts[E + 1]: slots per expert, the last entry counting the slots routed nowhere.
template <typename id_t>
inline void count_slots(const id_t* ids, int64_t slots, int64_t E, int64_t* counts) {
  for (int64_t e = 0; e <= E; ++e) counts[e] = 0;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    ++counts[(id >= 0 && id < E) ? id : E];
  }
}

// starts[E + 2] from counts[E + 1]: exclusive prefix sum (starts[E] = first slot routed nowhere).
inline void segment_starts(const int64_t* counts, int64_t E, int64_t* starts) {
  starts[0] = 0;
  for (int64_t e = 0; e <= E; ++e) starts[e + 1] = starts[e] + counts[e];
}

// sorted[starts[e] + r] = the r-th slot of expert e; position[s] = where slot s landed (may be null).
// `cursor` is scratch of E + 1 entries.
template <typename id_t, typename index_t>
inline void place_slots(const id_t* ids, int64_t slots, int64_t E, const int64_t* starts, int64_t* cursor,
                        index_t* sorted, index_t* position) {
  for (int64_t e = 0; e <= E; ++e) cursor[e] = starts[e];
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t id = static_cast<int64_t>(ids[s]);
    const int64_t at = cursor[(id >= 0 && id < E) ? id : E]++;
    sorted[at] = static_cast<index_t>(s);
    if (position != nullptr) position[s] = static_cast<index_t>(at);
  }
}

HOST_DEVICE inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

}  // namespace netmerge::kernels
