// Few-row GEMM on K-major weights: the transpose of the nn.Linear layout, as GPT-OSS stores its experts (and as
// the backward of moe_experts reads the nn.Linear ones). Used by cpu/grouped_gemm.cpp for experts with few rows.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace netmerge::cpu::kmajor {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();
constexpr int64_t kTileVectors = std::max<int64_t>(1, 64 / (L * sizeof(float)));  // a cache line of floats
constexpr int64_t kTileColumns = kTileVectors * L;

template <typename scalar_t>
Vec load(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return count == L ? Vec::loadu(p) : Vec::loadu(p, count);
  } else {
    Vec v;
    if (count == L) {
      at::vec::load_to_float(p, v);
    } else {
      scalar_t part[L] = {};
      std::copy(p, p + count, part);
      at::vec::load_to_float(part, v);
    }
    return v;
  }
}

// out[t, c .. c + cols) for TB rows (cols <= kTileColumns): per k one broadcast of x[t, k] and one FMA per vector
// of weights, with no horizontal reduction; each line of weights is read once for the TB rows.
template <typename scalar_t, int TB>
void tile(const float* x, int64_t K, const scalar_t* w, int64_t ldk, int64_t cols, float* res) {
  int64_t count[kTileVectors];
  for (int64_t v = 0; v < kTileVectors; ++v) count[v] = std::clamp<int64_t>(cols - v * L, 0, L);
  Vec acc[TB][kTileVectors];
  for (int t = 0; t < TB; ++t)
    for (int64_t v = 0; v < kTileVectors; ++v) acc[t][v] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* wk = w + k * ldk;
    __builtin_prefetch(wk + 8 * ldk, 0, 1);  // one line per k: the hardware prefetcher alone lags behind
    Vec wv[kTileVectors];
    for (int64_t v = 0; v < kTileVectors; ++v) wv[v] = count[v] > 0 ? load(wk + v * L, count[v]) : Vec(0.f);
    for (int t = 0; t < TB; ++t) {
      const Vec xv(x[t * K + k]);
      for (int64_t v = 0; v < kTileVectors; ++v) acc[t][v] = at::vec::fmadd(xv, wv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int64_t v = 0; v < kTileVectors; ++v) acc[t][v].store(res + t * kTileColumns + v * L);
}

// Columns [c0, c1) of out[0:n] = x[0:n] @ w with w[k * ldk + c] (unit stride along the output columns), x
// contiguous [n, K], accumulated in float: rows in groups of 4, columns in tiles of one cache line.
template <typename scalar_t>
void stream_gemm(const scalar_t* x, int64_t n, int64_t K, const scalar_t* w, int64_t ldk, int64_t c0, int64_t c1,
                 scalar_t* out, int64_t ldo, std::vector<float>& xf) {
  const float* xp;
  if constexpr (std::is_same_v<scalar_t, float>) {
    xp = x;
  } else {
    xf.resize(n * K);
    at::vec::convert(x, xf.data(), n * K);
    xp = xf.data();
  }
  alignas(64) float res[4 * kTileColumns];
  for (int64_t c = c0; c < c1; c += kTileColumns) {
    const int64_t cols = std::min(kTileColumns, c1 - c);
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t tb = std::min<int64_t>(4, n - j);
      const float* xj = xp + j * K;
      switch (tb) {
        case 1: tile<scalar_t, 1>(xj, K, w + c, ldk, cols, res); break;
        case 2: tile<scalar_t, 2>(xj, K, w + c, ldk, cols, res); break;
        case 3: tile<scalar_t, 3>(xj, K, w + c, ldk, cols, res); break;
        default: tile<scalar_t, 4>(xj, K, w + c, ldk, cols, res); break;
      }
      for (int64_t t = 0; t < tb; ++t) at::vec::convert(res + t * kTileColumns, out + (j + t) * ldo + c, cols);
    }
  }
}

}  // namespace netmerge::cpu::kmajor
