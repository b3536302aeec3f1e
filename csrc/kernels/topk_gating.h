// Per-row routing rules of topk_gating, free of any framework so every backend shares one definition.
//
// Selection: experts are ranked by a key (the logit itself, or score + bias); a larger key ranks first
// and equal keys rank by the lower expert index. Keys are never NaN (NaN is mapped to -inf first).
//
// Ranking representation (the Triton kernel uses the same): one int64 per candidate, the key mapped to an
// order-preserving int32 in the high half and the complemented index in the low half. The largest int64 is
// then the best candidate, ties already broken, so each selection step is a single max reduction.
#pragma once

#include <cmath>

#include "kernels/common.h"

namespace netmerge::kernels {

constexpr float kRenormEps = 1e-20f;  // DeepSeek-V3's guard: invisible unless the chosen mass is ~0
constexpr int64_t kExcluded = INT64_MIN;  // padding: behind everything

HOST_DEVICE inline int64_t make_rank(int32_t ordered_key, int64_t index) {
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(ordered_key)) << 32;
  return static_cast<int64_t>(high | (0xFFFFFFFFull - static_cast<uint64_t>(index)));
}

HOST_DEVICE inline int64_t rank_of(float key, int64_t index) {
  key = key == 0.f ? 0.f : key;  // -0.0 ranks as +0.0, as it compares
  const int32_t bits = float_bits(key);
  return make_rank(bits ^ ((bits >> 31) & 0x7FFFFFFF), index);
}

// Outside the chosen groups: behind every real key (even -inf), still ordered by index. When the chosen groups
// hold fewer than k experts these fill the remaining slots, lowest index first, weighted by their own scores
// (transformers' DeepSeek-V3 router masks them to -inf and its top-k takes some of them, in no defined order).
HOST_DEVICE inline int64_t disallowed_rank(int64_t index) { return make_rank(INT32_MIN, index); }

HOST_DEVICE inline int32_t index_of_rank(int64_t rank) {
  return static_cast<int32_t>(0xFFFFFFFFull - (static_cast<uint64_t>(rank) & 0xFFFFFFFFull));
}

// The best rank strictly below `bound`. Ranks are distinct, so bound = the previous answer walks down the
// ranking without writing anything between steps (a write followed by a vector read of the same row
// would stall on store forwarding).
// Written branch-free (a mask instead of ?:) so compilers vectorise the loop.
HOST_DEVICE inline int64_t best_below(const int64_t* ranks, int64_t n, int64_t bound) {
  int64_t best = kExcluded;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ranks[i];
    const int64_t keep = -static_cast<int64_t>(r < bound);
    const int64_t candidate = (r & keep) | (kExcluded & ~keep);
    best = candidate > best ? candidate : best;
  }
  return best;
}

// Group score from the ranks of its members: the best key, or the sum of the two best (DeepSeek-V3).
// NaN (from +inf + -inf) ranks as -inf like every other NaN.
HOST_DEVICE inline float group_score(const float* key, const int64_t* ranks, int64_t begin, int64_t size,
                                     bool top2_sum) {
  const int64_t first = best_below(ranks + begin, size, INT64_MAX);
  const float best = key[index_of_rank(first)];
  if (!top2_sum) return best;
  return nan_to_neg_inf(best + key[index_of_rank(best_below(ranks + begin, size, first))]);
}

// Softmax numerator relative to the row maximum m, following the limit when m is infinite:
// with m = +inf the +inf entries share the mass equally and the rest get none.
HOST_DEVICE inline float softmax_numerator(float x, float m) { return x == m ? 1.f : expf(x - m); }

HOST_DEVICE inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// GPT-OSS routing: softmax over the k chosen logits only. None finite or +inf -> no mass, weights 0.
HOST_DEVICE inline void softmax_over_chosen(const float* x, float* w, int64_t k) {
  float m = neg_inf();
  for (int64_t j = 0; j < k; ++j) m = x[j] > m ? x[j] : m;
  float sum = 0.f;
  for (int64_t j = 0; j < k; ++j) sum += (w[j] = m == neg_inf() ? 0.f : softmax_numerator(x[j], m));
  for (int64_t j = 0; j < k; ++j) w[j] = sum > 0.f ? w[j] / sum : 0.f;
}

// Optional renormalisation, then the scale.
HOST_DEVICE inline void finish_weights(float* w, int64_t k, bool renormalize, float scale) {
  if (renormalize) {
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += w[j];
    for (int64_t j = 0; j < k; ++j) w[j] /= sum + kRenormEps;
  }
  for (int64_t j = 0; j < k; ++j) w[j] *= scale;
}

}  // namespace netmerge::kernels
