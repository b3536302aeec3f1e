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
//   counting (greater keys, then equal keys of lower index), with no data-dependent sort.
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

Vec sigmoid(Vec x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp_u20()); }

// exp(x - m) following the limit when m is infinite (x == m -> 1, covering m = +inf).
Vec softmax_numerator(Vec x, Vec m) { return Vec::blendv((x - m).exp_u20(), Vec(1.f), x == m); }

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
    chosen.resize(chunks * R);
  }
  int64_t vectors = 0, chunks = 0;
  std::vector<float> x, key;
  std::vector<int32_t> ord;  // ordered keys; kDisallowed outside the chosen groups, kTaken in the padding lanes
  std::vector<int32_t> candidate_key, candidate_id;
  std::vector<int32_t> chunk_max;
  std::vector<int64_t> group_ranks;
  std::vector<char> group_keep;
  std::vector<int32_t> kept_vectors;  // the chosen groups' vectors (groups of whole vectors)
  std::vector<int32_t> slot;  // slot[k]: where candidates ranked k or lower land
  std::vector<float> chosen;
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

// A bound t with at least k of the row's ordered keys >= t, close to the k-th largest. k <= R: the k-th
// largest of the lanes' best and second-best keys (distinct experts), by sorting both registers and merging
// their top halves; otherwise the k-th largest of k chunk maxima. Never below kDisallowed, so padding
// (kTaken) never qualifies and, when fewer than k keys are real, every expert does.
// The vectors read are ord + vectors[i] * R (all V when vectors is null).
int32_t selection_threshold(const int32_t* ord, const int32_t* vectors, int64_t V, int64_t k, RowScratch& s) {
  auto vector_at = [&](int64_t i) { return ord + (vectors ? vectors[i] : i) * R; };
  if (k <= R) {
    Lanes best = splat(kTaken), second = splat(kTaken);
    for (int64_t i = 0; i < V; ++i) {
      const Lanes v = load_lanes(vector_at(i));
      second = max_lanes(second, min_lanes(best, v));
      best = max_lanes(best, v);
    }
    const Lanes b = sort_descending(best);
    const Lanes s2 = reversed(sort_descending(second), std::make_index_sequence<R>{});
    const Lanes top = bitonic_merge<R, R / 2>(max_lanes(b, s2));  // the R largest of the 2R, descending
    return std::max(top[k - 1], kDisallowed);
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
inline void rank_two_registers(const int32_t* keys, const int32_t* ids, int64_t n, int64_t k, int32_t* slot) {
  const Lanes count = splat(static_cast<int32_t>(n));
  const Lanes a = kIota < count ? load_lanes(keys) : splat(kTaken);
  const Lanes b = kIota + static_cast<int32_t>(R) < count ? load_lanes(keys + R) : splat(kTaken);
  Lanes rank_a = splat(0), rank_b = splat(0);
  count_ahead(a, rank_a);
  if (n > R) {
    count_ahead(b, rank_b);
    count_across(a, b, rank_a, rank_b);
  }
  alignas(64) int32_t rank[2 * R];
  store_lanes(rank, rank_a);
  store_lanes(rank + R, rank_b);
  for (int64_t i = 0; i < n; ++i) slot[std::min<int64_t>(rank[i], k)] = ids[i];
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
void route_row(const scalar_t* src, int64_t col_stride, const Config& c, RowScratch& s, float* w_out,
               int32_t* id_out) {
  const int64_t E = c.E, V = s.vectors, G = c.num_groups;
  float* x = s.x.data();
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
  if (n <= 2 * R) {
    rank_two_registers(cand_key, cand_id, n, c.k, slot);
  } else {
    std::fill(cand_key + n, cand_key + at::divup(n, R) * R, kTaken);
    for (int64_t i = 0; i < n; ++i) {
      const Lanes ki = splat(cand_key[i]), here = splat(static_cast<int32_t>(i));
      int64_t rank = 0;
      for (int64_t j = 0; j < n; j += R) {
        const Lanes kj = load_lanes(cand_key + j);
        rank += __builtin_popcount(mask_bits((kj > ki) | ((kj == ki) & (kIota + static_cast<int32_t>(j) < here))));
      }
      slot[std::min(rank, c.k)] = cand_id[i];
    }
  }
  std::memcpy(id_out, slot, c.k * sizeof(int32_t));

  if (c.softmax_after_topk || c.k > R) {
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
  // k <= R: the k weights in one register (lanes past k are computed and dropped).
  const VecI lanes = VecI::loadu(&kIota);
  const VecI chosen_id = VecI::blendv(VecI(0), VecI::loadu(slot), lanes < VecI(static_cast<int32_t>(c.k)));
  const Vec chosen = at::vec::gather<sizeof(float)>(x, chosen_id);
  if (softmax && !statistics) {
    m = x[id_out[0]];  // the row's maximum: the best key is the largest logit
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
  (w * Vec(c.scale)).store(w_out, static_cast<int>(c.k));
}

// Per-thread scratch, kept across calls (no allocation per call once warm).
Block& block_scratch(const Config& c) {
  thread_local Block block;
  block.reset(c);
  return block;
}
RowScratch& row_scratch(const Config& c) {
  thread_local RowScratch scratch;
  scratch.reset(c);
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
        RowScratch& scratch = row_scratch(c);
        for (int64_t t = begin; t < end; ++t)
          route_row(x_ptr + t * row_stride, col_stride, c, scratch, w_ptr + t * k, id_ptr + t * k);
      });
    }
  });
  return {weights, ids};
}

}  // namespace netmerge::cpu::NETMERGE_ISA
