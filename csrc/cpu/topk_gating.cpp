// CPU launcher of topk_gating: routes blocks of R rows at once (R = SIMD width), blocks in parallel.
//
// A block is transposed into expert-major scratch ([E][R]: one vector holds one expert for R rows), so every
// step is lane-wise across rows: the softmax statistics, the keys, the group scores and the k selection
// passes are plain vector ops with no horizontal reductions and no per-row dependency chains. Per row this
// is one read of the logits; the scratch stays in L1/L2.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
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

// Ordered keys: larger key -> larger int32 (kernels/topk_gating.h); these two sit below every real key.
constexpr int32_t kTaken = INT32_MIN;
constexpr int32_t kDisallowed = INT32_MIN + 1;

struct Config {
  int64_t E, k, num_groups, topk_groups;
  bool sigmoid, renormalize, softmax_after_topk, top2_sum, key_is_logit;
  float scale;
  const float* bias;
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

VecI as_int(Vec v) { return at::vec::cast<int32_t>(v); }

VecI ordered(Vec key) {
  key = Vec::blendv(key, Vec(0.f), key == Vec(0.f));  // -0.0 ranks as +0.0
  const VecI bits = as_int(key);
  return bits ^ ((bits >> VecI(31)) & VecI(0x7FFFFFFF));
}

Vec sigmoid(Vec x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp_u20()); }

// exp(x - m) following the limit when m is infinite (x == m -> 1, covering m = +inf).
Vec softmax_numerator(Vec x, Vec m) { return Vec::blendv((x - m).exp_u20(), Vec(1.f), x == m); }

struct Block {
  explicit Block(const Config& c)
      : x(c.E * R), ord(c.E * R), group_ord(c.num_groups * R), group_keep(c.num_groups * R),
        best_x(c.k * R), ids(c.k * R), group_best(c.num_groups), group_second(c.num_groups), w(c.k) {}
  std::vector<float> x;         // [E][R] logits, NaN -> -inf
  std::vector<int32_t> ord;     // [E][R] ordered selection keys
  std::vector<int32_t> group_ord, group_keep;
  std::vector<float> best_x;    // [k][R] logit of each chosen expert
  std::vector<int32_t> ids;     // [k][R]
  std::vector<Vec> group_best, group_second, w;
};

template <typename scalar_t>
void load_block(const scalar_t* src, int64_t rows, int64_t row_stride, int64_t col_stride, int64_t E,
                float* x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (col_stride == 1) {  // tile-wise SIMD transpose; lanes of missing rows keep stale finite values
      for (int64_t e = 0; e < E; e += R)
        at::vec::transpose_mxn<float>(src + e, row_stride, x + e * R, R, static_cast<int>(rows),
                                      static_cast<int>(std::min(R, E - e)));
      for (int64_t e = 0; e < E; ++e) sanitize(Vec::loadu(x + e * R)).store(x + e * R);
      return;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (r < rows) {
      const scalar_t* row = src + r * row_stride;
      for (int64_t e = 0; e < E; ++e) x[e * R + r] = static_cast<float>(row[e * col_stride]);
    } else {
      for (int64_t e = 0; e < E; ++e) x[e * R + r] = 0.f;  // unused lanes: any finite value
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

  // Softmax statistics per row: max m and 1/denominator (0 for rows without mass); not needed (and not computed)
  // with the logit as key and renormalised weights, see route_row.
  Vec m(0.f), inv(0.f);
  const bool softmax_before = !c.sigmoid && !c.softmax_after_topk;
  const bool statistics = softmax_before && (!c.key_is_logit || !c.renormalize);
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
  constexpr int64_t S = 4;
  for (int64_t j = 0; j < c.k; ++j) {
    Lanes best[S], best_e[S];
    for (int64_t s = 0; s < S; ++s) best[s] = splat(kTaken), best_e[s] = splat(INT32_MAX);
    int64_t e = 0;
    for (; e + S <= E; e += S) {
      for (int64_t s = 0; s < S; ++s) {
        const Lanes v = load_lanes(ord + (e + s) * R);
        const Lanes better = v > best[s];
        best[s] = better ? v : best[s];
        best_e[s] = better ? splat(static_cast<int32_t>(e + s)) : best_e[s];
      }
    }
    for (; e < E; ++e) {
      const Lanes v = load_lanes(ord + e * R);
      const Lanes better = v > best[0];
      best[0] = better ? v : best[0];
      best_e[0] = better ? splat(static_cast<int32_t>(e)) : best_e[0];
    }
    Lanes top = best[0];
    for (int64_t s = 1; s < S; ++s) top = best[s] > top ? best[s] : top;
    Lanes winner = splat(INT32_MAX);
    for (int64_t s = 0; s < S; ++s) winner = (best[s] == top && best_e[s] < winner) ? best_e[s] : winner;
    int32_t* lane_e = b.ids.data() + j * R;
    std::memcpy(lane_e, &winner, sizeof(Lanes));
    for (int64_t r = 0; r < R; ++r) {
      b.best_x[j * R + r] = x[lane_e[r] * R + r];
      ord[lane_e[r] * R + r] = kTaken;
    }
  }

  // Weights, lane-wise per slot.
  if (softmax_before && !statistics) {
    m = Vec::loadu(b.best_x.data());  // the rows' maxima: the best keys are the largest logits
    inv = Vec::blendv(Vec(1.f), Vec(0.f), m == Vec(K::neg_inf()));
  }
  Vec* w = b.w.data();
  for (int64_t j = 0; j < c.k; ++j) {
    const Vec bx = Vec::loadu(b.best_x.data() + j * R);
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

  alignas(64) float lane_w[R];
  for (int64_t j = 0; j < c.k; ++j) {
    w[j].store(lane_w);
    const int32_t* lane_id = b.ids.data() + j * R;
    for (int64_t r = 0; r < rows; ++r) {
      w_out[r * c.k + j] = lane_w[r];
      id_out[r * c.k + j] = lane_id[r];
    }
  }
}

// One row at a time, experts across the vector lanes: decode, and the last few rows of a batch (a block would
// spend R lanes on them; routing E > 4R experts this way at every T measured slower on Zen 3 than route_block,
// whose k passes are over registers). The k best are found by a threshold:
// t = the k-th largest of M * R chunk maxima (lane-wise maxima over interleaved vectors, M * R >= k) bounds the
// k-th best key from below, so the candidates {key >= t} (typically k plus a few) hold the answer; only they are
// ranked (key, then lower index: kernels/topk_gating.h) and sorted. exp runs only where a result needs it: the
// softmax statistics when a weight or key uses the full softmax, otherwise just the k chosen logits.
struct RowScratch {
  explicit RowScratch(const Config& c)
      : vectors(at::divup(c.E, R)), chunks(at::divup(c.k, R)), x(vectors * R, K::neg_inf()), key(vectors * R),
        ord(vectors * R, kTaken), candidates(c.E), chunk_max(chunks * R), group_ranks(c.num_groups),
        group_keep(c.num_groups), chosen(c.k) {}
  int64_t vectors, chunks;
  std::vector<float> x, key;
  std::vector<int32_t> ord;  // ordered keys; kTaken: outside the chosen groups, and the padding lanes
  std::vector<int64_t> candidates;
  std::vector<int32_t> chunk_max;
  std::vector<int64_t> group_ranks;
  std::vector<char> group_keep;
  std::vector<float> chosen;
};

// Bit i set when lane i of v is >= t.
inline uint32_t lanes_at_least(const int32_t* v, int32_t t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmpge_epi32_mask(_mm512_loadu_si512(v), _mm512_set1_epi32(t));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(t), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below))) & 0xFFu;
#else
  uint32_t bits = 0;
  for (int64_t i = 0; i < R; ++i) bits |= static_cast<uint32_t>(v[i] >= t) << i;
  return bits;
#endif
}

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
void group_top2(const float* key, int64_t size, float& best, float& second) {
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

template <typename scalar_t>
void route_row(const scalar_t* src, int64_t col_stride, const Config& c, RowScratch& s, float* w_out,
               int32_t* id_out) {
  const int64_t E = c.E, V = s.vectors, G = c.num_groups;
  float* x = s.x.data();
  float* key = s.key.data();
  int32_t* ord = s.ord.data();
  if (std::is_same_v<scalar_t, float> && col_stride == 1) {
    std::memcpy(x, src, E * sizeof(float));
  } else {
    for (int64_t e = 0; e < E; ++e) x[e] = static_cast<float>(src[e * col_stride]);
  }
  for (int64_t i = 0; i < V; ++i) sanitize(Vec::loadu(x + i * R)).store(x + i * R);  // padding stays -inf

  // Softmax statistics only where a key or weight needs the full softmax: with the logit as key and the weights
  // renormalised over the k chosen, the denominator cancels (its 1e-20 guard is below float resolution: the
  // chosen hold the row's maximum).
  const bool softmax = !c.sigmoid && !c.softmax_after_topk;
  const bool statistics = softmax && (!c.key_is_logit || !c.renormalize);
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
    // in index order (kTaken), and fill the slots the allowed groups cannot (kernels/topk_gating.h).
    std::partial_sort(s.group_ranks.begin(), s.group_ranks.begin() + c.topk_groups, s.group_ranks.end(),
                      std::greater<>());
    std::fill(s.group_keep.begin(), s.group_keep.end(), 0);
    for (int64_t i = 0; i < c.topk_groups; ++i) s.group_keep[K::index_of_rank(s.group_ranks[i])] = 1;
    for (int64_t g = 0; g < G; ++g)
      if (!s.group_keep[g]) std::fill(ord + g * size, ord + (g + 1) * size, kTaken);
  }

  // The threshold: the k-th largest chunk maximum (chunks = lanes of M interleaved running maxima).
  const int64_t M = s.chunks;
  int32_t* chunk = s.chunk_max.data();
  std::fill(chunk, chunk + M * R, kTaken);
  for (int64_t i = 0; i < V; ++i) {
    int32_t* acc = chunk + (i % M) * R;
    const Lanes v = load_lanes(ord + i * R), a = load_lanes(acc);
    const Lanes mx = v > a ? v : a;
    std::memcpy(acc, &mx, sizeof(Lanes));
  }
  std::nth_element(chunk, chunk + (c.k - 1), chunk + M * R, std::greater<>());
  const int32_t t = chunk[c.k - 1];

  int64_t n = 0;
  for (int64_t i = 0; i < V; ++i) {
    for (uint32_t bits = lanes_at_least(ord + i * R, t); bits; bits &= bits - 1) {
      const int64_t e = i * R + __builtin_ctz(bits);
      if (e < E) s.candidates[n++] = K::make_rank(ord[e], e);
    }
  }
  int64_t* cand = s.candidates.data();
  std::partial_sort(cand, cand + c.k, cand + n, std::greater<>());
  for (int64_t j = 0; j < c.k; ++j) id_out[j] = K::index_of_rank(cand[j]);

  if (c.softmax_after_topk) {
    for (int64_t j = 0; j < c.k; ++j) s.chosen[j] = x[id_out[j]];
    K::softmax_over_chosen(s.chosen.data(), w_out, c.k);
    for (int64_t j = 0; j < c.k; ++j) w_out[j] *= c.scale;
    return;
  }
  if (softmax && !statistics) {
    m = x[id_out[0]];  // the row's maximum: the best key is the largest logit
    inv = m == K::neg_inf() ? 0.f : 1.f;
  }
  for (int64_t j = 0; j < c.k; ++j) {
    const float xv = x[id_out[j]];
    w_out[j] = c.sigmoid ? K::sigmoid(xv) : (m == K::neg_inf() ? 0.f : K::softmax_numerator(xv, m) * inv);
  }
  K::finish_weights(w_out, c.k, c.renormalize, c.scale);
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
  const int64_t blocks = at::divup(T, R);
  // Blocks per task: enough work (~16K logits) to be worth waking a thread for.
  const int64_t grain = std::max<int64_t>(1, 16384 / (E * R));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "topk_gating_cpu", [&] {
    const scalar_t* x_ptr = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      std::optional<Block> block;
      std::optional<RowScratch> row_scratch;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t0 = i * R, rows = std::min(R, T - t0);
        if (2 * rows >= R) {
          if (!block) block.emplace(c);
          route_block(x_ptr + t0 * row_stride, rows, row_stride, col_stride, c, *block, w_ptr + t0 * k,
                      id_ptr + t0 * k);
        } else {
          if (!row_scratch) row_scratch.emplace(c);
          for (int64_t t = t0; t < t0 + rows; ++t)
            route_row(x_ptr + t * row_stride, col_stride, c, *row_scratch, w_ptr + t * k, id_ptr + t * k);
        }
      }
    });
  });
  return {weights, ids};
}

}  // namespace netmerge::cpu::NETMERGE_ISA
