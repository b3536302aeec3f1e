// Per-slot rules of apply_capacity, free of any framework so every backend shares one definition.
//
// Expert e keeps at most `capacity` of the slots routed to it and drops the rest (id -1). Token order: the first
// slots s = t * k + j win. Score order: the highest priority wins, equal priorities go to the lower slot; NaN
// counts as -inf and -0.0 as +0.0, so the order is total and the answer deterministic.
#pragma once

#include <cstdint>

#include "kernels/common.h"

namespace netmerge::kernels {

// Order-preserving unsigned image of a priority (larger priority -> larger value).
HOST_DEVICE inline uint32_t priority_order(float priority) {
  priority = nan_to_neg_inf(priority);
  priority = priority == 0.f ? 0.f : priority;
  const uint32_t bits = static_cast<uint32_t>(float_bits(priority));
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// One distinct key per slot: larger key = wins a place earlier (priority first, then the lower slot).
HOST_DEVICE inline uint64_t capacity_key(float priority, int64_t slot) {
  return (static_cast<uint64_t>(priority_order(priority)) << 32) | (0xFFFFFFFFull - static_cast<uint64_t>(slot));
}

HOST_DEVICE inline int64_t slot_of_key(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFull - (key & 0xFFFFFFFFull));
}

}  // namespace netmerge::kernels
