// CPU launcher of moe_experts_packed: the expert MLPs on weights that netmerge_fast.pack_experts laid out once in
// the micro-kernel's order, so no call repacks (or even reads out of order) a weight.
//
// Layout (written by dispatch.py's pack_experts; the shapes and dtypes carry it). NR = columns per panel (two
// SIMD vectors of the machine that packed: 16 for AVX2, 32 for AVX-512; every build reads both):
//   gate_up  [E, P1, H, NR] float32 | [E, P1, H2 / 2, NR, 2] bfloat16 (k-pairs; H2 = H rounded up to even)
//            | [E, P1, H, NR] int8 with gate_up_scales [E, P1, G, NR] float32 (G = groups of group_size along H)
//   down     the same with H -> Ip (the padded intermediate size) and NR columns of H per panel.
// Panel p of gate_up holds, for each k, U = NR / 2 gate units then the same U up units (gated), or NR units: one
// pass over the panel computes both halves of U units, and its epilogue applies bias and activation while the
// tile is in L1. Units past I and columns past H are zero weights; the activation of a zero is zero for every
// activation here, so the padded units add nothing to the down projection.
//
// A call: permutation (moe_common.h) -> phase A tasks (expert, row block, panels): gate+up micro-kernel, bias,
// activation -> act [rows, Ip] float -> phase B tasks (each after its expert's phase A tasks, in the same
// parallel region): down micro-kernel -> y [rows, H] float -> combine. bfloat16 and int8 panels are widened to
// float (a shift, or a sign extension and a convert) in the micro-kernel, or, for tasks of 16 rows or more, once
// per k block into an L1 buffer that float tiles read; the arithmetic is float32 FMA everywhere, and int8 scales
// multiply each group's sums. Intermediate values are rounded to hidden's dtype where moe_experts rounds them
// (the GEMM outputs, the biased pre-activation, the activation), so the two paths agree to summation order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/grouped_gemm.h"
#include "cpu/moe_common.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using namespace moe;
using Vec = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;
constexpr int64_t L = Vec::size();

enum class Format { kFloat, kBf16Pairs, kInt8 };

// k-steps per unit of a panel (bfloat16 panels hold k-pairs), and bytes per weight.
template <Format F>
constexpr int kUnitSteps = F == Format::kBf16Pairs ? 2 : 1;
template <Format F>
constexpr int64_t kWeightBytes = F == Format::kFloat ? 4 : F == Format::kBf16Pairs ? 2 : 1;

// Rows of a micro-kernel tile, and the accumulator vectors it may use: accumulators, the panel's NV vectors and
// a broadcast fit the 16 vector registers of AVX2 (32 with AVX-512). The baseline build's 8-float vectors take
// two SSE registers each.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAccumulators = 24;
constexpr int kMaxRows = 12;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kAccumulators = 12;
constexpr int kMaxRows = 6;
#else
constexpr int kAccumulators = 4;
constexpr int kMaxRows = 2;
#endif

template <int NV, Format F = Format::kFloat>
constexpr int max_rows() {
  // bf16 pairs widen into two vectors per panel vector: on AVX2 a 6-row tile would spill.
  constexpr int accumulators = F == Format::kBf16Pairs && kAccumulators == 12 ? 10 : kAccumulators;
  return std::max(1, std::min(kMaxRows, accumulators / NV));
}

// The float values of L consecutive int8 weights.
inline Vec load_int8(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) float v[L];
  for (int64_t i = 0; i < L; ++i) v[i] = static_cast<float>(p[i]);
  return Vec::loadu(v);
#endif
}

// L consecutive k-pairs of bfloat16 weights (one 32-bit word each, k in the low half): the float values for k
// (word << 16) and for k + 1 (the high half in place). `high_mask`: the high halves' mask, for tiles with a
// vector register to spare for it (one AND instead of two shifts).
template <bool kMaskRegister>
inline void load_bf16_pairs(const uint32_t* p, Vec& lo, Vec& hi, const Vec& high_mask) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i words = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
  hi = _mm512_and_ps(_mm512_castsi512_ps(words), high_mask);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
  if constexpr (kMaskRegister) {
    hi = _mm256_and_ps(_mm256_castsi256_ps(words), high_mask);
  } else {
    // Immediate shifts: no constant register (the 6-row tile needs all 16).
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(words, 16), 16));
  }
#else
  const VecI words = VecI::loadu(p);
  lo = at::vec::cast<float>(words << VecI(16));
  hi = at::vec::cast<float>(words & VecI(static_cast<int32_t>(0xFFFF0000u)));
#endif
}

#define NETMERGE_INLINE __attribute__((always_inline))

// f(std::integral_constant<int, i>{}) for i in [0, N): every index the micro-kernel uses is a compile-time
// constant before GCC decides where its accumulator arrays live (left as loops, even with unroll pragmas, it
// keeps some of them in memory: a load and a store around each FMA, at a third of the speed or less).
template <typename Fn, int... I>
inline NETMERGE_INLINE void unroll_each(const Fn& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
inline NETMERGE_INLINE void unroll(const Fn& f) {
  unroll_each(f, std::make_integer_sequence<int, N>{});
}

// The weights of one unit of a panel (one k; a k-pair for bf16) as float vectors: w[j][v] for the unit's
// k-step j and vector v.
template <Format F, int NV, bool kMaskRegister>
inline NETMERGE_INLINE void load_unit(const void* p, Vec (&w)[kUnitSteps<F>][NV],
                                      const Vec& high_mask) {
  unroll<NV>([&](auto v) NETMERGE_INLINE {
    if constexpr (F == Format::kFloat) {
      w[0][v] = Vec::loadu(static_cast<const float*>(p) + v * L);
    } else if constexpr (F == Format::kInt8) {
      w[0][v] = load_int8(static_cast<const int8_t*>(p) + v * L);
    } else {
      load_bf16_pairs<kMaskRegister>(static_cast<const uint32_t*>(p) + v * L, w[0][v], w[1][v], high_mask);
    }
  });
}

// The sums over k in [k0, k1) of a[r][k] * W[k][c], added into tile[r][c] (first: into zeros), for MR rows
// (pointers a[r]) and one panel W of NV * L columns (k-pairs for bf16: k0, k1 even). int8 scales: with
// group > 0 (group-wise) each group's sums are scaled as they are added; with group == 0 (one scale per column)
// the tile holds raw sums until the last block scales them. S accumulator sets (k-step j adds into set j % S)
// give a tile with few rows (decode) enough independent FMA chains to hide the latency. `ahead`, when given, is
// prefetched into L2 as this block is read (one line per 64 bytes): the next panel's block, or the next block.
template <Format F, int MR, int NV>
void micro_tile(const float* const* a, int64_t k0, int64_t k1, const void* panel, const float* scales,
                int64_t group, float* tile, bool first, bool last, const char* ahead, int64_t ahead_bytes) {
  constexpr int64_t NR = NV * L;
  constexpr int S = MR * NV >= 8 ? 1 : MR * NV >= 4 ? 2 : 4;
  constexpr auto slot = [](int set, int r, int v) { return (set * MR + r) * NV + v; };
  constexpr int kSteps = kUnitSteps<F>;
  constexpr int64_t kUnitBytes = kSteps * NR * kWeightBytes<F>;
  constexpr int U = std::max(1, S / kSteps);  // units per unrolled body: one k-step per accumulator set
  // Prefetches per body, and the bytes they advance: with less than a line per body, one line every few bodies.
  constexpr int kLines = std::max<int>(1, static_cast<int>(U * kUnitBytes / 64));
  constexpr int64_t kFetchStep = std::max<int64_t>(U * kUnitBytes, 64);
  const char* fetch = ahead;
  const char* const fetch_end = ahead + (ahead != nullptr ? ahead_bytes : 0);
  // The accumulators, one unit's weights, a broadcast and the bf16 mask in 16 vector registers (AVX2)?
  constexpr bool kMaskRegister = S * MR * NV + kSteps * NV + 2 <= 16;
  const Vec high_mask(at::vec::cast<float>(VecI(static_cast<int32_t>(0xFFFF0000u))));
  const float* rows[MR];
  unroll<MR>([&](auto r) NETMERGE_INLINE { rows[r] = a[r]; });
  const int64_t span = group > 0 ? group : k1 - k0;
  for (int64_t g0 = k0; g0 < k1; g0 += span) {
    const int64_t g1 = std::min(k1, g0 + span);
    // [set][row][vector], flat: GCC keeps a multi-dimensional one in memory when S > 1.
    Vec acc[S * MR * NV];
    const auto each = [&](auto sets, const auto& f) NETMERGE_INLINE {
      unroll<decltype(sets)::value>([&](auto i) NETMERGE_INLINE {
        unroll<MR>([&](auto r) NETMERGE_INLINE { unroll<NV>([&](auto v) NETMERGE_INLINE { f(i, r, v); }); });
      });
    };
    each(std::integral_constant<int, S>{},
         [&](auto i, auto r, auto v) NETMERGE_INLINE { acc[slot(i, r, v)] = Vec(0.f); });
    // One unit's FMAs at k, its k-step j into set (base + j) % S.
    const auto fma_unit = [&](int64_t k, const char* p, auto base) NETMERGE_INLINE {
      Vec w[kSteps][NV];
      load_unit<F, NV, kMaskRegister>(p, w, high_mask);
      unroll<kSteps>([&](auto j) NETMERGE_INLINE {
        constexpr int set = (decltype(base)::value + decltype(j)::value) % S;
        unroll<MR>([&](auto r) NETMERGE_INLINE {
          const Vec x(rows[r][k + j]);
          unroll<NV>([&](auto v) NETMERGE_INLINE {
            acc[slot(set, r, v)] = at::vec::fmadd(x, w[j][v], acc[slot(set, r, v)]);
          });
        });
      });
    };
    int64_t k = g0;
    const char* w = static_cast<const char*>(panel) + g0 / kSteps * kUnitBytes;
    for (; k + U * kSteps <= g1; k += U * kSteps, w += U * kUnitBytes) {
      if (fetch < fetch_end && (U * kUnitBytes >= 64 || (k - g0) % (64 / kUnitBytes) == 0)) {
        unroll<kLines>([&](auto line) NETMERGE_INLINE { __builtin_prefetch(fetch + 64 * line, 0, 2); });
        fetch += kFetchStep;
      }
      unroll<U>([&](auto u) NETMERGE_INLINE {
        fma_unit(k + u * kSteps, w + u * kUnitBytes, std::integral_constant<int, decltype(u)::value * kSteps>{});
      });
    }
    for (; k < g1; k += kSteps, w += kUnitBytes) fma_unit(k, w, std::integral_constant<int, 0>{});
    each(std::integral_constant<int, S - 1>{}, [&](auto i, auto r, auto v) NETMERGE_INLINE {
      acc[slot(0, r, v)] = acc[slot(0, r, v)] + acc[slot(i + 1, r, v)];
    });
    unroll<MR>([&](auto r) NETMERGE_INLINE {
      unroll<NV>([&](auto v) NETMERGE_INLINE {
        float* dst = tile + r * NR + v * L;
        if (group > 0) {
          const Vec scale = Vec::loadu(scales + g0 / group * NR + v * L);
          const bool fresh = first && g0 == k0;
          const Vec sum = acc[slot(0, r, v)];
          (fresh ? sum * scale : at::vec::fmadd(sum, scale, Vec::loadu(dst))).store(dst);
        } else {
          // Added here rather than loaded into the accumulators: a conditional load there makes the compiler keep
          // them in memory.
          const Vec sum = first ? acc[slot(0, r, v)] : acc[slot(0, r, v)] + Vec::loadu(dst);
          (last && scales != nullptr ? sum * Vec::loadu(scales + v * L) : sum).store(dst);
        }
      });
    });
  }
}

// micro_tile for mr rows (1 <= mr <= max_rows<NV>()), chosen at compile time.
template <Format F, int NV, int MR = 1>
void run_tile(int mr, const float* const* a, int64_t k0, int64_t k1, const void* panel, const float* scales,
              int64_t group, float* tile, bool first, bool last, const char* ahead, int64_t ahead_bytes) {
  if constexpr (MR < max_rows<NV, F>()) {
    if (mr > MR)
      return run_tile<F, NV, MR + 1>(mr, a, k0, k1, panel, scales, group, tile, first, last, ahead, ahead_bytes);
  }
  micro_tile<F, MR, NV>(a, k0, k1, panel, scales, group, tile, first, last, ahead, ahead_bytes);
}

// Values rounded to scalar_t (round to nearest even), kept in float.
template <typename scalar_t>
Vec round_to(Vec v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return v;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const VecI bits = at::vec::cast<int32_t>(v);
    const VecI lsb = (bits >> VecI(16)) & VecI(1);
    const VecI rounded = (bits + VecI(0x7FFF) + lsb) & VecI(static_cast<int32_t>(0xFFFF0000u));
    return Vec::blendv(at::vec::cast<float>(rounded), v, v != v);  // NaN stays NaN
  } else {
    alignas(64) float f[L];
    scalar_t h[L];
    v.store(f);
    for (int64_t i = 0; i < L; ++i) h[i] = static_cast<scalar_t>(f[i]);
    for (int64_t i = 0; i < L; ++i) f[i] = static_cast<float>(h[i]);
    return Vec::loadu(f);
  }
}

struct Shape {
  Format format;
  int64_t E, H, I, Ip, NR, U, P1, P2, K1, K2, group1, group2;
  bool gated;
  Activation activation;
  size_t weight_bytes;  // per element
};

// One phase's work: rows [r0, r1) of the sorted rows (all of one expert), panels [p0, p1).
struct Task {
  int64_t expert, r0, r1, p0, p1;
};

// Cache budgets of a task (per thread): the block of its input rows that one k block covers, and its sums
// ([rows][panels][NR] floats), both kept in L2 while the task's panels stream past (L1 holds one panel's k block).
constexpr int64_t kRowBlockBytes = int64_t{256} << 10;
constexpr int64_t kSumsBytes = int64_t{64} << 10;
// Rows of a task: each panel is read from memory once per row block, so blocks are as large as the budgets allow
// (k is blocked to keep the input block in L2).
constexpr int64_t kMaxTaskRows = 128;
// Tasks of at most this many rows read their weights at a few FMAs per byte (decode).
constexpr int64_t kDecodeRows = 8;

// Tasks over every expert's rows: row blocks of at most kMaxTaskRows rows, and panel ranges split in proportion
// to the rows, aiming at ~16 tasks per thread (the two threads of a few-expert shape balance), none with less
// than ~64 KB of weights or more sums than kSumsBytes.
std::vector<Task> plan_tasks(const std::vector<int64_t>& starts, int64_t E, int64_t panels, int64_t NR,
                             size_t panel_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t total = starts[E];
  const int64_t least_panels = std::max<int64_t>(1, (int64_t{64} << 10) / static_cast<int64_t>(panel_bytes));
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = starts[e + 1] - starts[e];
    if (rows == 0) continue;
    const int64_t blocks = at::divup(rows, kMaxTaskRows), block = at::divup(rows, blocks);
    for (int64_t r0 = starts[e]; r0 < starts[e + 1]; r0 += block) {
      const int64_t r1 = std::min(starts[e + 1], r0 + block);
      const int64_t parts = std::max<int64_t>(1, (16 * threads * (r1 - r0) + total - 1) / total);
      const int64_t most_panels = std::max<int64_t>(1, kSumsBytes / (4 * NR * (r1 - r0)));
      const int64_t width = std::min(most_panels, std::max(least_panels, at::divup(panels, parts)));
      for (int64_t p0 = 0; p0 < panels; p0 += width) tasks.push_back({e, r0, r1, p0, std::min(panels, p0 + width)});
    }
  }
  return tasks;
}

// Returns once `count` is zero (acquire: what its last decrement released is visible). Spins briefly (the usual
// wait, if any, is the end of a task on the other thread), then yields, then sleeps: on an oversubscribed machine
// the thread it waits for may have lost its core, and a sleeping waiter lets the scheduler run it on this one.
inline void wait_until_zero(const std::atomic<int32_t>& count) {
  for (int spins = 0; count.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else if (spins < 320) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

// Rows of k per block for a task of `rows` rows: the whole of K when the task's input block fits
// kRowBlockBytes, else the most that does (a multiple of 16, and of the int8 scale group; at least 64, and at
// most ~32 KB of a panel, which then stays in L1/L2 while every row tile of the task reads it).
template <Format F, int NV>
int64_t k_block(int64_t K, int64_t rows, int64_t group) {
  constexpr int64_t bytes = NV * L * kWeightBytes<F>;
  const int64_t fit = std::min(kRowBlockBytes / (4 * rows), (int64_t{32} << 10) / bytes);
  if (fit >= K) return K;
  const int64_t block = std::max<int64_t>(64, fit / 16 * 16);
  return group > 0 ? std::max<int64_t>(1, block / group) * group : block;
}

// A k block of a bfloat16 (k-pair) or int8 panel widened to a float panel ([k][NR]), exactly: `steps` k-steps.
template <Format F, int NV>
void widen_block(const char* block, int64_t steps, float* out) {
  constexpr int64_t NR = NV * L;
  constexpr int kSteps = kUnitSteps<F>;
  constexpr int64_t kUnitBytes = kSteps * NR * kWeightBytes<F>;
  const Vec high_mask(at::vec::cast<float>(VecI(static_cast<int32_t>(0xFFFF0000u))));
  for (int64_t k = 0; k < steps; k += kSteps, block += kUnitBytes) {
    Vec w[kSteps][NV];
    load_unit<F, NV, true>(block, w, high_mask);
    unroll<kSteps>([&](auto j) NETMERGE_INLINE {
      unroll<NV>([&](auto v) NETMERGE_INLINE { w[j][v].store(out + (k + j) * NR + v * L); });
    });
  }
}

// Rows of a task from which each k block of a bfloat16 or int8 panel is widened to float once and read by float
// tiles: the widening in the tile (two vector operations per panel vector, on the ports the FMAs use) then runs
// once rather than once per row tile, and on AVX2 the float tile takes six rows where the bfloat16 one takes
// five. Below it (decode) the tiles are few and the weights come from memory: widening in the tile costs nothing
// there. Measured on the DeepSeek-V3 /8 bfloat16 shape: no change at 16 rows, 10% faster at 32.
constexpr int64_t kWidenRows = 2 * kDecodeRows;

// One task of a phase: its rows times its panels, k block by k block (each block of the task's input rows is
// read from L2 by all its panels), tiles accumulated in a per-thread `sums` ([panel][rows][NR]), then
// `finish(panel, first row, rows, sums of the panel)` once per panel.
template <Format F, int NV, typename Finish>
void run_task(const Task& t, const float* const* rows, int64_t K, int64_t panels, const char* weights,
              int64_t panel_bytes, const float* scales, int64_t groups, int64_t group, const Finish& finish) {
  constexpr int64_t NR = NV * L;
  const int64_t n = t.r1 - t.r0, width = t.p1 - t.p0;
  const bool widen = F != Format::kFloat && n >= kWidenRows;
  const int MR = widen ? max_rows<NV, Format::kFloat>() : max_rows<NV, F>();
  const int64_t step_bytes = panel_bytes / K;
  thread_local std::vector<float> buffer, wide;
  thread_local std::vector<const float*> shifted;  // the rows from k0 on, for the widened block
  buffer.resize(std::max<size_t>(buffer.size(), static_cast<size_t>(n * width * NR)));
  float* sums = buffer.data();
  // Row tiles as even as possible, none above the micro-kernel's maximum.
  const int64_t tiles = at::divup(n, MR);
  const float* const* a = rows + t.r0;
  const int64_t block = widen ? k_block<Format::kFloat, NV>(K, n, group) : k_block<F, NV>(K, n, group);
  float* wide_block = nullptr;
  if (widen) {
    // Aligned to a cache line, so the tiles' vector loads never straddle two lines. With malloc's 16 bytes, two of
    // four processes ran Mixtral /8 bfloat16 prefill (T = 512) at 70 ms instead of 47; aligned, four of four at
    // 45-50 ms.
    wide.resize(std::max<size_t>(wide.size(), static_cast<size_t>(block * NR + 16)));
    wide_block = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wide.data()) + 63) & ~uintptr_t{63});
    shifted.resize(std::max<size_t>(shifted.size(), static_cast<size_t>(n)));
  }
  const char* first_panel = weights + (t.expert * panels + t.p0) * panel_bytes;
  const bool fetch = F != Format::kFloat || n > kDecodeRows;
  for (int64_t k0 = 0; k0 < K; k0 += block) {
    const int64_t k1 = std::min(K, k0 + block);
    for (int64_t p = 0; p < width; ++p) {
      const int64_t panel = t.expert * panels + t.p0 + p;
      const char* w = weights + panel * panel_bytes;
      const float* panel_scales = scales ? scales + panel * groups * NR : nullptr;
      // While the tiles read this block, the next panel's block (or the first panel's next block) comes into
      // L2, each tile fetching its share. Not for float32 decode, whose few FMAs per byte leave the stream to
      // the hardware prefetcher (measured: software prefetch there cost 5-15%).
      const char* ahead = !fetch ? nullptr
                          : p + 1 < width ? w + panel_bytes + k0 * step_bytes
                          : k1 < K        ? first_panel + k1 * step_bytes
                                          : nullptr;
      const int64_t ahead_bytes = (p + 1 < width ? k1 - k0 : std::min(K, k1 + block) - k1) * step_bytes;
      const int64_t share = at::divup(at::divup(ahead_bytes, int64_t{64}), tiles) * 64;
      if (widen) {
        // k0 is a multiple of 16 (a k-pair boundary for bfloat16) or of the int8 scale group.
        widen_block<F, NV>(w + k0 * step_bytes, k1 - k0, wide_block);
        if (p == 0)
          for (int64_t r = 0; r < n; ++r) shifted[r] = a[r] + k0;
      }
      for (int64_t i = 0, r = 0; i < tiles; ++i) {
        const int mr = static_cast<int>((n - r) / (tiles - i));
        const int64_t offset = i * share;
        const char* tile_ahead = ahead != nullptr && offset < ahead_bytes ? ahead + offset : nullptr;
        float* tile = sums + (p * n + r) * NR;
        if (widen) {
          const float* block_scales = panel_scales && group > 0 ? panel_scales + k0 / group * NR : panel_scales;
          run_tile<Format::kFloat, NV>(mr, shifted.data() + r, 0, k1 - k0, wide_block, block_scales, group, tile,
                                       k0 == 0, k1 == K, tile_ahead, std::min(share, ahead_bytes - offset));
        } else {
          run_tile<F, NV>(mr, a + r, k0, k1, w, panel_scales, group, tile, k0 == 0, k1 == K, tile_ahead,
                          std::min(share, ahead_bytes - offset));
        }
        r += mr;
      }
    }
  }
  for (int64_t p = 0; p < width; ++p) finish(t.p0 + p, t.r0, n, static_cast<const float*>(sums + p * n * NR));
}

template <Format F, int NV, typename scalar_t>
void run_phases(const Shape& s, const Permutation& perm, const float* const* row_ptr, const void* gate_up,
                const void* down, const float* gate_up_scales, const float* down_scales, const scalar_t* b_gate_up,
                float* act_rows, float* y_rows) {
  constexpr int64_t NR = NV * L;
  const int64_t bytes1 = s.K1 * NR * static_cast<int64_t>(s.weight_bytes);
  const int64_t bytes2 = s.K2 * NR * static_cast<int64_t>(s.weight_bytes);
  // Scale groups: 0 without int8 or with one scale per column.
  const int64_t group1 = gate_up_scales && s.group1 < s.K1 ? s.group1 : 0;
  const int64_t group2 = down_scales && s.group2 < s.K2 ? s.group2 : 0;
  const int64_t groups1 = at::divup(s.K1, s.group1), groups2 = at::divup(s.K2, s.group2);

  // Phase A (gate and up, bias, activation -> act_rows) and phase B (down projection -> y_rows) share one
  // parallel region: a phase B task waits only for the phase A tasks of its own expert, which were all taken
  // before it (tasks are taken in order), so no thread idles at a barrier between the phases and the other
  // threads are woken once per call.
  const auto tasks_a = plan_tasks(perm.starts, s.E, s.P1, NR, bytes1);
  const auto tasks_b = plan_tasks(perm.starts, s.E, s.P2, NR, bytes2);
  const int64_t count_a = static_cast<int64_t>(tasks_a.size());
  std::vector<std::atomic<int32_t>> pending(s.E);
  for (const Task& t : tasks_a) pending[t.expert].fetch_add(1, std::memory_order_relaxed);
  std::vector<const float*> act_ptr(perm.rows);
  for (int64_t r = 0; r < perm.rows; ++r) act_ptr[r] = act_rows + r * s.Ip;

  const auto finish_a = [&](int64_t p, int64_t row0, int64_t rows, const float* sums) {
    // The panel's bias columns (zero past I), in the tile's column order.
    alignas(64) float bias[NR];
    if (b_gate_up) {
      const scalar_t* b = b_gate_up + perm.row_expert[row0] * (s.gated ? 2 * s.I : s.I);
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t unit = p * s.U + (c % s.U);
        bias[c] = unit < s.I ? static_cast<float>(b[(c >= s.U ? s.I : 0) + unit]) : 0.f;
      }
    }
    for (int64_t j = 0; j < rows; ++j) {
      const float* pre = sums + j * NR;
      float* out = act_rows + (row0 + j) * s.Ip + p * s.U;
      for (int64_t c = 0; c < s.U; c += L) {
        const int64_t n = std::min(L, s.U - c);
        Vec g = round_to<scalar_t>(Vec::loadu(pre + c, n));
        Vec u = s.gated ? round_to<scalar_t>(Vec::loadu(pre + s.U + c, n)) : Vec(0.f);
        if (b_gate_up) {
          g = round_to<scalar_t>(g + Vec::loadu(bias + c, n));
          if (s.gated) u = round_to<scalar_t>(u + Vec::loadu(bias + s.U + c, n));
        }
        const Vec y = s.gated ? gated_act(s.activation, g, u) : act(s.activation, g);
        round_to<scalar_t>(y).store(out + c, n);
      }
    }
  };
  const auto finish_b = [&](int64_t p, int64_t row0, int64_t rows, const float* sums) {
    const int64_t columns = std::min(NR, s.H - p * NR);
    for (int64_t j = 0; j < rows; ++j) {
      float* out = y_rows + (row0 + j) * s.H + p * NR;
      for (int64_t c = 0; c < columns; c += L) {
        const int64_t n = std::min(L, columns - c);
        round_to<scalar_t>(Vec::loadu(sums + j * NR + c, n)).store(out + c, n);
      }
    }
  };
  const double flops = 2.0 * perm.rows * NR * (s.P1 * s.K1 + s.P2 * s.K2);
  const double bytes = static_cast<double>(count_a) * bytes1 + static_cast<double>(tasks_b.size()) * bytes2;
  parallel_tasks(count_a + static_cast<int64_t>(tasks_b.size()), [&](int64_t i) {
    if (i < count_a) {
      const Task& t = tasks_a[i];
      run_task<F, NV>(t, row_ptr, s.K1, s.P1, static_cast<const char*>(gate_up), bytes1, gate_up_scales, groups1,
                      group1, finish_a);
      pending[t.expert].fetch_sub(1, std::memory_order_release);
      return;
    }
    const Task& t = tasks_b[i - count_a];
    wait_until_zero(pending[t.expert]);
    run_task<F, NV>(t, act_ptr.data(), s.K2, s.P2, static_cast<const char*>(down), bytes2, down_scales, groups2,
                    group2, finish_b);
  }, flops, bytes);
}

template <Format F, typename scalar_t>
void run_format(const Shape& s, const Permutation& perm, const float* const* row_ptr, const void* gate_up,
                const void* down, const float* gate_up_scales, const float* down_scales, const scalar_t* b_gate_up,
                float* act_rows, float* y_rows) {
  const auto run = [&](auto nv) {
    run_phases<F, decltype(nv)::value, scalar_t>(s, perm, row_ptr, gate_up, down, gate_up_scales, down_scales,
                                                 b_gate_up, act_rows, y_rows);
  };
  switch (s.NR / L) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    default: return run(std::integral_constant<int, 4>{});
  }
}

Shape describe(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
               const std::optional<at::Tensor>& gate_up_scales, const std::optional<at::Tensor>& down_scales,
               int64_t I, int64_t group_size, bool gated, Activation a) {
  Shape s{};
  const auto wtype = gate_up.scalar_type();
  TORCH_CHECK(down.scalar_type() == wtype, "moe_experts_packed: gate_up and down must have one dtype");
  if (wtype == at::kFloat) {
    s.format = Format::kFloat;
  } else if (wtype == at::kBFloat16) {
    s.format = Format::kBf16Pairs;
  } else {
    TORCH_CHECK(wtype == at::kChar, "moe_experts_packed: packed weights must be float32, bfloat16 or int8");
    s.format = Format::kInt8;
  }
  const bool pairs = s.format == Format::kBf16Pairs;
  const int64_t rank = pairs ? 5 : 4;
  TORCH_CHECK(gate_up.dim() == rank && down.dim() == rank && (!pairs || (gate_up.size(4) == 2 && down.size(4) == 2)),
              "moe_experts_packed: packed weights of the wrong rank");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "moe_experts_packed: packed weights must be contiguous");
  s.E = gate_up.size(0), s.P1 = gate_up.size(1), s.NR = gate_up.size(3), s.P2 = down.size(1);
  s.H = hidden.size(1), s.I = I, s.gated = gated, s.activation = a;
  s.K1 = gate_up.size(2) * (pairs ? 2 : 1), s.K2 = down.size(2) * (pairs ? 2 : 1);
  s.U = gated ? s.NR / 2 : s.NR;
  s.Ip = s.P1 * s.U;
  s.weight_bytes = gate_up.element_size();
  TORCH_CHECK((s.NR == 16 || s.NR == 32) && s.NR >= L && down.size(3) == s.NR && down.size(0) == s.E,
              "moe_experts_packed: panels of 16 or 32 columns, the same for both weights");
  TORCH_CHECK(s.K1 == (pairs ? s.H + s.H % 2 : s.H), "moe_experts_packed: gate_up was packed for another hidden size");
  TORCH_CHECK(s.K2 == s.Ip && s.Ip - s.U < I && I <= s.Ip && s.P2 == at::divup(s.H, s.NR),
              "moe_experts_packed: down does not match gate_up, hidden and the intermediate size");
  TORCH_CHECK(gate_up_scales.has_value() == (s.format == Format::kInt8) && down_scales.has_value() == gate_up_scales.has_value(),
              "moe_experts_packed: int8 weights, and only they, take scales");
  s.group1 = group_size > 0 ? group_size : s.K1;
  s.group2 = group_size > 0 ? group_size : s.K2;
  if (gate_up_scales) {
    TORCH_CHECK(gate_up_scales->scalar_type() == at::kFloat && down_scales->scalar_type() == at::kFloat &&
                    gate_up_scales->is_contiguous() && down_scales->is_contiguous(),
                "moe_experts_packed: scales must be contiguous float32");
    TORCH_CHECK(gate_up_scales->sizes() == at::IntArrayRef({s.E, s.P1, at::divup(s.K1, s.group1), s.NR}) &&
                    down_scales->sizes() == at::IntArrayRef({s.E, s.P2, at::divup(s.K2, s.group2), s.NR}),
                "moe_experts_packed: scales do not match the weights and group_size");
  }
  return s;
}

}  // namespace

at::Tensor moe_experts_packed(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& down,
                              const std::optional<at::Tensor>& gate_up_scales,
                              const std::optional<at::Tensor>& down_scales, int64_t intermediate, int64_t group_size,
                              const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation,
                              bool gated, const std::optional<at::Tensor>& b_gate_up,
                              const std::optional<at::Tensor>& b_down, bool apply_weights_on_input) {
  TORCH_CHECK(hidden.dim() == 2, "moe_experts_packed: hidden must be [T, H]");
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "moe_experts_packed: hidden must be float32, bfloat16 or float16");
  const Activation a = parse_activation(activation, gated);
  const Shape s = describe(hidden, gate_up, down, gate_up_scales, down_scales, intermediate, group_size, gated, a);
  const int64_t T = hidden.size(0), H = s.H;
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
              "moe_experts_packed: topk_weights and topk_ids must be [T, k]");
  TORCH_CHECK(s.format != Format::kBf16Pairs || dtype == at::kBFloat16,
              "moe_experts_packed: bfloat16 panels serve bfloat16 hidden states");
  const int64_t k = topk_ids.size(1), width = gated ? 2 * s.I : s.I;
  const auto weights = topk_weights.contiguous().to(at::kFloat);
  at::Tensor bgu, bd;
  if (b_gate_up) {
    TORCH_CHECK(b_gate_up->sizes() == at::IntArrayRef({s.E, width}), "moe_experts_packed: b_gate_up must be [E, 2I|I]");
    bgu = b_gate_up->to(dtype).contiguous();
  }
  if (b_down) {
    TORCH_CHECK(b_down->sizes() == at::IntArrayRef({s.E, H}), "moe_experts_packed: b_down must be [E, H]");
    bd = b_down->to(dtype).contiguous();
  }
  auto out = at::empty({T, H}, hidden.options());
  const Permutation perm = permute(topk_ids, s.E, hidden.options());
  const int32_t* id_ptr = perm.ids.const_data_ptr<int32_t>();
  if (T == 0) return out;
  const int64_t rows = perm.rows;
  const auto float_options = hidden.options().dtype(at::kFloat);
  const float* w_ptr = weights.const_data_ptr<float>();

  const auto dispatch = [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      // The input rows of phase A as float pointers: hidden's own rows when it is float32 and used as it is;
      // otherwise a float copy (per token, or per slot when the routing weight scales the input), zero-padded
      // to the panels' K.
      std::vector<const float*> row_ptr(rows);
      const int32_t* sorted = perm.sorted.const_data_ptr<int32_t>();
      at::Tensor x_rows;
      if (std::is_same_v<scalar_t, float> && !apply_weights_on_input && hidden.stride(1) == 1) {
        const float* x = reinterpret_cast<const float*>(hidden.const_data_ptr<scalar_t>());
        for (int64_t r = 0; r < rows; ++r) row_ptr[r] = x + (sorted[r] / k) * hidden.stride(0);
      } else {
        const auto x = hidden.contiguous();
        const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
        const int64_t n = apply_weights_on_input ? rows : T;
        x_rows = scratch_buffer(1, n * s.K1, float_options);
        float* dst = x_rows.data_ptr<float>();
        at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t slot = apply_weights_on_input ? sorted[r] : r * k;
            const scalar_t* src = x_ptr + (slot / k) * H;
            float* row = dst + r * s.K1;
            if (apply_weights_on_input) {
              const float w = w_ptr[slot];
              for (int64_t h = 0; h < H; ++h)
                row[h] = static_cast<float>(static_cast<scalar_t>(static_cast<float>(src[h]) * w));
            } else {
              at::vec::convert(src, row, H);
            }
            std::fill(row + H, row + s.K1, 0.f);
          }
        });
        for (int64_t r = 0; r < rows; ++r) row_ptr[r] = dst + (apply_weights_on_input ? r : sorted[r] / k) * s.K1;
      }
      auto act_rows = scratch_buffer(2, rows * s.Ip, float_options);
      auto y_rows = scratch_buffer(3, rows * H, float_options);
      const scalar_t* bias = bgu.defined() ? bgu.const_data_ptr<scalar_t>() : nullptr;
      const float* scales1 = gate_up_scales ? gate_up_scales->const_data_ptr<float>() : nullptr;
      const float* scales2 = down_scales ? down_scales->const_data_ptr<float>() : nullptr;
      const auto run = [&](auto fn) {
        fn(s, perm, row_ptr.data(), gate_up.const_data_ptr(), down.const_data_ptr(), scales1, scales2, bias,
           act_rows.data_ptr<float>(), y_rows.data_ptr<float>());
      };
      switch (s.format) {
        case Format::kFloat: run(run_format<Format::kFloat, scalar_t>); break;
        case Format::kBf16Pairs: run(run_format<Format::kBf16Pairs, scalar_t>); break;
        case Format::kInt8: run(run_format<Format::kInt8, scalar_t>); break;
      }
      combine(y_rows.const_data_ptr<float>(), bd.defined() ? bd.const_data_ptr<scalar_t>() : nullptr, id_ptr,
              perm.position.const_data_ptr<int32_t>(), w_ptr, apply_weights_on_input, T, k, H,
              out.data_ptr<scalar_t>());
    }
  };
  if (dtype == at::kFloat) {
    dispatch(float{});
  } else if (dtype == at::kBFloat16) {
    dispatch(at::BFloat16{});
  } else {
    dispatch(at::Half{});
  }
  return out;
}

}  // namespace netmerge::cpu::NETMERGE_ISA
