// Per-segment math of logit_statistics and combine_logits, free of any framework, written once for every
// backend. A segment is one expert's logits in one row. Every backend runs the same passes:
//
//   pass 1  Moments        sum, min, max, second largest          (NaN-propagating min/max: max is NaN iff the
//                                                                   segment holds a NaN)
//   pass 2  Deviations     sum of squared deviations from the mean (var, std)
//           SoftmaxSums    softmax normaliser and entropy sum      (entropy, max_prob, logsumexp)
//   select  order statistics for the quartiles (radix select or bisection on order-preserving integer keys, or a
//           sort)
//   finish  finish_statistic: the documented rules for constant segments, infinities and NaN
//
// The arithmetic is generic over a "math" policy: ScalarMath (one float: CUDA threads, CPU rows) here, and a SIMD
// policy in the CPU launcher whose lanes are rows of a block. Policies provide Real, Mask and the element-wise
// operations used below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "kernels/common.h"

// Accumulators and the finishing switch run per logit / per segment: inlined, they fold into the callers' loops.
#if defined(__CUDACC__)
#define NETMERGE_ALWAYS_INLINE __forceinline__
#else
#define NETMERGE_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace netmerge::kernels {

// Statistic codes; kNumStatistics must stay last. kMaxMinusQ3 is third_quartile's criterion, not a public name.
enum Statistic : int32_t {
  kMean,
  kStd,
  kVar,
  kMin,
  kMax,
  kSum,
  kMedian,
  kQ1,
  kQ3,
  kRange,
  kEntropy,
  kMaxProb,
  kMargin,
  kLogsumexp,
  kMaxMinusQ3,
  kNumStatistics
};

inline constexpr const char* kStatisticNames[kNumStatistics] = {
    "mean", "std",     "var",      "min",    "max",       "sum",         "median", "q1",
    "q3",   "range",   "entropy",  "max_prob", "margin",  "logsumexp",   "max_minus_q3"};

// -1 for an unknown name.
inline int32_t statistic_code(std::string_view name) {
  for (int32_t i = 0; i < kNumStatistics; ++i)
    if (name == kStatisticNames[i]) return i;
  return -1;
}

// How combine_logits turns a method into a rule. kSelect methods rank experts by `criterion`.
enum CombineKind : int32_t { kConcat, kRatio, kOverallRatio, kSelect, kGateScores, kGateClaims };

struct CombineRule {
  CombineKind kind;
  int32_t criterion;  // a Statistic for kSelect
  bool lower_wins;
};

// The gate's dtype decides between scores and claims; `known` is false for an unknown method.
inline CombineRule combine_rule(std::string_view method, bool gate_is_bool, bool* known) {
  *known = true;
  if (method == "naive") return {kConcat, -1, false};
  if (method == "ratio") return {kRatio, kSum, false};
  if (method == "overall_ratio") return {kOverallRatio, kSum, false};
  if (method == "gate") return {gate_is_bool ? kGateClaims : kGateScores, -1, false};
  if (method == "std") return {kSelect, kStd, true};
  if (method == "range") return {kSelect, kRange, false};
  if (method == "third_quartile") return {kSelect, kMaxMinusQ3, false};
  if (method == "max_prob") return {kSelect, kMaxProb, false};
  if (method == "entropy") return {kSelect, kEntropy, true};
  if (method == "margin") return {kSelect, kMargin, false};
  if (method == "energy") return {kSelect, kLogsumexp, false};
  *known = false;
  return {kConcat, -1, false};
}

// Which passes a set of statistics needs.
struct Needs {
  bool second = false;      // margin
  bool deviations = false;  // var, std
  bool softmax = false;     // entropy, max_prob, logsumexp
  bool quartile[4] = {false, false, false, false};  // [1] q1, [2] median, [3] q3

  HOST_DEVICE bool any_quartile() const { return quartile[1] || quartile[2] || quartile[3]; }
};

HOST_DEVICE inline int32_t quarters_of(int32_t stat) {
  return stat == kQ1 ? 1 : stat == kMedian ? 2 : (stat == kQ3 || stat == kMaxMinusQ3) ? 3 : 0;
}

HOST_DEVICE inline Needs needs_of(const int32_t* stats, int32_t count) {
  Needs n;
  for (int32_t i = 0; i < count; ++i) {
    const int32_t s = stats[i];
    n.second |= s == kMargin;
    n.deviations |= s == kVar || s == kStd;
    n.softmax |= s == kEntropy || s == kMaxProb || s == kLogsumexp;
    n.quartile[quarters_of(s)] = true;
  }
  n.quartile[0] = false;
  return n;
}

HOST_DEVICE inline float quiet_nan() { return __builtin_nanf(""); }

HOST_DEVICE inline float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// One float as an element-wise "math policy".
struct ScalarMath {
  using Real = float;
  using Mask = bool;
  HOST_DEVICE static Real splat(float v) { return v; }
  // NaN-propagating, so that a segment's max is NaN exactly when it holds a NaN.
  HOST_DEVICE static Real min(Real a, Real b) { return (b < a || b != b) ? b : a; }
  HOST_DEVICE static Real max(Real a, Real b) { return (b > a || b != b) ? b : a; }
  HOST_DEVICE static Real select(Mask m, Real if_true, Real if_false) { return m ? if_true : if_false; }
  HOST_DEVICE static Mask is_nan(Real a) { return a != a; }
  HOST_DEVICE static Mask eq(Real a, Real b) { return a == b; }
  HOST_DEVICE static Mask lt(Real a, Real b) { return a < b; }
  HOST_DEVICE static Mask gt(Real a, Real b) { return a > b; }
  HOST_DEVICE static Mask both(Mask a, Mask b) { return a && b; }
  HOST_DEVICE static Mask either(Mask a, Mask b) { return a || b; }
  HOST_DEVICE static Mask negate(Mask a) { return !a; }
  HOST_DEVICE static Real fma(Real a, Real b, Real c) { return fmaf(a, b, c); }
  HOST_DEVICE static Real exp(Real a) { return expf(a); }
  HOST_DEVICE static Real log(Real a) { return logf(a); }
  HOST_DEVICE static Real sqrt(Real a) { return sqrtf(a); }
};

template <class M>
HOST_DEVICE typename M::Mask is_inf(typename M::Real a) {
  return M::either(M::eq(a, M::splat(pos_inf())), M::eq(a, M::splat(neg_inf())));
}

// Pass 1. `second` is the second largest as a multiset (a repeated maximum is its own second).
template <class M>
struct Moments {
  using Real = typename M::Real;
  Real sum, lo, hi, second;

  HOST_DEVICE NETMERGE_ALWAYS_INLINE static Moments empty() {
    return {M::splat(0.f), M::splat(pos_inf()), M::splat(neg_inf()), M::splat(neg_inf())};
  }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void add(Real x) {
    sum = sum + x;
    lo = M::min(lo, x);
    hi = M::max(hi, x);
  }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void add_with_second(Real x) {
    second = M::max(second, M::min(hi, x));
    add(x);
  }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void merge(const Moments& o) {
    sum = sum + o.sum;
    lo = M::min(lo, o.lo);
    second = M::max(M::max(second, o.second), M::min(hi, o.hi));
    hi = M::max(hi, o.hi);
  }
  // Constant segments (min == max, infinities included) have exactly their value as mean.
  HOST_DEVICE NETMERGE_ALWAYS_INLINE Real mean(int64_t n) const {
    return M::select(M::eq(lo, hi), lo, sum / M::splat(static_cast<float>(n)));
  }
};

// Pass 2, var/std: squared deviations from the finished mean.
template <class M>
struct Deviations {
  using Real = typename M::Real;
  Real m2;
  HOST_DEVICE NETMERGE_ALWAYS_INLINE static Deviations empty() { return {M::splat(0.f)}; }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void add(Real x, Real mean) {
    const Real d = x - mean;
    m2 = M::fma(d, d, m2);
  }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void merge(const Deviations& o) { m2 = m2 + o.m2; }
};

// Pass 2, softmax statistics relative to the segment max m: z = sum_i e_i with e_i = exp(x_i - m) (1 where
// x_i == m, which follows the limits when m is infinite: +inf entries share the mass, an all -inf segment is
// uniform) and s = sum_i e_i (x_i - m) over the entries with mass below the max, so entropy = log z - s / z.
template <class M>
struct SoftmaxSums {
  using Real = typename M::Real;
  Real z, s;
  HOST_DEVICE NETMERGE_ALWAYS_INLINE static SoftmaxSums empty() { return {M::splat(0.f), M::splat(0.f)}; }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void add(Real x, Real m) {
    const typename M::Mask at_max = M::eq(x, m);
    const Real shifted = x - m;
    const Real e = M::select(at_max, M::splat(1.f), M::exp(shifted));
    z = z + e;
    const typename M::Mask no_term = M::either(at_max, M::eq(e, M::splat(0.f)));
    s = s + M::select(no_term, M::splat(0.f), e * shifted);
  }
  HOST_DEVICE NETMERGE_ALWAYS_INLINE void merge(const SoftmaxSums& o) {
    z = z + o.z;
    s = s + o.s;
  }
};

// ---- quartiles ----

// Where the q = quarters / 4 quantile of n sorted values lies, as torch.quantile: position q (n - 1), linear
// interpolation between its floor (`lower`, 0-based) and the next value with `weight`. Exact integer arithmetic.
struct QuantileRank {
  int64_t lower;
  float weight;
};
HOST_DEVICE inline QuantileRank quantile_rank(int32_t quarters, int64_t n) {
  const int64_t scaled = quarters * (n - 1);
  return {scaled / 4, static_cast<float>(scaled % 4) * 0.25f};
}

// torch.lerp(a, b, w) for a <= b, following the limits: a when w == 0 or a == b, the infinite end when exactly
// one end is infinite, NaN between -inf and +inf.
template <class M>
HOST_DEVICE typename M::Real lerp_with_limits(typename M::Real a, typename M::Real b, float w) {
  using Real = typename M::Real;
  if (w == 0.f) return a;
  const Real span = b - a;
  const Real interp = w < 0.5f ? a + M::splat(w) * span : b - span * M::splat(1.f - w);
  const typename M::Mask a_inf = is_inf<M>(a), b_inf = is_inf<M>(b);
  const Real ends = M::select(M::both(a_inf, b_inf), M::splat(quiet_nan()), M::select(a_inf, a, b));
  return M::select(M::eq(a, b), a, M::select(M::either(a_inf, b_inf), ends, interp));
}

// Order-preserving int32 keys of floats (NaN excluded; -0.0 ranks as +0.0), and back.
HOST_DEVICE inline int32_t ordered_key(float v) {
  const int32_t bits = float_bits(v == 0.f ? 0.f : v);
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}
HOST_DEVICE inline float key_value(int32_t key) { return float_from_bits(key ^ ((key >> 31) & 0x7FFFFFFF)); }

// The rank-th smallest key (0-based) of a segment: the largest t with #(key < t) <= rank, built bit by bit from
// the top, so that 32 counting passes find it whatever the values. `count_below(t)` returns #(key < t).
template <class CountBelow>
HOST_DEVICE int32_t select_key(int64_t rank, CountBelow count_below) {
  uint32_t found = 0;  // offset-binary: unsigned order == signed order of the keys
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = found | (1u << bit);
    if (count_below(static_cast<int32_t>(candidate ^ 0x80000000u)) <= rank) found = candidate;
  }
  return static_cast<int32_t>(found ^ 0x80000000u);
}

// Radix select: the rank-th smallest key in four passes of 8-bit digits, from the top. Pass p histograms digit p
// of the keys that agree with the digits found so far; the bin holding the rank-th of them is digit p of the
// answer, and the rank continues inside that bin. Keys go as offset binary (unsigned order == key order).
constexpr int kRadixBins = 256;
constexpr int kRadixPasses = 4;

HOST_DEVICE inline uint32_t radix_bits(int32_t key) { return static_cast<uint32_t>(key) ^ 0x80000000u; }
HOST_DEVICE inline int32_t radix_key(uint32_t bits) { return static_cast<int32_t>(bits ^ 0x80000000u); }
HOST_DEVICE inline int radix_digit(uint32_t bits, int pass) { return (bits >> (24 - 8 * pass)) & 0xFF; }
// Whether `bits` has the digits of passes before `pass` that `prefix` holds.
HOST_DEVICE inline bool radix_candidate(uint32_t bits, uint32_t prefix, int pass) {
  return pass == 0 || (bits >> (32 - 8 * pass)) == (prefix >> (32 - 8 * pass));
}
// Which of `bins` bins holds the rank-th candidate; `rank` becomes the rank within that bin. The rank is below
// the bins' total.
template <typename Count>
HOST_DEVICE int radix_bin(const Count* histogram, int bins, int64_t* rank) {
  int64_t below = 0;
  for (int d = 0; d < bins - 1; ++d) {
    if (below + static_cast<int64_t>(histogram[d]) > *rank) {
      *rank -= below;
      return d;
    }
    below += static_cast<int64_t>(histogram[d]);
  }
  *rank -= below;
  return bins - 1;
}

// The rank-th smallest of n keys, one thread (the CPU rows): after each pass only the candidates are kept (in
// `scratch`, n keys), so the passes after the first touch a few keys. `histogram` is scratch of kRadixBins.
template <typename Count>
inline int32_t radix_select(const int32_t* keys, int64_t n, int64_t rank, Count* histogram, int32_t* scratch) {
  uint32_t prefix = 0;
  const int32_t* candidates = keys;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    for (int d = 0; d < kRadixBins; ++d) histogram[d] = 0;
    for (int64_t j = 0; j < n; ++j) ++histogram[radix_digit(radix_bits(candidates[j]), pass)];
    const int digit = radix_bin(histogram, kRadixBins, &rank);
    prefix |= static_cast<uint32_t>(digit) << (24 - 8 * pass);
    int64_t kept = 0;
    for (int64_t j = 0; j < n; ++j) {
      scratch[kept] = candidates[j];
      kept += radix_digit(radix_bits(candidates[j]), pass) == digit;
    }
    candidates = scratch;
    n = kept;
  }
  return radix_key(prefix);
}

// The (rank + 1)-th smallest, given the rank-th `key`, #(keys <= key) and the smallest key above it.
HOST_DEVICE inline int32_t next_key(int32_t key, int64_t rank, int64_t count_not_above, int32_t smallest_above) {
  return count_not_above > rank + 1 ? key : smallest_above;
}

// ---- finishing ----

template <class M>
struct SegmentSummary {
  using Real = typename M::Real;
  int64_t n;
  Moments<M> moments;
  Deviations<M> deviations;
  SoftmaxSums<M> softmax;
  Real quartile[4];  // [1] q1, [2] median, [3] q3, where needed
};

// The documented value of one statistic. A NaN anywhere in the segment makes every statistic NaN.
template <class M>
HOST_DEVICE NETMERGE_ALWAYS_INLINE typename M::Real finish_statistic(int32_t stat, const SegmentSummary<M>& s) {
  using Real = typename M::Real;
  const Real zero = M::splat(0.f), nan = M::splat(quiet_nan());
  const Moments<M>& mo = s.moments;
  const typename M::Mask constant = M::eq(mo.lo, mo.hi);
  Real v = zero;
  switch (stat) {
    case kMean: v = mo.mean(s.n); break;
    case kSum: v = mo.sum; break;
    case kMin: v = mo.lo; break;
    case kMax: v = mo.hi; break;
    case kRange: v = M::select(constant, zero, mo.hi - mo.lo); break;
    case kMargin:  // a single class has no runner-up: +inf, whatever its logit
      v = s.n == 1 ? M::splat(pos_inf()) : M::select(M::eq(mo.hi, mo.second), zero, mo.hi - mo.second);
      break;
    case kVar:
    case kStd: {
      // Unbiased (n - 1), as torch.var: NaN for a single class; exactly 0 for a constant segment.
      const Real var = s.n == 1 ? nan
                                : M::select(constant, zero,
                                            s.deviations.m2 / M::splat(static_cast<float>(s.n - 1)));
      v = stat == kVar ? var : M::sqrt(var);
      break;
    }
    case kLogsumexp: v = mo.hi + M::log(s.softmax.z); break;
    case kMaxProb: v = M::splat(1.f) / s.softmax.z; break;
    case kEntropy: v = M::log(s.softmax.z) - s.softmax.s / s.softmax.z; break;
    case kQ1: v = s.quartile[1]; break;
    case kMedian: v = s.quartile[2]; break;
    case kQ3: v = s.quartile[3]; break;
    case kMaxMinusQ3: v = M::select(M::eq(mo.hi, s.quartile[3]), zero, mo.hi - s.quartile[3]); break;
    default: v = nan;
  }
  return M::select(M::is_nan(mo.hi), nan, v);
}

// ---- choosing an expert ----

// The best criterion over experts visited in increasing index: a strict comparison keeps ties at the lower
// index, a NaN criterion never wins, and `winner` stays -1 when every criterion is NaN.
template <class M>
struct Selection {
  using Real = typename M::Real;
  Real best, winner;
  HOST_DEVICE static Selection empty() { return {M::splat(0.f), M::splat(-1.f)}; }
  HOST_DEVICE void consider(float index, Real criterion, bool lower_wins) {
    const typename M::Mask better = lower_wins ? M::lt(criterion, best) : M::gt(criterion, best);
    const typename M::Mask take = M::both(M::negate(M::is_nan(criterion)),
                                          M::either(M::lt(winner, M::splat(0.f)), better));
    best = M::select(take, criterion, best);
    winner = M::select(take, M::splat(index), winner);
  }
};

// The seed's PAN rule: exactly one claim selects that expert; none or several select nobody (-1).
template <class M>
struct Claims {
  using Real = typename M::Real;
  Real count, claimed;
  HOST_DEVICE static Claims empty() { return {M::splat(0.f), M::splat(-1.f)}; }
  HOST_DEVICE void consider(float index, typename M::Mask claims) {
    count = count + M::select(claims, M::splat(1.f), M::splat(0.f));
    claimed = M::select(claims, M::splat(index), claimed);
  }
  HOST_DEVICE Real winner() const { return M::select(M::eq(count, M::splat(1.f)), claimed, M::splat(-1.f)); }
};

}  // namespace netmerge::kernels
