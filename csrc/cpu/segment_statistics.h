// The CPU engine shared by logit_statistics and combine_logits: the per-segment statistics of a block of R rows
// (R = SIMD width), with the math of kernels/logit_statistics.h.
//
// Two layouts, chosen per block and per run of experts ("piece"):
//   lanes  short segments: the block is transposed to [column][R], so one vector holds one column for R rows and
//          every pass is lane-wise across rows (no horizontal reductions, no tails); quartiles by a lane-wise
//          sorting network.
//   rows   long segments, or too few rows to fill the lanes: one (row, expert) at a time, elements across lanes
//          with four accumulators, then merged; quartiles by radix select on integer keys.
// Either way a row's logits are read from memory once; the later passes hit the cache.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/logit_statistics.h"
#include "segment_layout.h"

namespace netmerge::cpu::NETMERGE_ISA::segments {

namespace K = netmerge::kernels;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t R = Vec::size();

// Rows of a block as an element-wise math policy (see kernels/logit_statistics.h).
struct VecMath {
  using Real = Vec;
  using Mask = Vec;
  static Real splat(float v) { return Vec(v); }
  static Real min(Real a, Real b) { return at::vec::minimum(a, b); }  // NaN-propagating, as ScalarMath
  static Real max(Real a, Real b) { return at::vec::maximum(a, b); }
  static Real select(Mask m, Real if_true, Real if_false) { return Vec::blendv(if_false, if_true, m); }
  static Mask is_nan(Real a) { return a != a; }
  static Mask eq(Real a, Real b) { return a == b; }
  static Mask lt(Real a, Real b) { return a < b; }
  static Mask gt(Real a, Real b) { return a > b; }
  static Mask both(Mask a, Mask b) { return a & b; }
  static Mask either(Mask a, Mask b) { return a | b; }
  static Mask negate(Mask a) { return a == Vec(0.f); }  // masks are all-ones (a NaN pattern) or zero
  static Real fma(Real a, Real b, Real c) { return at::vec::fmadd(a, b, c); }
  static Real exp(Real a) { return a.exp(); }
  static Real log(Real a) { return a.log(); }
  static Real sqrt(Real a) { return a.sqrt(); }
};

// Consecutive experts handled together: [first, last), in the lane layout or not.
struct Piece {
  int64_t first, last;
  bool lanes;
};

struct Layout : SegmentLayout {
  std::vector<Piece> pieces;     // lane-eligible neighbours in memory grouped, others one each
  std::vector<Piece> copy_runs;  // experts adjacent in memory, for copying whole runs at once
};

// Lane layout limits: segments up to kLaneMaxCount columns (kLaneMaxSorted when quartiles are needed, as the
// sorting network is quadratic), pieces up to kPieceColumns columns so the transposed block stays in L1.
constexpr int64_t kLaneMaxCount = 128;
constexpr int64_t kLaneMaxSorted = 32;
constexpr int64_t kPieceColumns = 256;

inline bool adjacent(const Segment& a, const Segment& b, int64_t element_size) {
  return a.row_stride == b.row_stride && a.base + a.count * element_size == b.base;
}

// The CPU layout: the segments, grouped into pieces for the lane layout and into runs for copying.
inline Layout make_layout(at::TensorList logits, at::IntArrayRef class_counts, bool sorted_quartiles,
                          const char* op) {
  Layout layout;
  static_cast<SegmentLayout&>(layout) = segment_layout(logits, class_counts, c10::DeviceType::CPU, op);
  const int64_t element_size = layout.element_size;
  const int64_t lane_max = sorted_quartiles ? kLaneMaxSorted : kLaneMaxCount;
  const auto& seg = layout.segments;
  const int64_t E = static_cast<int64_t>(seg.size());
  for (int64_t e = 0; e < E;) {
    const bool lanes = seg[e].count <= lane_max;
    int64_t last = e + 1, width = seg[e].count;
    while (lanes && last < E && seg[last].count <= lane_max && width + seg[last].count <= kPieceColumns &&
           adjacent(seg[last - 1], seg[last], element_size))
      width += seg[last++].count;
    layout.pieces.push_back({e, last, lanes});
    e = last;
  }
  for (int64_t e = 0; e < E;) {
    int64_t last = e + 1;
    while (last < E && adjacent(seg[last - 1], seg[last], element_size)) ++last;
    layout.copy_runs.push_back({e, last, false});
    e = last;
  }
  return layout;
}

template <typename scalar_t>
void to_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
    for (; i + R <= n; i += R) {
      Vec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Lane-wise sort of n vectors (each lane independently), by compare-exchange insertion: data-independent.
inline void sort_lanes(float* v, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    for (int64_t j = i; j > 0; --j) {
      const Vec a = Vec::loadu(v + (j - 1) * R), b = Vec::loadu(v + j * R);
      at::vec::minimum(a, b).store(v + (j - 1) * R);
      at::vec::maximum(a, b).store(v + j * R);
    }
  }
}

// Statistics of experts [piece.first, piece.last) for rows [b0, b0 + rows), written as
// results[((e - piece.first) * S + s) * R + r]. One Engine per thread: it owns the scratch.
template <typename scalar_t>
class Engine {
 public:
  Engine(const Layout& layout, const std::vector<int32_t>& stats)
      : layout_(layout), stats_(stats), needs_(K::needs_of(stats.data(), static_cast<int32_t>(stats.size()))) {}

  void run(const Piece& piece, int64_t b0, int64_t rows, float* results) {
    if (piece.lanes && 2 * rows >= R) {
      run_lanes(piece, b0, rows, results);
      return;
    }
    const int64_t S = static_cast<int64_t>(stats_.size());
    for (int64_t e = piece.first; e < piece.last; ++e)
      for (int64_t r = 0; r < rows; ++r) {
        if (r + 1 < rows) prefetch_start(layout_.segments[e], b0 + r + 1);
        run_row(layout_.segments[e], b0 + r, results + (e - piece.first) * S * R + r);
      }
  }

 private:
  using Summary = K::SegmentSummary<VecMath>;
  using RowSummary = K::SegmentSummary<K::ScalarMath>;

  const scalar_t* row_of(const Segment& s, int64_t b) const {
    return reinterpret_cast<const scalar_t*>(s.base) + b * s.row_stride;
  }

  // The next row's segment starts a new memory stream, which the hardware prefetcher would only pick up after
  // several misses: touch its first lines while the current row is being reduced.
  void prefetch_start(const Segment& s, int64_t b) const {
    const char* p = reinterpret_cast<const char*>(row_of(s, b));
    const int64_t bytes = std::min<int64_t>(s.count * static_cast<int64_t>(sizeof(scalar_t)), 1024);
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i);
  }

  // ---- lanes: rows across the vector ----

  void load_lanes(const Piece& piece, int64_t b0, int64_t rows, int64_t width) {
    const Segment& s = layout_.segments[piece.first];
    lanes_.resize(width * R);
    if (rows < R) std::fill(lanes_.begin(), lanes_.end(), 0.f);  // unused lanes: any finite value
    const float* src = nullptr;
    int64_t stride = width;
    if constexpr (std::is_same_v<scalar_t, float>) {
      src = row_of(s, b0), stride = s.row_stride;
    } else {
      row_major_.resize(rows * width);
      for (int64_t r = 0; r < rows; ++r) to_float(row_of(s, b0 + r), row_major_.data() + r * width, width);
      src = row_major_.data();
    }
    at::vec::transpose_mxn<float>(src, stride, lanes_.data(), R, static_cast<int>(rows), static_cast<int>(width));
  }

  // Runs add(acc, column j) over the n columns of a lane block with four independent accumulators (short
  // segments are latency-bound on one chain), merged in a fixed order.
  template <template <class> class Acc, typename Add>
  static Acc<VecMath> lane_reduce(const float* x, int64_t n, Add add) {
    Acc<VecMath> acc[4] = {Acc<VecMath>::empty(), Acc<VecMath>::empty(), Acc<VecMath>::empty(),
                           Acc<VecMath>::empty()};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int u = 0; u < 4; ++u) add(acc[u], Vec::loadu(x + (j + u) * R));
    for (; j < n; ++j) add(acc[0], Vec::loadu(x + j * R));
    acc[0].merge(acc[1]);
    acc[2].merge(acc[3]);
    acc[0].merge(acc[2]);
    return acc[0];
  }

  void run_lanes(const Piece& piece, int64_t b0, int64_t rows, float* results) {
    const auto& seg = layout_.segments;
    const int64_t width = seg[piece.last - 1].column + seg[piece.last - 1].count - seg[piece.first].column;
    load_lanes(piece, b0, rows, width);
    const int64_t S = static_cast<int64_t>(stats_.size());
    for (int64_t e = piece.first; e < piece.last; ++e) {
      const int64_t n = seg[e].count;
      const float* x = lanes_.data() + (seg[e].column - seg[piece.first].column) * R;
      Summary sum;
      sum.n = n;
      if (needs_.second) {
        sum.moments = lane_reduce<K::Moments>(x, n, [](auto& a, Vec v) { a.add_with_second(v); });
      } else {
        sum.moments = lane_reduce<K::Moments>(x, n, [](auto& a, Vec v) { a.add(v); });
      }
      if (needs_.deviations) {
        const Vec mean = sum.moments.mean(n);
        sum.deviations = lane_reduce<K::Deviations>(x, n, [&](auto& a, Vec v) { a.add(v, mean); });
      }
      if (needs_.softmax) {
        const Vec hi = sum.moments.hi;
        sum.softmax = lane_reduce<K::SoftmaxSums>(x, n, [&](auto& a, Vec v) { a.add(v, hi); });
      }
      if (needs_.any_quartile()) {
        sorted_.assign(x, x + n * R);
        sort_lanes(sorted_.data(), n);
        for (int32_t q = 1; q <= 3; ++q) {
          if (!needs_.quartile[q]) continue;
          const K::QuantileRank rank = K::quantile_rank(q, n);
          const int64_t upper = rank.lower + (rank.weight > 0.f);
          sum.quartile[q] = K::lerp_with_limits<VecMath>(Vec::loadu(sorted_.data() + rank.lower * R),
                                                         Vec::loadu(sorted_.data() + upper * R), rank.weight);
        }
      }
      float* out = results + (e - piece.first) * S * R;
      for (int64_t s = 0; s < S; ++s) K::finish_statistic<VecMath>(stats_[s], sum).store(out + s * R);
    }
  }

  // ---- rows: elements across the vector ----

  // Folds the lanes of a vector accumulator into a scalar one, in lane order. Accumulators are plain structs of
  // Real fields (checked in reduce), so field f of lane r is float r of vector f.
  template <template <class> class Acc>
  static Acc<K::ScalarMath> fold(const Acc<VecMath>& acc) {
    constexpr int kFields = sizeof(Acc<VecMath>) / sizeof(Vec);
    alignas(64) float lanes[kFields * R];
    for (int f = 0; f < kFields; ++f) reinterpret_cast<const Vec*>(&acc)[f].store(lanes + f * R);
    Acc<K::ScalarMath> out, lane;
    float* out_fields = reinterpret_cast<float*>(&out);
    float* lane_fields = reinterpret_cast<float*>(&lane);
    for (int f = 0; f < kFields; ++f) out_fields[f] = lanes[f * R];
    for (int64_t r = 1; r < R; ++r) {
      for (int f = 0; f < kFields; ++f) lane_fields[f] = lanes[f * R + r];
      out.merge(lane);
    }
    return out;
  }

  // Runs `add(acc, vector)` over x[0, n) with four vector accumulators and `add(acc, scalar)` over the tail; the
  // result, merged in a fixed order, is the same on every call for the same segment.
  template <template <class> class Acc, typename AddVec, typename AddScalar>
  static Acc<K::ScalarMath> reduce(const float* x, int64_t n, AddVec add_vec, AddScalar add_scalar) {
    static_assert(sizeof(Acc<VecMath>) % sizeof(Vec) == 0 &&
                      sizeof(Acc<K::ScalarMath>) * R == sizeof(Acc<VecMath>),
                  "accumulators must be plain structs of Real fields");
    Acc<K::ScalarMath> out = Acc<K::ScalarMath>::empty();
    int64_t j = 0;
    if (n >= R) {
      Acc<VecMath> acc[4] = {Acc<VecMath>::empty(), Acc<VecMath>::empty(), Acc<VecMath>::empty(),
                             Acc<VecMath>::empty()};
      for (; j + 4 * R <= n; j += 4 * R) {
        __builtin_prefetch(x + j + 16 * R);  // 1 KB ahead within the segment (beyond its end is harmless)
        for (int u = 0; u < 4; ++u) add_vec(acc[u], Vec::loadu(x + j + u * R));
      }
      for (; j + R <= n; j += R) add_vec(acc[0], Vec::loadu(x + j));
      for (int u = 1; u < 4; ++u) acc[0].merge(acc[u]);
      out = fold<Acc>(acc[0]);
    }
    for (; j < n; ++j) add_scalar(out, x[j]);
    return out;
  }

  void run_row(const Segment& s, int64_t b, float* out) {
    const int64_t n = s.count;
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row_of(s, b);
    } else {
      row_major_.resize(n);
      to_float(row_of(s, b), row_major_.data(), n);
      x = row_major_.data();
    }
    RowSummary sum;
    sum.n = n;
    std::fill(sum.quartile, sum.quartile + 4, K::quiet_nan());
    if (needs_.second) {
      sum.moments = reduce<K::Moments>(
          x, n, [](auto& a, Vec v) { a.add_with_second(v); }, [](auto& a, float v) { a.add_with_second(v); });
    } else {
      sum.moments = reduce<K::Moments>(x, n, [](auto& a, Vec v) { a.add(v); }, [](auto& a, float v) { a.add(v); });
    }
    if (needs_.deviations) {
      const float mean = sum.moments.mean(n);
      sum.deviations = reduce<K::Deviations>(
          x, n, [&](auto& a, Vec v) { a.add(v, Vec(mean)); }, [&](auto& a, float v) { a.add(v, mean); });
    }
    if (needs_.softmax) {
      const float m = sum.moments.hi;
      sum.softmax = reduce<K::SoftmaxSums>(
          x, n, [&](auto& a, Vec v) { a.add(v, Vec(m)); }, [&](auto& a, float v) { a.add(v, m); });
    }
    if (needs_.any_quartile() && sum.moments.hi == sum.moments.hi) quartiles(x, n, sum);
    const int64_t S = static_cast<int64_t>(stats_.size());
    for (int64_t i = 0; i < S; ++i) out[i * R] = K::finish_statistic<K::ScalarMath>(stats_[i], sum);
  }

  // Order statistics by radix select on keys (kernels/logit_statistics.h, as the CUDA kernel's long segments).
  void quartiles(const float* x, int64_t n, RowSummary& sum) {
    keys_.resize(n);
    int32_t* keys = keys_.data();
    for (int64_t j = 0; j < n; ++j) keys[j] = K::ordered_key(x[j]);
    candidates_.resize(n);
    int64_t histogram[K::kRadixBins];
    for (int32_t q = 1; q <= 3; ++q) {
      if (!needs_.quartile[q]) continue;
      const K::QuantileRank rank = K::quantile_rank(q, n);
      const int32_t lower = K::radix_select(keys, n, rank.lower, histogram, candidates_.data());
      int32_t upper = lower;
      if (rank.weight > 0.f) {
        int32_t not_above = 0, smallest_above = INT32_MAX;
        for (int64_t j = 0; j < n; ++j) {
          not_above += keys[j] <= lower;
          smallest_above = keys[j] > lower ? std::min(smallest_above, keys[j]) : smallest_above;
        }
        upper = K::next_key(lower, rank.lower, not_above, smallest_above);
      }
      sum.quartile[q] = K::lerp_with_limits<K::ScalarMath>(K::key_value(lower), K::key_value(upper), rank.weight);
    }
  }

  const Layout& layout_;
  const std::vector<int32_t>& stats_;
  const K::Needs needs_;
  std::vector<float> lanes_, row_major_, sorted_;
  std::vector<int32_t> keys_, candidates_;
};

// Calls fn(scalar_t{}) for the logits dtypes the engine serves.
template <typename Fn>
void dispatch_logits(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Parallel tasks per call: enough work (~16K logits) in each to be worth waking a thread for.
inline int64_t task_grain(int64_t logits_per_task) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, logits_per_task)); }

}  // namespace netmerge::cpu::NETMERGE_ISA::segments
