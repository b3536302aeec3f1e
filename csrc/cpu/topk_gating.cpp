// CPU launcher of topk_gating. Two layouts, chosen from (E, k) alone so that a row's result never depends on
// its position in the batch or on T (every row of a call runs the same arithmetic):
//
// - Few experts or few picks (k * E <= 64 R, R = SIMD width: Mixtral, E = 64 with k = 6 on AVX2): blocks of R rows transposed into
//   expert-major scratch ([E][R]: one vector holds one expert for R rows), so every step is lane-wise across
//   rows (one row per lane) and the k selection passes are plain vector compare-selects. The last, partial
//   block runs the same lane-wise code with idle lanes.
// - Otherwise one row at a time, experts across the lanes: the k best are found by a threshold t (the k-th
//   largest of each lane's best and second-best key, sorted by a network over two registers: at least k keys
//   are >= t, typically k plus one), the candidates {key >= t} are gathered by vector compares and ranked by
//   counting (greater keys, then equal keys of lower index), with no data-dependent sort. With k <= R, whole
//   vectors of experts and (if grouped) at most R groups of whole vectors (Qwen3, DeepSeek-V3), the fused
//   variant (FusedRow) computes each key once and folds it into the lanes' three best (and the groups') in the
//   same pass, ranks the groups in one register, ranks the k chosen in registers when they are distinct and
//   exactly the candidates, and takes rows in pairs so the dependent steps after that pass overlap.
// exp runs only where a result needs it: the full softmax statistics when a weight or key uses them, otherwise
// just the k chosen logits (renormalised softmax: the denominator cancels).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/topk_gating.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
namespace K = netmerge::kernels;
constexpr int64_t R = Vec::size();
static_assert(VecI::size() == R, "float and int32 vectors must have the same lane count");

// Ordered keys: larger key -> larger int32 (kernels/topk_gating.h). Below every real key (even -inf): experts
// outside the chosen groups (kDisallowed, still ranked by index) and, below them, taken or padding slots.
constexpr int32_t kTaken = INT32_MIN;
constexpr int32_t kDisallowed = INT32_MIN + 1;

struct Config {
  int64_t E, k, num_groups, topk_groups;
  bool sigmoid, renormalize, softmax_after_topk, top2_sum, key_is_logit;
  float scale;
  const float* bias;
  // Softmax over all E experts, and whether its statistics are needed: not with the logit as key and
  // renormalised weights (the denominator cancels; its 1e-20 guard is below float resolution, the chosen hold the
  // row's maximum).
  bool softmax() const { return !sigmoid && !softmax_after_topk; }
  bool statistics() const { return softmax() && (!key_is_logit || !renormalize); }
};

Vec sanitize(Vec v) { return Vec::blendv(v, Vec(K::neg_inf()), v != v); }

// R int32 lanes as a compiler vector: comparisons and selects compile to mask registers directly where the
// ISA has them (ATen's integer blend round-trips the mask through a vector), and lower to any other ISA.
using Lanes = int32_t __attribute__((vector_size(R * sizeof(int32_t))));
Lanes splat(int32_t v) { return Lanes{} + v; }
Lanes load_lanes(const int32_t* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
void store_lanes(int32_t* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }
Lanes max_lanes(Lanes a, Lanes b) { return a > b ? a : b; }
Lanes min_lanes(Lanes a, Lanes b) { return a > b ? b : a; }

template <std::size_t... I>
constexpr Lanes iota_lanes(std::index_sequence<I...>) {
  return Lanes{static_cast<int32_t>(I)...};
}
const Lanes kIota = iota_lanes(std::make_index_sequence<R>{});

// Bit i set where lane i of a comparison result is true.
inline uint32_t mask_bits(Lanes m) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(m));
#elif defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(reinterpret_cast<__m256i>(m))));
#else
  uint32_t bits = 0;
  for (int64_t i = 0; i < R; ++i) bits |= static_cast<uint32_t>(m[i] != 0) << i;
  return bits;
#endif
}

// A bitonic sorting network over the R lanes of one register (descending). Stage (P, Q): lane i meets lane
// i ^ Q and keeps the larger where its block of P lanes sorts descending.
template <int Q, std::size_t... I>
[[gnu::always_inline]] inline Lanes xor_shuffle(Lanes v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (static_cast<int>(I) ^ Q)...);
}
template <std::size_t... I>
[[gnu::always_inline]] inline Lanes reversed(Lanes v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (static_cast<int>(R - 1 - I))...);
}
template <int P, int Q, std::size_t... I>
constexpr Lanes keeps_larger(std::index_sequence<I...>) {
  return Lanes{((((I & Q) == 0) != ((I & P) != 0)) ? -1 : 0)...};
}
template <int P, int Q>
[[gnu::always_inline]] inline Lanes bitonic_stage(Lanes v) {
  const Lanes other = xor_shuffle<Q>(v, std::make_index_sequence<R>{});
  return keeps_larger<P, Q>(std::make_index_sequence<R>{}) ? max_lanes(v, other) : min_lanes(v, other);
}
template <int P, int Q>
[[gnu::always_inline]] inline Lanes bitonic_merge(Lanes v) {
  v = bitonic_stage<P, Q>(v);
  if constexpr (Q > 1) {
    return bitonic_merge<P, Q / 2>(v);
  } else {
    return v;
  }
}
template <int P = 2>
[[gnu::always_inline]] inline Lanes sort_descending(Lanes v) {
  if constexpr (P <= R) {
    return sort_descending<P * 2>(bitonic_merge<P, P / 2>(v));
  } else {
    return v;
  }
}

VecI as_int(Vec v) { return at::vec::cast<int32_t>(v); }

VecI ordered(Vec key) {
  key = Vec::blendv(key, Vec(0.f), key == Vec(0.f));  // -0.0 ranks as +0.0
  const VecI bits = as_int(key);
  return bits ^ ((bits >> VecI(31)) & VecI(0x7FFFFFFF));
}

// 1 / (1 + exp(-x)) for NaN-free x. exp(-x) = 2^t, t = -x log2(e) clamped to [-126, 126], as 2^n (added to the
// exponent bits) times 2^f, |f| <= 1/2, by a degree-5 polynomial (fitted for relative error, ~2.5e-7 in float32)
// evaluated by Estrin's scheme: a shorter dependent chain than ATen's exp_u20, which bounds the sigmoid-scored
// rows (each vector's chain against the scheduler's capacity). Rounding t costs |t| 2^-24 ln 2 relative in
// exp(-x), where the sigmoid's sensitivity s (1 - s) is below 2^-|t|: under 1e-7 absolute everywhere. Exactly 0
// for t > 126 (x < -87.3, where the true value is below float's normal range) and exactly 1 where exp(-x) is
// negligible against 1. Tested against float64 over the whole range (tests/test_topk_gating_cpu.py).
using Floats = float __attribute__((vector_size(R * sizeof(float))));
Vec sigmoid(Vec x) {
  const Vec t = x * Vec(-1.44269504088896341f);
  const Vec tc = at::vec::clamp(t, Vec(-126.f), Vec(126.f));
  const Vec n = tc.round();
  const Vec f = tc - n, f2 = f * f;
  const Vec lo = at::vec::fmadd(f, Vec(0.6931469440460205f), Vec(1.0000001192092896f));
  const Vec mid = at::vec::fmadd(f, Vec(0.05550714209675789f), Vec(0.24022120237350464f));
  const Vec hi = at::vec::fmadd(f, Vec(0.0013276184909045696f), Vec(0.009675540961325169f));
  const Vec p = at::vec::fmadd(at::vec::fmadd(hi, f2, mid), f2, lo);
  Floats nf;
  std::memcpy(&nf, &n, sizeof(nf));
  Lanes bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(nf, Lanes) << 23;  // p * 2^n: p in [0.70, 1.42], n in [-126, 126]
  Vec e;
  std::memcpy(&e, &bits, sizeof(e));
  e = Vec::blendv(e, Vec(__builtin_huge_valf()), t > Vec(126.f));
  return Vec(1.f) / (Vec(1.f) + e);
}

// exp(x - m) following the limit when m is infinite (x == m -> 1, covering m = +inf).
Vec softmax_numerator(Vec x, Vec m) { return Vec::blendv((x - m).exp_u20(), Vec(1.f), x == m); }

// NaN -> -inf. AVX max returns its second operand when the first is NaN: one instruction.
Vec drop_nan(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(v, _mm512_set1_ps(K::neg_inf()));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(v, _mm256_set1_ps(K::neg_inf()));
#else
  return sanitize(v);
#endif
}

// Ordered keys (as ordered(), for NaN-free keys) as lanes. The map is its own inverse: from_ordered undoes it.
// ordered_bits: for keys that are never -0.0.
Lanes ordered_bits(Vec key) {
  Lanes bits;
  std::memcpy(&bits, &key, sizeof(bits));
  return bits ^ ((bits >> 31) & splat(0x7FFFFFFF));
}
Lanes ordered_lanes(Vec key) { return ordered_bits(key + Vec(0.f)); }  // -0.0 + 0.0 = +0.0: ranks as +0.0
float lane0(Vec v) {
  float first;
  std::memcpy(&first, &v, sizeof(first));
  return first;
}
Vec as_vec(Lanes v) {
  Vec out;
  std::memcpy(&out, &v, sizeof(v));
  return out;
}
Vec from_ordered(Lanes v) {
  v ^= (v >> 31) & splat(0x7FFFFFFF);
  Vec key;
  std::memcpy(&key, &v, sizeof(v));
  return key;
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks of R rows, one row per lane.

struct Block {
  void reset(const Config& c) {
    x.resize(c.E * R);
    ord.resize(c.E * R);
    group_ord.resize(c.num_groups * R);
    group_keep.resize(c.num_groups * R);
    ids.resize(c.k * R);
    w.resize(c.k * R);
    group_best.resize(c.num_groups);
    group_second.resize(c.num_groups);
    weight.resize(c.k);
  }
  std::vector<float> x;         // [E][R] logits, NaN -> -inf
  std::vector<int32_t> ord;     // [E][R] ordered selection keys
  std::vector<int32_t> group_ord, group_keep;
  std::vector<int32_t> ids;     // [k][R]
  std::vector<float> w;         // [k][R]
  std::vector<Vec> group_best, group_second, weight;
};

template <typename scalar_t>
void load_block(const scalar_t* src, int64_t rows, int64_t row_stride, int64_t col_stride, int64_t E,
                float* x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (col_stride == 1 && rows == R && E % R == 0) {  // whole tiles: SIMD transposes
      for (int64_t e = 0; e < E; e += R) at::vec::transpose_mxn<float, R, R>(src + e, row_stride, x + e * R, R);
      for (int64_t e = 0; e < E; ++e) sanitize(Vec::loadu(x + e * R)).store(x + e * R);
      return;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (r < rows) {
      const scalar_t* row = src + r * row_stride;
      for (int64_t e = 0; e < E; ++e) x[e * R + r] = static_cast<float>(row[e * col_stride]);
    } else {
      for (int64_t e = 0; e < E; ++e) x[e * R + r] = 0.f;  // idle lanes: any finite value
    }
  }
  for (int64_t e = 0; e < E; ++e) sanitize(Vec::loadu(x + e * R)).store(x + e * R);
}

template <typename scalar_t>
void route_block(const scalar_t* src, int64_t rows, int64_t row_stride, int64_t col_stride, const Config& c,
                 Block& b, float* w_out, int32_t* id_out) {
  const int64_t E = c.E, G = c.num_groups, gsize = E / G;
  float* x = b.x.data();
  int32_t* ord = b.ord.data();
  load_block(src, rows, row_stride, col_stride, E, x);

  // Softmax statistics per row: max m and 1/denominator (0 for rows without mass).
  Vec m(0.f), inv(0.f);
  const bool softmax_before = c.softmax(), statistics = c.statistics();
  if (statistics) {
    m = Vec(K::neg_inf());
    for (int64_t e = 0; e < E; ++e) m = at::vec::maximum(m, Vec::loadu(x + e * R));
    Vec sum(0.f);
    for (int64_t e = 0; e < E; ++e) sum = sum + softmax_numerator(Vec::loadu(x + e * R), m);
    inv = Vec::blendv(Vec(1.f) / sum, Vec(0.f), m == Vec(K::neg_inf()));
  }

  // Keys -> ordered ints, with the group scores accumulated on the way (best and second best key).
  Vec* group_best = b.group_best.data();
  Vec* group_second = b.group_second.data();
  for (int64_t g = 0; g < G; ++g) group_best[g] = group_second[g] = Vec(K::neg_inf());
  for (int64_t e = 0; e < E; ++e) {
    const Vec xe = Vec::loadu(x + e * R);
    Vec key = xe;
    if (!c.key_is_logit) {
      if (c.sigmoid) {
        key = sigmoid(xe);
      } else if (softmax_before) {
        key = softmax_numerator(xe, m) * inv;
      }
      if (c.bias != nullptr) key = key + Vec(c.bias[e]);
      key = sanitize(key);
    }
    ordered(key).store(ord + e * R);
    if (G > 1) {
      const int64_t g = e / gsize;
      group_second[g] = at::vec::maximum(group_second[g], at::vec::minimum(group_best[g], key));
      group_best[g] = at::vec::maximum(group_best[g], key);
    }
  }

  if (G > 1) {
    int32_t* gord = b.group_ord.data();
    int32_t* keep = b.group_keep.data();
    for (int64_t g = 0; g < G; ++g) {
      const Vec score = c.top2_sum ? sanitize(group_best[g] + group_second[g]) : group_best[g];
      ordered(score).store(gord + g * R);
      VecI(0).store(keep + g * R);
    }
    for (int64_t i = 0; i < c.topk_groups; ++i) {
      VecI best(kTaken), best_g(0);
      for (int64_t g = 0; g < G; ++g) {
        const VecI v = VecI::loadu(gord + g * R);
        const VecI better = v > best;
        best = VecI::blendv(best, v, better);
        best_g = VecI::blendv(best_g, VecI(static_cast<int32_t>(g)), better);
      }
      for (int64_t g = 0; g < G; ++g) {
        const VecI hit = best_g == VecI(static_cast<int32_t>(g));
        VecI::blendv(VecI::loadu(gord + g * R), VecI(kTaken), hit).store(gord + g * R);
        (VecI::loadu(keep + g * R) | hit).store(keep + g * R);
      }
    }
    for (int64_t e = 0; e < E; ++e) {
      const VecI keep_e = VecI::loadu(keep + (e / gsize) * R);
      VecI::blendv(VecI(kDisallowed), VecI::loadu(ord + e * R), keep_e).store(ord + e * R);
    }
  }

  // k lane-wise argmax passes. Strict > over increasing e keeps ties at the lower index; four interleaved
  // streams keep the compare-select chains independent, and the merge keeps the lowest index among equals.
  // Each pass also retires the previous winner (whole-vector stores: no store-to-load forwarding stalls).
  constexpr int64_t S = 4;
  Lanes previous = splat(-1);
  for (int64_t j = 0; j < c.k; ++j) {
    Lanes best[S], best_e[S];
    for (int64_t s = 0; s < S; ++s) best[s] = splat(kTaken), best_e[s] = splat(INT32_MAX);
    auto visit = [&](int64_t e, int64_t s) {
      const Lanes here = splat(static_cast<int32_t>(e));
      Lanes v = load_lanes(ord + e * R);
      if (j > 0) {
        v = previous == here ? splat(kTaken) : v;
        store_lanes(ord + e * R, v);
      }
      const Lanes better = v > best[s];
      best[s] = better ? v : best[s];
      best_e[s] = better ? here : best_e[s];
    };
    int64_t e = 0;
    for (; e + S <= E; e += S) {
      for (int64_t s = 0; s < S; ++s) visit(e + s, s);
    }
    for (; e < E; ++e) visit(e, 0);
    Lanes top = best[0];
    for (int64_t s = 1; s < S; ++s) top = max_lanes(best[s], top);
    Lanes winner = splat(INT32_MAX);
    for (int64_t s = 0; s < S; ++s) winner = (best[s] == top && best_e[s] < winner) ? best_e[s] : winner;
    store_lanes(b.ids.data() + j * R, winner);
    previous = winner;
  }

  // Weights, lane-wise per slot, from the chosen logits (gathered from the block).
  const VecI lane_offsets = VecI::loadu(&kIota);
  auto chosen_logit = [&](int64_t j) {
    return at::vec::gather<sizeof(float)>(x, VecI::loadu(b.ids.data() + j * R) * VecI(R) + lane_offsets);
  };
  if (softmax_before && !statistics) {
    m = chosen_logit(0);  // the rows' maxima: the best keys are the largest logits
    inv = Vec::blendv(Vec(1.f), Vec(0.f), m == Vec(K::neg_inf()));
  }
  Vec* w = b.weight.data();
  for (int64_t j = 0; j < c.k; ++j) {
    const Vec bx = chosen_logit(j);
    if (c.softmax_after_topk) {
      w[j] = bx;
    } else if (c.sigmoid) {
      w[j] = sigmoid(bx);
    } else {
      w[j] = softmax_numerator(bx, m) * inv;
    }
  }
  if (c.softmax_after_topk) {
    Vec cm(K::neg_inf());
    for (int64_t j = 0; j < c.k; ++j) cm = at::vec::maximum(cm, w[j]);
    Vec sum(0.f);
    for (int64_t j = 0; j < c.k; ++j) sum = sum + (w[j] = softmax_numerator(w[j], cm));
    const Vec scale = Vec::blendv(Vec(c.scale) / sum, Vec(0.f), cm == Vec(K::neg_inf()));
    for (int64_t j = 0; j < c.k; ++j) w[j] = w[j] * scale;
  } else {
    if (c.renormalize) {
      Vec sum(0.f);
      for (int64_t j = 0; j < c.k; ++j) sum = sum + w[j];
      const Vec denom = sum + Vec(K::kRenormEps);
      for (int64_t j = 0; j < c.k; ++j) w[j] = w[j] / denom;
    }
    for (int64_t j = 0; j < c.k; ++j) w[j] = w[j] * Vec(c.scale);
  }

  float* lane_w = b.w.data();
  for (int64_t j = 0; j < c.k; ++j) w[j].store(lane_w + j * R);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < c.k; ++j) {
      w_out[r * c.k + j] = lane_w[j * R + r];
      id_out[r * c.k + j] = b.ids[j * R + r];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One row at a time, experts across the lanes.

// Whether route_rows_fused applies: up to R picks from whole vectors of experts, and groups (if any) of whole
// vectors, at most R of them, the chosen of which hold at least k experts.
bool fused_row_layout(const Config& c) {
  if (c.k > R || c.E % R != 0 || c.softmax_after_topk) return false;
  if (c.num_groups == 1) return true;
  const int64_t size = c.E / c.num_groups;
  return c.num_groups <= R && size % R == 0 && c.topk_groups * size >= c.k;
}

struct RowScratch {
  void reset(const Config& c) {
    vectors = at::divup(c.E, R);
    chunks = at::divup(c.k, R);
    x.resize(vectors * R);
    key.resize(vectors * R);
    ord.resize(vectors * R);
    candidate_key.resize(std::max(vectors, int64_t{2}) * R + R);
    candidate_id.resize(vectors * R + R);
    chunk_max.resize(chunks * R);
    group_ranks.resize(c.num_groups);
    group_keep.resize(c.num_groups);
    kept_vectors.resize(vectors);
    slot.resize(c.k + 1);
    slot_key.resize(std::max(c.k + 1, R));
    chosen.resize(chunks * R);
    group_lanes.resize(5 * R * R);
    fused = fused_row_layout(c);
  }
  int64_t vectors = 0, chunks = 0;
  std::vector<float> x, key;
  std::vector<int32_t> ord;  // ordered keys; kDisallowed outside the chosen groups, kTaken in the padding lanes
  std::vector<int32_t> candidate_key, candidate_id;
  std::vector<int32_t> chunk_max;
  std::vector<int64_t> group_ranks;
  std::vector<char> group_keep;
  std::vector<int32_t> kept_vectors;  // the chosen groups' vectors (groups of whole vectors)
  std::vector<int32_t> slot, slot_key;  // slot[k]: where candidates ranked k or lower land; slot_key: their keys
  std::vector<float> chosen;
  std::vector<int32_t> group_lanes;  // route_rows_fused: the groups' lane-wise best and second best, transposed
  bool fused = false;
};

float lanes_max(Vec v) {
  alignas(64) float lanes[R];
  v.store(lanes);
  return *std::max_element(lanes, lanes + R);
}

float lanes_sum(Vec v) {
  alignas(64) float lanes[R];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t r = 0; r < R; ++r) sum += lanes[r];
  return sum;
}

// The best and second best of a group's float keys (size >= 2 when called), from lane-wise maxima.
[[gnu::always_inline]] inline void group_top2(const float* key, int64_t size, float& best, float& second) {
  best = second = K::neg_inf();
  int64_t e = 0;
  if (size >= R) {
    Vec b(K::neg_inf()), s(K::neg_inf());
    for (; e + R <= size; e += R) {
      const Vec v = Vec::loadu(key + e);
      s = at::vec::maximum(s, at::vec::minimum(b, v));
      b = at::vec::maximum(b, v);
    }
    alignas(64) float lb[R], ls[R];
    b.store(lb);
    s.store(ls);
    for (int64_t r = 0; r < R; ++r) {
      second = std::max(second, std::min(best, lb[r]));
      best = std::max(best, lb[r]);
      second = std::max(second, ls[r]);
    }
  }
  for (; e < size; ++e) {
    second = std::max(second, std::min(best, key[e]));
    best = std::max(best, key[e]);
  }
}

// Lane-wise best and second best of a stream of keys (distinct elements: the displaced best moves down).
[[gnu::always_inline]] inline void keep_top2(Lanes v, Lanes& best, Lanes& second) {
  second = max_lanes(second, min_lanes(best, v));
  best = max_lanes(best, v);
}

// The k-th largest (k <= R) of the 2R keys in the lanes' best and second best.
inline int32_t kth_of_top2(Lanes best, Lanes second, int64_t k) {
  const Lanes b = sort_descending(best);
  const Lanes s2 = reversed(sort_descending(second), std::make_index_sequence<R>{});
  const Lanes top = bitonic_merge<R, R / 2>(max_lanes(b, s2));  // the R largest of the 2R, descending
  return std::max(top[k - 1], kDisallowed);
}

// The same with the lanes' third best too: the k-th largest of 3R keys.
[[gnu::always_inline]] inline void keep_top3(Lanes v, Lanes& best, Lanes& second, Lanes& third) {
  const Lanes below_best = min_lanes(best, v);
  best = max_lanes(best, v);
  third = max_lanes(third, min_lanes(second, below_best));
  second = max_lanes(second, below_best);
}
// The R largest of the lanes' three best, descending.
inline Lanes top_of_top3(Lanes best, Lanes second, Lanes third) {
  const Lanes b = sort_descending(best);
  const Lanes s2 = reversed(sort_descending(second), std::make_index_sequence<R>{});
  const Lanes top = bitonic_merge<R, R / 2>(max_lanes(b, s2));
  const Lanes t3 = reversed(sort_descending(third), std::make_index_sequence<R>{});
  return bitonic_merge<R, R / 2>(max_lanes(top, t3));
}

// A bound t with at least k of the row's ordered keys >= t, close to the k-th largest. k <= R: the k-th
// largest of the lanes' best and second-best keys (distinct experts), by sorting both registers and merging
// their top halves; otherwise the k-th largest of k chunk maxima. Never below kDisallowed, so padding
// (kTaken) never qualifies and, when fewer than k keys are real, every expert does.
// The vectors read are ord + vectors[i] * R (all V when vectors is null).
int32_t selection_threshold(const int32_t* ord, const int32_t* vectors, int64_t V, int64_t k, RowScratch& s) {
  auto vector_at = [&](int64_t i) { return ord + (vectors ? vectors[i] : i) * R; };
  if (k <= R) {
    Lanes best = splat(kTaken), second = splat(kTaken);
    for (int64_t i = 0; i < V; ++i) keep_top2(load_lanes(vector_at(i)), best, second);
    return kth_of_top2(best, second, k);
  }
  const int64_t M = s.chunks;
  int32_t* chunk = s.chunk_max.data();
  std::fill(chunk, chunk + M * R, kTaken);
  for (int64_t i = 0; i < V; ++i) {
    int32_t* acc = chunk + (i % M) * R;
    store_lanes(acc, max_lanes(load_lanes(vector_at(i)), load_lanes(acc)));
  }
  std::nth_element(chunk, chunk + (k - 1), chunk + M * R, std::greater<>());
  return std::max(chunk[k - 1], kDisallowed);
}

// Appends the lanes of `keys` that are >= t (and their expert ids, first + lane) at key_out / id_out, in lane
// order, and returns how many. Whole-register stores: both outputs need R free slots past the count.
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// For each 8-bit lane mask, the lanes it selects packed to the front (one byte per lane index).
struct CompactTable {
  uint64_t lanes[256];
  constexpr CompactTable() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int i = 0; i < 8; ++i)
        if (m >> i & 1) lanes[m] |= static_cast<uint64_t>(i) << (8 * n++);
    }
  }
};
constexpr CompactTable kCompact;
#endif

inline int64_t compact(Lanes keys, int32_t t, int32_t first, int32_t* key_out, int32_t* id_out) {
  const Lanes ids = kIota + first;
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 m = _mm512_cmpge_epi32_mask(reinterpret_cast<__m512i>(keys), _mm512_set1_epi32(t));
  _mm512_storeu_si512(key_out, _mm512_maskz_compress_epi32(m, reinterpret_cast<__m512i>(keys)));
  _mm512_storeu_si512(id_out, _mm512_maskz_compress_epi32(m, reinterpret_cast<__m512i>(ids)));
  return __builtin_popcount(m);
#elif defined(CPU_CAPABILITY_AVX2)
  const uint32_t m = mask_bits(keys >= splat(t));
  const __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompact.lanes + m)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(key_out),
                      _mm256_permutevar8x32_epi32(reinterpret_cast<__m256i>(keys), lanes));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(id_out),
                      _mm256_permutevar8x32_epi32(reinterpret_cast<__m256i>(ids), lanes));
  return __builtin_popcount(m);
#else
  int64_t n = 0;
  for (int64_t i = 0; i < R; ++i) {
    key_out[n] = keys[i];
    id_out[n] = ids[i];
    n += keys[i] >= t;
  }
  return n;
#endif
}

// Lane i rotated to lane (i - s) mod R: lane i then holds element (i + s) mod R.
template <int S, std::size_t... I>
[[gnu::always_inline]] inline Lanes rotated(Lanes v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, static_cast<int>((I + S) % R)...);
}
template <int S, std::size_t... I>
constexpr Lanes wraps(std::index_sequence<I...>) {  // lanes where (i + S) mod R < i
  return Lanes{(I + S >= static_cast<std::size_t>(R) ? -1 : 0)...};
}
// rank[i] += candidates j = (i + s) mod R ahead of candidate i: a greater key, or an equal key and j < i.
template <int S = 1>
[[gnu::always_inline]] inline void count_ahead(Lanes keys, Lanes& rank) {
  if constexpr (S < R) {
    const Lanes other = rotated<S>(keys, std::make_index_sequence<R>{});
    rank -= (other > keys) | ((other == keys) & wraps<S>(std::make_index_sequence<R>{}));
    count_ahead<S + 1>(keys, rank);
  }
}

// rank_a[i] += candidates of b (all of higher index) with a key greater than a[i]; rank_b[i] += candidates of
// a with a key >= b[i].
template <int S = 0>
[[gnu::always_inline]] inline void count_across(Lanes a, Lanes b, Lanes& rank_a, Lanes& rank_b) {
  if constexpr (S < R) {
    rank_a -= rotated<S>(b, std::make_index_sequence<R>{}) > a;
    rank_b -= rotated<S>(a, std::make_index_sequence<R>{}) >= b;
    count_across<S + 1>(a, b, rank_a, rank_b);
  }
}

// The k best of n <= 2R candidates (keys past n are ignored), by rank, into slot[0..k); slot[k] takes the rest.
// slot_key (optional): the keys by slot as well.
inline void rank_two_registers(const int32_t* keys, const int32_t* ids, int64_t n, int64_t k, int32_t* slot,
                               int32_t* slot_key) {
  const Lanes count = splat(static_cast<int32_t>(n));
  const Lanes a = kIota < count ? load_lanes(keys) : splat(kTaken);
  const Lanes b = kIota + static_cast<int32_t>(R) < count ? load_lanes(keys + R) : splat(kTaken);
  // Both registers whatever n (no branch to mispredict); candidates past n rank after every real one, and every
  // lane lands in a slot (past k: slot[k]), a fixed number of steps.
  Lanes rank_a = splat(0), rank_b = splat(0);
  count_ahead(a, rank_a);
  count_ahead(b, rank_b);
  count_across(a, b, rank_a, rank_b);
  alignas(64) int32_t rank[2 * R];
  store_lanes(rank, min_lanes(rank_a, splat(static_cast<int32_t>(k))));
  store_lanes(rank + R, min_lanes(rank_b, splat(static_cast<int32_t>(k))));
  for (int64_t i = 0; i < 2 * R; ++i) slot[rank[i]] = ids[i];
  if (slot_key != nullptr)
    for (int64_t i = 0; i < 2 * R; ++i) slot_key[rank[i]] = keys[i];
}

// rank_two_registers for n <= R candidates.
inline void rank_one_register(const int32_t* keys, const int32_t* ids, int64_t n, int64_t k, int32_t* slot,
                              int32_t* slot_key) {
  const Lanes a = kIota < splat(static_cast<int32_t>(n)) ? load_lanes(keys) : splat(kTaken);
  Lanes rank_a = splat(0);
  count_ahead(a, rank_a);
  alignas(64) int32_t rank[R];
  store_lanes(rank, min_lanes(rank_a, splat(static_cast<int32_t>(k))));
  for (int64_t i = 0; i < R; ++i) slot[rank[i]] = ids[i];
  if (slot_key != nullptr)
    for (int64_t i = 0; i < R; ++i) slot_key[rank[i]] = keys[i];
}

// The k best of the n candidates by rank into slot[0..k) (slot[k] takes the rest), and their keys into
// slot_key when given; cand_key needs R free slots past n.
inline void rank_candidates(int32_t* cand_key, const int32_t* cand_id, int64_t n, int64_t k, int32_t* slot,
                            int32_t* slot_key = nullptr) {
  if (n <= 2 * R) {
    rank_two_registers(cand_key, cand_id, n, k, slot, slot_key);
    return;
  }
  std::fill(cand_key + n, cand_key + at::divup(n, R) * R, kTaken);
  for (int64_t i = 0; i < n; ++i) {
    const Lanes ki = splat(cand_key[i]), here = splat(static_cast<int32_t>(i));
    int64_t rank = 0;
    for (int64_t j = 0; j < n; j += R) {
      const Lanes kj = load_lanes(cand_key + j);
      rank += __builtin_popcount(mask_bits((kj > ki) | ((kj == ki) & (kIota + static_cast<int32_t>(j) < here))));
    }
    slot[std::min(rank, k)] = cand_id[i];
    if (slot_key != nullptr) slot_key[std::min(rank, k)] = cand_key[i];
  }
}

// The first k lanes of v at out: a whole store where the R - k lanes past them may be written (the next rows'
// slots, written again when those rows are routed), else a masked one (slow on some CPUs) or a loop.
inline void store_first(int32_t* out, Lanes v, int64_t k, bool whole) {
  if (whole) return store_lanes(out, v);
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_mask_storeu_epi32(out, static_cast<__mmask16>((1u << k) - 1), reinterpret_cast<__m512i>(v));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_maskstore_epi32(out, reinterpret_cast<__m256i>(kIota < splat(static_cast<int32_t>(k))),
                         reinterpret_cast<__m256i>(v));
#else
  for (int64_t j = 0; j < k; ++j) out[j] = v[j];
#endif
}
inline void store_first(float* out, Vec v, int64_t k, bool whole) {
  if (whole) return v.store(out);
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << k) - 1), v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_maskstore_ps(out, reinterpret_cast<__m256i>(kIota < splat(static_cast<int32_t>(k))), v);
#else
  v.store(out, static_cast<int>(k));
#endif
}

// k <= R: the k ids (from slot) and their weights in one register each (lanes past k are computed and dropped).
// x: the row's logits (NaN is read as -inf); m, inv: the softmax statistics when computed. chosen_logits
// (optional, R lanes readable): the chosen logits as ordered keys by slot, read instead of gathering from x.
// ids and chosen: the chosen experts and their logits (NaN-free) by slot, lanes past k ignored.
inline void weights_of_chosen(Lanes ids, Vec chosen, const Config& c, float m, float inv, float* w_out,
                              int32_t* id_out, bool whole) {
  store_first(id_out, ids, c.k, whole);
  if (c.softmax() && !c.statistics()) {
    m = lane0(chosen);  // the row's maximum: the best key is the largest logit
    inv = m == K::neg_inf() ? 0.f : 1.f;
  }
  Vec w = c.sigmoid ? sigmoid(chosen) : softmax_numerator(chosen, Vec(m)) * Vec(inv);
  if (c.renormalize) {  // the sum in slot order, as K::finish_weights
    alignas(64) float lane_w[R];
    w.store(lane_w);
    float sum = 0.f;
    for (int64_t j = 0; j < c.k; ++j) sum += lane_w[j];
    w = w / Vec(sum + K::kRenormEps);
  }
  store_first(w_out, w * Vec(c.scale), c.k, whole);
}

inline void weights_in_register(const float* x, const int32_t* slot, const Config& c, float m, float inv,
                                float* w_out, int32_t* id_out, bool whole, const int32_t* chosen_logits = nullptr) {
  const Lanes ids = kIota < splat(static_cast<int32_t>(c.k)) ? load_lanes(slot) : splat(0);
  Vec chosen;
  if (chosen_logits != nullptr) {
    chosen = from_ordered(load_lanes(chosen_logits));
  } else {
    VecI chosen_id;
    std::memcpy(&chosen_id, &ids, sizeof(ids));
    chosen = sanitize(at::vec::gather<sizeof(float)>(x, chosen_id));
  }
  weights_of_chosen(ids, chosen, c, m, inv, w_out, id_out, whole);
}

// An R x R block of int32 transposed (bit-exact: the float shuffles move bits).
void transpose_lanes(const int32_t* src, int32_t* dst) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  // In registers (ATen's version goes through an array of vectors in memory).
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i * 8));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);
      r[i + j + 2] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
    }
  }
  // r[0..3] of rows 0-3 and r[4..7] of rows 4-7 now hold columns {0,4} {1,5} {2,6} {3,7} (as 128-bit halves).
  constexpr int column_of[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j) {
    float* out = reinterpret_cast<float*>(dst);
    _mm256_storeu_ps(out + column_of[j] * 8, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(out + (column_of[j] + 4) * 8, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
#elif defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float, R, R>(reinterpret_cast<const float*>(src), R, reinterpret_cast<float*>(dst), R);
#else
  at::vec::transpose_mxn<int32_t, R, R>(src, R, dst, R);
#endif
}

// How route_rows_fused computes a key: the logit, or the sigmoid or softmax score (+ bias). A template argument,
// so the loop over the row has no branch on it.
enum class KeyKind { kLogit, kSigmoid, kSoftmax };

// One row (float32, contiguous) in stages, each key computed once: stored as an ordered int and folded into the
// lanes' three best on the way, per group when grouped. The groups' lane maxima, transposed, give every group's
// score in one register, where the groups are ranked by counting; the threshold (the k-th largest of the lanes'
// three best, a sorting network) then comes from the chosen groups' lane maxima without reading their keys again.
// With three per lane the candidates {key >= t} are exactly the k best unless a lane holds more than three of them
// (~7% of random Qwen3 rows) or keys tie; then each candidate's rank is read off the sorted register and its id
// (and logit) placed in that lane, with no ranking through memory. Other rows rank as route_row does. Same
// results as route_row's general path. The stages after the pass over the keys are chains of dependent steps:
// route_rows_fused runs each stage for two rows before the next, so the CPU overlaps the two chains.
template <KeyKind kKey>
struct FusedRow {
  const float* row;
  const Config* c;
  RowScratch* s;
  float* w_out;
  int32_t* id_out;
  bool whole;
  float m = 0.f, inv = 1.f;  // softmax statistics, where computed
  Lanes best, second, third;  // lane-wise three best of the (chosen groups') keys
  Lanes top;                  // the R largest of those, descending
  Lanes ids;                  // candidate i's id in lane rank(i), when the fast ranking holds (see candidates)
  Vec logits;                 // and its logit (keys other than the logit)
  int64_t count = 0, n = 0;  // vectors to search (s->kept_vectors), candidates found

  Lanes key_at(int64_t i) const {
    const Vec x = drop_nan(Vec::loadu(row + i * R));
    if constexpr (kKey == KeyKind::kLogit) {
      return ordered_lanes(x);
    } else {
      // A score is >= +0, so score + bias is never -0.0: no sign fix (ordered_lanes' add) on this path.
      Vec key = kKey == KeyKind::kSigmoid ? sigmoid(x) : softmax_numerator(x, Vec(m)) * Vec(inv);
      if (c->bias != nullptr) key = drop_nan(key + Vec::loadu(c->bias + i * R));
      return ordered_bits(key);
    }
  }

  // The keys (ordered, into s->ord) and the lanes' three best; grouped: each group's.
  void keys() {
    const int64_t V = c->E / R, G = c->num_groups;
    int32_t* ord = s->ord.data();
    if (c->statistics()) {
      Vec acc(K::neg_inf());
      for (int64_t i = 0; i < V; ++i) acc = at::vec::maximum(acc, drop_nan(Vec::loadu(row + i * R)));
      m = lanes_max(acc);
      Vec sum(0.f);
      for (int64_t i = 0; i < V; ++i) sum = sum + softmax_numerator(drop_nan(Vec::loadu(row + i * R)), Vec(m));
      inv = m == K::neg_inf() ? 0.f : 1.f / lanes_sum(sum);
    }
    if (G == 1) {
      best = second = third = splat(kTaken);
      for (int64_t i = 0; i < V; ++i) {
        const Lanes key = key_at(i);
        store_lanes(ord + i * R, key);
        keep_top3(key, best, second, third);
      }
      for (int64_t i = 0; i < V; ++i) s->kept_vectors[i] = static_cast<int32_t>(i);
      count = V;
      return;
    }
    // group_lanes [5][R][R]: per group its lane-wise three best, then the best and second best transposed (the
    // rows of padding groups g >= G are not written: their lanes are masked after the transpose).
    const int64_t P = V / G;
    int32_t* gbest = s->group_lanes.data();
    int32_t* gsecond = gbest + R * R;
    int32_t* gthird = gsecond + R * R;
    for (int64_t g = 0; g < G; ++g) {
      Lanes b = splat(kTaken), sec = splat(kTaken), th = splat(kTaken);
      for (int64_t i = g * P; i < (g + 1) * P; ++i) {
        const Lanes key = key_at(i);
        store_lanes(ord + i * R, key);
        keep_top3(key, b, sec, th);
      }
      store_lanes(gbest + g * R, b);
      store_lanes(gsecond + g * R, sec);
      store_lanes(gthird + g * R, th);
    }
  }

  // Grouped: the best topk_groups groups, and the lanes' three best over their experts.
  void groups() {
    const int64_t G = c->num_groups, P = c->E / R / G;
    if (G == 1) return;
    int32_t* gbest = s->group_lanes.data();
    int32_t* gsecond = gbest + R * R;
    int32_t* gthird = gsecond + R * R;
    int32_t* tbest = gthird + R * R;
    int32_t* tsecond = tbest + R * R;
    transpose_lanes(gbest, tbest);  // lane g: group g
    transpose_lanes(gsecond, tsecond);
    Lanes b = load_lanes(tbest), sec = load_lanes(tsecond);
    for (int64_t j = 1; j < R; ++j) {
      keep_top2(load_lanes(tbest + j * R), b, sec);
      sec = max_lanes(sec, load_lanes(tsecond + j * R));
    }
    const Vec score = c->top2_sum ? sanitize(from_ordered(b) + from_ordered(sec)) : from_ordered(b);
    const Lanes real = kIota < splat(static_cast<int32_t>(G));
    const Lanes group_key = real ? ordered_lanes(score) : splat(kTaken);
    Lanes rank = splat(0);
    count_ahead(group_key, rank);
    // Exactly topk_groups groups kept (the ranks are distinct; the padding ranks last).
    const uint32_t keep = mask_bits(rank < splat(static_cast<int32_t>(c->topk_groups)));
    best = second = third = splat(kTaken);
    count = 0;
    for (uint32_t bits = keep; bits; bits &= bits - 1) {
      const int64_t g = __builtin_ctz(bits);  // its lanes' three best: distinct experts, merged one by one
      keep_top3(load_lanes(gbest + g * R), best, second, third);
      keep_top3(load_lanes(gsecond + g * R), best, second, third);
      keep_top3(load_lanes(gthird + g * R), best, second, third);
      for (int64_t i = g * P; i < (g + 1) * P; ++i) s->kept_vectors[count++] = static_cast<int32_t>(i);
    }
  }

  // The candidates {key >= t} of the vectors searched, in index order: one bit each (64 / R vectors to a word),
  // then one step per set bit. The trip count is k for all but a few rows: the loop exit predicts well.
  // When there are exactly k and the k largest in `top` are distinct, candidate i's rank is the count of `top`'s
  // lanes above its key: its id (and logit) goes to that lane in registers, no ranking through memory.
  void candidates() {
    top = top_of_top3(best, second, third);
    const int32_t t = std::max(top[c->k - 1], kDisallowed);
    ids = splat(0);
    logits = Vec(0.f);
    const int32_t* ord = s->ord.data();
    const int32_t* vectors = s->kept_vectors.data();
    int32_t* cand_key = s->candidate_key.data();
    int32_t* cand_id = s->candidate_id.data();
    constexpr int64_t per_word = 64 / R;
    const Lanes below = splat(t - 1);  // t > INT32_MIN
    for (int64_t w = 0; w * per_word < count; ++w) {
      uint64_t bits = 0;
      const int64_t end = std::min(count, (w + 1) * per_word);
      for (int64_t j = w * per_word; j < end; ++j)
        bits |= static_cast<uint64_t>(mask_bits(load_lanes(ord + vectors[j] * R) > below)) << ((j % per_word) * R);
      for (; bits; bits &= bits - 1) {
        const int64_t bit = __builtin_ctzll(bits);
        const int32_t e = vectors[w * per_word + bit / R] * static_cast<int32_t>(R) + static_cast<int32_t>(bit % R);
        const int32_t key = ord[e];
        cand_key[n] = key;
        cand_id[n++] = e;
        const Lanes lane = kIota == splat(static_cast<int32_t>(__builtin_popcount(mask_bits(top > splat(key)))));
        ids = lane ? splat(e) : ids;
        if constexpr (kKey != KeyKind::kLogit) logits = Vec::blendv(logits, Vec(row[e]), as_vec(lane));
      }
    }
  }

  // The fast ranking holds: n = k and the k largest distinct (ties go through rank_candidates).
  bool ranked() const {
    const Lanes next = rotated<1>(top, std::make_index_sequence<R>{});  // lane j: top[j + 1]
    const uint32_t strict = mask_bits(top > next) | ~((1u << (c->k - 1)) - 1);
    return n == c->k && strict == ~0u;
  }

  // Ranks, ids and weights. With the logit as key the chosen keys are the chosen logits: no gather.
  void finish() {
    if (ranked()) {
      const Vec chosen = kKey == KeyKind::kLogit ? from_ordered(top) : drop_nan(logits);
      return weights_of_chosen(ids, chosen, *c, m, inv, w_out, id_out, whole);
    }
    int32_t* slot = s->slot.data();
    int32_t* slot_key = kKey == KeyKind::kLogit ? s->slot_key.data() : nullptr;
    // Three best per lane: n = k unless a lane holds more than three of the k best (~7% of random Qwen3 rows).
    if (n <= R) {
      rank_one_register(s->candidate_key.data(), s->candidate_id.data(), n, c->k, slot, slot_key);
    } else {
      rank_candidates(s->candidate_key.data(), s->candidate_id.data(), n, c->k, slot, slot_key);
    }
    weights_in_register(row, slot, *c, m, inv, w_out, id_out, whole, slot_key);
  }
};

template <KeyKind kKey, int N>
void route_rows_fused(FusedRow<kKey>* rows) {
  for (int r = 0; r < N; ++r) rows[r].keys();
  for (int r = 0; r < N; ++r) rows[r].groups();
  for (int r = 0; r < N; ++r) rows[r].candidates();
  for (int r = 0; r < N; ++r) rows[r].finish();
}

// One or two rows (float32, contiguous: row[r], with scratch s[r]); see FusedRow.
template <int N>
void route_rows_fused(const float* const* row, const Config& c, RowScratch* s, float* const* w_out,
                      int32_t* const* id_out, const bool* whole) {
  auto run = [&](auto kind) {
    using Row = FusedRow<decltype(kind)::value>;
    Row rows[N];
    for (int r = 0; r < N; ++r) {
      rows[r].row = row[r];
      rows[r].c = &c;
      rows[r].s = &s[r];
      rows[r].w_out = w_out[r];
      rows[r].id_out = id_out[r];
      rows[r].whole = whole[r];
    }
    route_rows_fused<decltype(kind)::value, N>(rows);
  };
  if (c.key_is_logit) return run(std::integral_constant<KeyKind, KeyKind::kLogit>{});
  if (c.sigmoid) return run(std::integral_constant<KeyKind, KeyKind::kSigmoid>{});
  run(std::integral_constant<KeyKind, KeyKind::kSoftmax>{});
}

// The row's logits into x (NaN -> -inf, padding -inf). Whole vectors straight from the source: a vector load
// of data just written by narrower or differently aligned stores (memcpy) would stall on store forwarding.
template <typename scalar_t>
void load_row(const scalar_t* src, int64_t col_stride, int64_t E, int64_t V, float* x) {
  int64_t e = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (col_stride == 1)
      for (; e + R <= E; e += R) sanitize(Vec::loadu(src + e)).store(x + e);
  }
  if (e == E) return;
  const int64_t tail = e;
  for (; e < E; ++e) x[e] = static_cast<float>(src[e * col_stride]);
  std::fill(x + E, x + V * R, K::neg_inf());
  for (e = tail; e < V * R; e += R) sanitize(Vec::loadu(x + e)).store(x + e);
}

template <typename scalar_t>
// whole: the output rows after this one (up to R - k slots) are routed later by this thread (see store_first).
void route_row(const scalar_t* src, int64_t col_stride, const Config& c, RowScratch& s, float* w_out,
               int32_t* id_out, bool whole) {
  const int64_t E = c.E, V = s.vectors, G = c.num_groups;
  float* x = s.x.data();
  if (s.fused) {
    const float* row = x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (col_stride == 1) row = src;
    }
    if (row == x) load_row(src, col_stride, E, V, x);
    return route_rows_fused<1>(&row, c, &s, &w_out, &id_out, &whole);
  }
  float* key = s.key.data();
  int32_t* ord = s.ord.data();
  load_row(src, col_stride, E, V, x);

  const bool softmax = c.softmax(), statistics = c.statistics();
  float m = 0.f, inv = 1.f;
  if (statistics) {
    Vec acc(K::neg_inf());
    for (int64_t i = 0; i < V; ++i) acc = at::vec::maximum(acc, Vec::loadu(x + i * R));
    m = lanes_max(acc);
    Vec sum(0.f);
    for (int64_t i = 0; i < V; ++i) {
      const Vec n = softmax_numerator(Vec::loadu(x + i * R), Vec(m));
      n.store(key + i * R);
      sum = sum + Vec::blendv(n, Vec(0.f), Vec::loadu(x + i * R) == Vec(K::neg_inf()));  // padding adds 0
    }
    inv = m == K::neg_inf() ? 0.f : 1.f / lanes_sum(sum);
  }
  const float* rank_key = x;
  if (!c.key_is_logit) {
    for (int64_t i = 0; i < V; ++i) {
      const int64_t e = i * R;
      const Vec xe = Vec::loadu(x + e);
      Vec k = c.sigmoid ? sigmoid(xe) : softmax ? Vec::loadu(key + e) * Vec(inv) : xe;
      if (c.bias != nullptr) k = k + Vec::loadu(c.bias + e, std::min<int64_t>(R, E - e));
      sanitize(k).store(key + e);
    }
    rank_key = key;
  }
  for (int64_t i = 0; i < V; ++i) ordered(Vec::loadu(rank_key + i * R)).store(ord + i * R);
  std::fill(ord + E, ord + V * R, kTaken);

  if (G > 1) {
    const int64_t size = E / G;
    for (int64_t g = 0; g < G; ++g) {
      const float* group = rank_key + g * size;
      float score;
      if (c.top2_sum) {
        float best, second;
        group_top2(group, size, best, second);
        score = K::nan_to_neg_inf(best + second);
      } else {
        score = *std::max_element(group, group + size);
      }
      s.group_ranks[g] = K::rank_of(score, g);
    }
    // The best topk_groups groups by (score, lower index); the others' experts rank behind every allowed one,
    // in index order (kDisallowed), and fill the slots the allowed groups cannot (kernels/topk_gating.h).
    // Few groups: kept where fewer than topk_groups ranks are ahead (branch-free); many: a partial sort.
    const int64_t* ranks = s.group_ranks.data();
    if (G <= 32) {
      for (int64_t g = 0; g < G; ++g) {
        int64_t ahead = 0;
        for (int64_t h = 0; h < G; ++h) ahead += ranks[h] > ranks[g];
        s.group_keep[g] = ahead < c.topk_groups;
      }
    } else {
      std::partial_sort(s.group_ranks.begin(), s.group_ranks.begin() + c.topk_groups, s.group_ranks.end(),
                        std::greater<>());
      std::fill(s.group_keep.begin(), s.group_keep.end(), 0);
      for (int64_t i = 0; i < c.topk_groups; ++i) s.group_keep[K::index_of_rank(s.group_ranks[i])] = 1;
    }
    for (int64_t g = 0; g < G; ++g)
      if (!s.group_keep[g]) std::fill(ord + g * size, ord + (g + 1) * size, kDisallowed);
  }

  // The candidates {key >= t}, in index order, then their ranks.
  // With groups of whole vectors only the chosen groups' vectors are read, unless they hold too few experts
  // (the bound then falls to kDisallowed and every expert is a candidate).
  const int32_t* vectors = nullptr;
  int64_t count = V;
  if (G > 1 && (E / G) % R == 0) {
    int32_t* kept = s.kept_vectors.data();
    count = 0;
    for (int64_t g = 0, per_group = E / G / R; g < G; ++g)
      if (s.group_keep[g])
        for (int64_t i = g * per_group; i < (g + 1) * per_group; ++i) kept[count++] = static_cast<int32_t>(i);
    vectors = kept;
  }
  int32_t t = selection_threshold(ord, vectors, count, c.k, s);
  if (t == kDisallowed && vectors != nullptr) vectors = nullptr, count = V;
  int32_t* cand_key = s.candidate_key.data();
  int32_t* cand_id = s.candidate_id.data();
  int64_t n = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t v = vectors ? vectors[i] : i;
    n += compact(load_lanes(ord + v * R), t, static_cast<int32_t>(v * R), cand_key + n, cand_id + n);
  }
  int32_t* slot = s.slot.data();
  rank_candidates(cand_key, cand_id, n, c.k, slot);
  if (c.softmax_after_topk || c.k > R) {
    std::memcpy(id_out, slot, c.k * sizeof(int32_t));
    float* chosen = s.chosen.data();
    for (int64_t j = 0; j < c.k; ++j) chosen[j] = x[id_out[j]];
    if (c.softmax_after_topk) {
      K::softmax_over_chosen(chosen, w_out, c.k);
      for (int64_t j = 0; j < c.k; ++j) w_out[j] *= c.scale;
      return;
    }
    if (softmax && !statistics) {
      m = chosen[0];  // the row's maximum: the best key is the largest logit
      inv = m == K::neg_inf() ? 0.f : 1.f;
    }
    for (int64_t j = 0; j < c.k; ++j)
      w_out[j] = c.sigmoid ? K::sigmoid(chosen[j]) : K::softmax_numerator(chosen[j], m) * inv;
    K::finish_weights(w_out, c.k, c.renormalize, c.scale);
    return;
  }
  weights_in_register(x, slot, c, m, inv, w_out, id_out, whole);
}

// Rows begin.. in pairs through route_rows_fused where it applies (float32, contiguous rows); returns the first
// row left. whole: the output slots up to R past a row's k belong to rows this task routes later (store_first).
template <typename scalar_t>
int64_t route_pairs(const scalar_t*, int64_t, int64_t, const Config&, RowScratch*, float*, int32_t*,
                    int64_t begin, int64_t) {
  return begin;
}
int64_t route_pairs(const float* x_ptr, int64_t row_stride, int64_t col_stride, const Config& c,
                    RowScratch* scratch, float* w_ptr, int32_t* id_ptr, int64_t begin, int64_t end) {
  if (!scratch[0].fused || col_stride != 1) return begin;
  const int64_t k = c.k;
  int64_t t = begin;
  for (; t + 2 <= end; t += 2) {
    const float* rows[2] = {x_ptr + t * row_stride, x_ptr + (t + 1) * row_stride};
    float* w[2] = {w_ptr + t * k, w_ptr + (t + 1) * k};
    int32_t* id[2] = {id_ptr + t * k, id_ptr + (t + 1) * k};
    const bool whole[2] = {t + (R - 1) / k < end, t + 1 + (R - 1) / k < end};
    route_rows_fused<2>(rows, c, scratch, w, id, whole);
  }
  return t;
}

// Per-thread scratch, kept across calls (no allocation per call once warm).
Block& block_scratch(const Config& c) {
  thread_local Block block;
  block.reset(c);
  return block;
}
// Two: route_rows_fused takes rows in pairs.
RowScratch* row_scratch(const Config& c) {
  thread_local RowScratch scratch[2];
  scratch[0].reset(c);
  scratch[1].reset(c);
  return scratch;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                               bool renormalize, const std::optional<at::Tensor>& bias,
                                               int64_t num_groups, int64_t topk_groups,
                                               c10::string_view group_score, bool softmax_after_topk,
                                               double scale) {
  TORCH_CHECK(logits.dim() == 2, "topk_gating: router_logits must be [T, E]");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "topk_gating: router_logits must be float32, float16 or bfloat16");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E < (int64_t{1} << 30), "topk_gating: too many experts");
  TORCH_CHECK(1 <= k && k <= E, "topk_gating: k must be in [1, E]");
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, "topk_gating: num_groups must divide E");
  TORCH_CHECK(1 <= topk_groups && topk_groups <= num_groups, "topk_gating: topk_groups out of range");
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid", "topk_gating: scoring must be softmax|sigmoid");
  TORCH_CHECK(group_score == "max" || group_score == "top2_sum", "topk_gating: group_score must be max|top2_sum");
  const bool top2_sum = group_score == "top2_sum" && num_groups > 1;
  TORCH_CHECK(!top2_sum || E / num_groups >= 2, "topk_gating: top2_sum needs groups of at least 2 experts");
  TORCH_CHECK(!softmax_after_topk || scoring == "softmax", "topk_gating: softmax_after_topk needs softmax");

  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == E, "topk_gating: bias must be [E]");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const Config c{E,
                 k,
                 num_groups,
                 topk_groups,
                 scoring == "sigmoid",
                 renormalize,
                 softmax_after_topk,
                 top2_sum,
                 !bias.has_value() && (softmax_after_topk || !top2_sum),
                 static_cast<float>(scale),
                 bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr};

  auto weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return {weights, ids};

  float* w_ptr = weights.data_ptr<float>();
  int32_t* id_ptr = ids.data_ptr<int32_t>();
  const int64_t row_stride = logits.stride(0), col_stride = logits.stride(1);
  // The layout depends on (E, k) only (see the top of the file). Tasks get ~32K logits: below that, waking a
  // thread costs more than the work.
  const bool blocks = k * E <= 64 * R;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "topk_gating_cpu", [&] {
    const scalar_t* x_ptr = logits.const_data_ptr<scalar_t>();
    if (blocks) {
      at::parallel_for(0, at::divup(T, R), std::max<int64_t>(1, 32768 / (E * R)), [&](int64_t begin, int64_t end) {
        Block& block = block_scratch(c);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t t0 = i * R;
          route_block(x_ptr + t0 * row_stride, std::min(R, T - t0), row_stride, col_stride, c, block,
                      w_ptr + t0 * k, id_ptr + t0 * k);
        }
      });
    } else {
      at::parallel_for(0, T, std::max<int64_t>(1, 32768 / E), [&](int64_t begin, int64_t end) {
        RowScratch* scratch = row_scratch(c);
        int64_t t = route_pairs(x_ptr, row_stride, col_stride, c, scratch, w_ptr, id_ptr, begin, end);
        for (; t < end; ++t)
          route_row(x_ptr + t * row_stride, col_stride, c, scratch[0], w_ptr + t * k, id_ptr + t * k,
                    t + (R - 1) / k < end);
      });
    }
  });
  return {weights, ids};
}

}  // namespace netmerge::cpu::NETMERGE_ISA
