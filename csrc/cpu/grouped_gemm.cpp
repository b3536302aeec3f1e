// Grouped GEMM on CPU (see grouped_gemm.h) and the two grouped_mm ops of moe_experts' backward.
#include "cpu/grouped_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/avx512_bf16.h"
#include "cpu/isa.h"
#include "cpu/stream_gemm_kmajor.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();

// The least output columns per task of the weight-streaming kernel and of a matmul.
constexpr int64_t kMinStreamColumns = 64;
constexpr int64_t kMinMatmulColumns = 128;
// Rows of an expert up to which the K-major streaming kernel (cpu/stream_gemm_kmajor.h) replaces ATen's matmul.
constexpr int64_t kKmajorMaxRows = kmajor::kMaxRows;

// Whether this build may call the vdpbf16ps kernels now (cpu/avx512_bf16.h).
inline bool bf16_dot_available() {
#if defined(NETMERGE_HAS_AVX512_BF16)
  return active_isa() == Isa::kAvx512Bf16;
#else
  return false;
#endif
}

// Rows of an expert up to which the weight-streaming kernel beats ATen's matmul (measured on Zen 4 with
// 64..512-wide K: the matmul packs every weight panel before using it, which at few rows per expert costs as
// much as the arithmetic; the streaming kernel reads each weight once, prefetched, and keeps it in L1 for all
// the expert's rows).
int64_t stream_max_rows(at::ScalarType dtype) { return dtype == at::kBFloat16 && bf16_dot_available() ? 32 : 8; }

template <typename scalar_t>
Vec load_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// The four horizontal sums of a, b, c, d. One reduction per output costs as much as a short dot product
// itself; reducing four at once shares the shuffles.
inline void reduce4(Vec a, Vec b, Vec c, Vec d, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  reduce4_avx512(a, b, c, d, out);
#else
  const auto sum = [](Vec x, Vec y) { return x + y; };
  out[0] = at::vec::vec_reduce_all<float>(sum, a), out[1] = at::vec::vec_reduce_all<float>(sum, b);
  out[2] = at::vec::vec_reduce_all<float>(sum, c), out[3] = at::vec::vec_reduce_all<float>(sum, d);
#endif
}

// res[j][r] = sum_h w[r][h] * x[j][h] for TB rows of x (float) and 4 weight rows: 4 x TB independent
// accumulators hide the FMA latency. Each step prefetches into L2 the weights 16 rows (4 blocks) further: the
// hardware prefetcher does not keep four strided streams far enough ahead, and one thread then reads at about
// the rate of a sequential `sum` (measured on Zen 4; 4 rows ahead, or into L1, reached half of it).
template <typename scalar_t, int TB>
void dot_block(const float* x, int64_t ldx, int64_t K, const scalar_t* const* w, int64_t ldw, float* res) {
  Vec acc[4][TB];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < TB; ++j) acc[r][j] = Vec(0.f);
  int64_t h = 0;
  for (; h + L <= K; h += L) {
    Vec xv[TB];
    for (int j = 0; j < TB; ++j) xv[j] = Vec::loadu(x + j * ldx + h);
    for (int r = 0; r < 4; ++r) {
      __builtin_prefetch(w[r] + 16 * ldw + h, 0, 1);
      const Vec wv = load_float(w[r] + h);
      for (int j = 0; j < TB; ++j) acc[r][j] = at::vec::fmadd(wv, xv[j], acc[r][j]);
    }
  }
  for (int j = 0; j < TB; ++j) {
    reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j], res + j * 4);
    for (int64_t t = h; t < K; ++t)
      for (int r = 0; r < 4; ++r) res[j * 4 + r] += static_cast<float>(w[r][t]) * x[j * ldx + t];
  }
}

template <typename scalar_t, int TB>
void stream_block(const scalar_t* x, const float* xf, int64_t K, const scalar_t* const* w, int64_t ldw,
                  float* res) {
#if defined(NETMERGE_HAS_AVX512_BF16)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (xf == nullptr)
      return avx512_bf16::dot_rows(reinterpret_cast<const uint16_t*>(x), K, K,
                                   reinterpret_cast<const uint16_t* const*>(w), ldw, TB, res);
  }
#endif
  dot_block<scalar_t, TB>(xf, K, K, w, ldw, res);
}

// Columns [c0, c1) of out[0:n] = x[0:n] @ w^T for a row-major w ([N, K], row stride ldw), x contiguous [n, K].
// Columns outer, rows inner: a block of 4 weight rows comes from memory once and stays in L1 for every group of
// 4 rows of x.
template <typename scalar_t>
void stream_gemm(const scalar_t* x, int64_t n, int64_t K, const scalar_t* w, int64_t ldw, int64_t c0, int64_t c1,
                 scalar_t* out, int64_t ldo, std::vector<float>& xf) {
  const float* xf_ptr = nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    xf_ptr = x;
  } else if (!std::is_same_v<scalar_t, at::BFloat16> || !bf16_dot_available()) {
    xf.resize(n * K);
    at::vec::convert(x, xf.data(), n * K);
    xf_ptr = xf.data();
  }
  float res[16];
  for (int64_t c = c0; c < c1; c += 4) {
    const int64_t columns = std::min<int64_t>(4, c1 - c);
    const scalar_t* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = w + (c + std::min<int64_t>(r, columns - 1)) * ldw;  // tail: repeat
    for (int64_t j = 0; j < n; j += 4) {
      const scalar_t* xj = x + j * K;
      const float* xfj = xf_ptr ? xf_ptr + j * K : nullptr;
      const int64_t tb = std::min<int64_t>(4, n - j);
      switch (tb) {
        case 1: stream_block<scalar_t, 1>(xj, xfj, K, rows, ldw, res); break;
        case 2: stream_block<scalar_t, 2>(xj, xfj, K, rows, ldw, res); break;
        case 3: stream_block<scalar_t, 3>(xj, xfj, K, rows, ldw, res); break;
        default: stream_block<scalar_t, 4>(xj, xfj, K, rows, ldw, res); break;
      }
      for (int64_t t = 0; t < tb; ++t)
        for (int64_t r = 0; r < columns; ++r) out[(j + t) * ldo + c + r] = static_cast<scalar_t>(res[t * 4 + r]);
    }
  }
}

#if defined(__AVX512F__)
// float GEMM for experts with many rows, vectorised along the rows: out[r, c] = sum_k x[r, k] * w[c, k].
// The expert's rows are packed transposed ([K][16 * NV], zero-padded), a small copy (rows * K) made once per
// task; the weights are read in place, one broadcast per element and MR rows at a time, each element used for
// all of the block's rows. ATen's matmul instead transposes every weight panel into a packed copy, which at
// tens of rows per expert costs about a fifth of the GEMM. Each output is one FMA chain in k order.
constexpr int64_t kPanelMaxVectors = 4;
constexpr int64_t kPanelColumns = 24;  // a multiple of every MR below
// Rows of an expert from which the panel kernel replaces ATen's matmul (at 32 rows per expert it was ~1.1x
// faster on 2 threads, at ~17 rows, half of them padding, slightly slower).
constexpr int64_t kPanelMinRows = 24;

template <int NV>
constexpr int panel_mr() {
  return NV == 1 ? 24 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
}

template <int NV>
void panel_tile(const float* xt, int64_t K, const float* const* wr, float* tile) {
  constexpr int MR = panel_mr<NV>();
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 15) == 0)
      for (int i = 0; i < MR; ++i) __builtin_prefetch(wr[i] + k + 64, 0, 3);
    __m512 xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xt + k * NV * 16 + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(wr[i][k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(b, xv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(tile + i * NV * 16 + v * 16, acc[i][v]);
}

template <int NV>
void panel_block(const float* xt, int64_t nr, int64_t K, const float* w, int64_t ldw, int64_t c0, int64_t c1,
                 float* out, int64_t ldo) {
  constexpr int MR = panel_mr<NV>();
  alignas(64) float tile[MR * NV * 16];
  for (int64_t c = c0; c < c1; c += MR) {
    const int64_t columns = std::min<int64_t>(MR, c1 - c);
    const float* wr[MR];
    for (int i = 0; i < MR; ++i) wr[i] = w + (c + std::min<int64_t>(i, columns - 1)) * ldw;  // tail: repeat
    panel_tile<NV>(xt, K, wr, tile);
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t i = 0; i < columns; ++i) out[r * ldo + c + i] = tile[i * NV * 16 + r];
  }
}

// The packed rows of one expert: row blocks of 64 (the last one shorter), block b at xt + b * K * 64 as
// [K][16 * ceil(rows_b / 16)], zero-padded.
inline int64_t panel_packed_size(int64_t n, int64_t K) {
  return (n + 16 * kPanelMaxVectors - 1) / (16 * kPanelMaxVectors) * K * 16 * kPanelMaxVectors;
}

void panel_pack(const float* x, int64_t n, int64_t K, float* xt) {
  constexpr int64_t B = 16 * kPanelMaxVectors;
  for (int64_t r0 = 0; r0 < n; r0 += B) {
    const int64_t nr = std::min(B, n - r0), ld = (nr + 15) / 16 * 16;
    float* dst = xt + r0 / B * K * B;
    const float* src = x + r0 * K;
    for (int64_t k = 0; k < K; ++k) std::fill(dst + k * ld + nr, dst + (k + 1) * ld, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {  // 16 columns of x at a time: 16 destination lines, each in order
      const int64_t ke = std::min(K, k0 + 16);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = k0; k < ke; ++k) dst[k * ld + r] = src[r * K + k];
    }
  }
}

// Columns [c0, c1) of out[0:n] = x[0:n] @ w^T from x packed by panel_pack; w row-major (row stride ldw).
void panel_gemm(const float* xt, int64_t n, int64_t K, const float* w, int64_t ldw, int64_t c0, int64_t c1,
                float* out, int64_t ldo) {
  constexpr int64_t B = 16 * kPanelMaxVectors;
  for (int64_t c = c0; c < c1; c += kPanelColumns) {
    const int64_t ce = std::min(c1, c + kPanelColumns);
    for (int64_t r0 = 0; r0 < n; r0 += B) {
      const int64_t nr = std::min(B, n - r0);
      const float* src = xt + r0 / B * K * B;
      float* dst = out + r0 * ldo;
      switch ((nr + 15) / 16) {
        case 1: panel_block<1>(src, nr, K, w, ldw, c, ce, dst, ldo); break;
        case 2: panel_block<2>(src, nr, K, w, ldw, c, ce, dst, ldo); break;
        case 3: panel_block<3>(src, nr, K, w, ldw, c, ce, dst, ldo); break;
        default: panel_block<4>(src, nr, K, w, ldw, c, ce, dst, ldo); break;
      }
    }
  }
}

template <typename scalar_t>
bool panel_task(const scalar_t* xt, int64_t n, int64_t K, const scalar_t* w, int64_t ldw, int64_t c0, int64_t c1,
                scalar_t* out, int64_t ldo) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    panel_gemm(xt, n, K, w, ldw, c0, c1, out, ldo);
    return true;
  }
  return false;
}
#endif

struct Task {
  int64_t expert, c0, c1;
};

}  // namespace

void grouped_gemm(const at::Tensor& x, const at::Tensor& w, const int64_t* offsets, at::Tensor& out) {
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  const bool streamable = x.scalar_type() != at::kDouble && w.stride(2) == 1;
  // K-major weights (unit stride along N: GPT-OSS's experts, and the nn.Linear ones in the backward).
  const bool streamable_kmajor = x.scalar_type() != at::kDouble && !streamable && w.stride(1) == 1;
  const bool pack_kmajor = w.stride(2) != 1 && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  const int64_t max_stream_rows = stream_max_rows(x.scalar_type());
  const int64_t threads = at::get_num_threads();

  // Split each expert's columns in proportion to its rows, aiming at ~8 tasks per thread: long enough runs of
  // weight rows for the prefetcher, enough tasks to balance the threads.
  int64_t total_rows = 0;
  for (int64_t e = 0; e < E; ++e) total_rows += offsets[e + 1] - offsets[e];
  std::vector<Task> tasks;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    const int64_t parts = std::max<int64_t>(1, (8 * threads * rows + total_rows - 1) / total_rows);
    const bool stream = (streamable && rows <= max_stream_rows) || (streamable_kmajor && rows <= kKmajorMaxRows);
    const int64_t least = stream ? kMinStreamColumns : kMinMatmulColumns;
    const int64_t width = std::max(least, (N + parts - 1) / parts);
    for (int64_t c = 0; c < N; c += width) tasks.push_back({e, c, std::min(N, c + width)});
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_gemm_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const double flops = 2.0 * total_rows * N * K;
    int64_t active = 0;
    for (int64_t e = 0; e < E; ++e) active += offsets[e + 1] > offsets[e];
    const double weight_bytes = static_cast<double>(active) * N * K * sizeof(scalar_t);
    // float experts with many rows: pack their rows once (cpu panel kernel), before the column tasks.
#if defined(__AVX512F__)
    std::vector<int64_t> panel_offset(E, -1);
    thread_local std::vector<float> packed;  // the caller's; worker threads read it through packed_ptr
    float* packed_ptr = nullptr;
    if (std::is_same_v<scalar_t, float> && streamable) {
      int64_t size = 0;
      std::vector<int64_t> panel_experts;
      for (int64_t e = 0; e < E; ++e) {
        const int64_t rows = offsets[e + 1] - offsets[e];
        if (rows < kPanelMinRows) continue;
        panel_offset[e] = size, size += panel_packed_size(rows, K);
        panel_experts.push_back(e);
      }
      if (packed.size() < static_cast<size_t>(size)) packed.resize(size);
      packed_ptr = packed.data();
      parallel_tasks(static_cast<int64_t>(panel_experts.size()), [&](int64_t i) {
        const int64_t e = panel_experts[i];
        panel_pack(reinterpret_cast<const float*>(x_ptr) + offsets[e] * K, offsets[e + 1] - offsets[e], K,
                   packed_ptr + panel_offset[e]);
      }, 0, static_cast<double>(total_rows) * K * sizeof(float));
    }
#endif
    parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const Task& t = tasks[i];
      const int64_t r0 = offsets[t.expert], rows = offsets[t.expert + 1] - r0;
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (streamable && rows <= max_stream_rows) {
          thread_local std::vector<float> xf;
          stream_gemm(x_ptr + r0 * K, rows, K, w_ptr + t.expert * w.stride(0), w.stride(1), t.c0, t.c1,
                      out_ptr + r0 * N, N, xf);
          return;
        }
        if (streamable_kmajor && rows <= kKmajorMaxRows) {
          thread_local std::vector<float> xf, partial;
          kmajor::stream_gemm(x_ptr + r0 * K, rows, K, w_ptr + t.expert * w.stride(0), w.stride(2), t.c0, t.c1,
                              out_ptr + r0 * N, N, xf, partial);
          return;
        }
      }
#if defined(__AVX512F__)
      if (panel_offset[t.expert] >= 0 &&
          panel_task<scalar_t>(reinterpret_cast<const scalar_t*>(packed_ptr + panel_offset[t.expert]), rows, K,
                               w_ptr + t.expert * w.stride(0), w.stride(1), t.c0, t.c1, out_ptr + r0 * N, N))
        return;
#endif
      auto dst = out.narrow(0, r0, rows).narrow(1, t.c0, t.c1 - t.c0);
      auto w_tile = w.select(0, t.expert).narrow(0, t.c0, t.c1 - t.c0);
      // ATen's float16/bfloat16 CPU matmul is fast only on weights in the nn.Linear layout (about 6x slower on
      // K-major ones, measured on Zen 3): pack a K-major tile so first, a copy the GEMM's rows amortise.
      if (pack_kmajor) w_tile = w_tile.contiguous();
      at::mm_out(dst, x.narrow(0, r0, rows), w_tile.t());
    }, flops, weight_bytes);
  });
}

namespace {

std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t E) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == E + 1, "grouped_mm: expert_offsets must be [E + 1]");
  const auto off = offsets.to(at::kLong).contiguous();
  std::vector<int64_t> v(off.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>() + E + 1);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(0 <= v[e] && v[e] <= v[e + 1], "grouped_mm: bad expert_offsets");
  return v;
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& expert_offsets) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(1), "grouped_mm: x [S, K], w [E, K, N]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "grouped_mm: x and w must have the same dtype");
  const int64_t E = w.size(0), S = x.size(0), N = w.size(2);
  const auto off = host_offsets(expert_offsets, E);
  TORCH_CHECK(off[E] <= S, "grouped_mm: expert_offsets run past the rows of x");
  auto out = at::empty({S, N}, x.options());
  out.narrow(0, off[E], S - off[E]).zero_();
  grouped_gemm(x.contiguous(), w.transpose(1, 2), off.data(), out);
  return out;
}

at::Tensor grouped_mm_weight_grad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "grouped_mm_weight_grad: a [S, M], b [S, N]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "grouped_mm_weight_grad: a and b must have the same dtype");
  const int64_t E = expert_offsets.size(0) - 1, M = a.size(1), N = b.size(1);
  const auto off = host_offsets(expert_offsets, E);
  TORCH_CHECK(off[E] <= a.size(0), "grouped_mm_weight_grad: expert_offsets run past the rows");
  auto out = at::empty({E, M, N}, a.options());
  const auto ac = a.contiguous(), bc = b.contiguous();
  parallel_tasks(E, [&](int64_t e) {
    auto dst = out.select(0, e);
    if (off[e + 1] == off[e]) {
      dst.zero_();
    } else {
      const int64_t r0 = off[e], rows = off[e + 1] - off[e];
      at::mm_out(dst, ac.narrow(0, r0, rows).t(), bc.narrow(0, r0, rows));
    }
  }, 2.0 * off[E] * M * N);
  return out;
}

}  // namespace netmerge::cpu::NETMERGE_ISA
