// Few-row GEMM on K-major weights: the transpose of the nn.Linear layout, as GPT-OSS stores its experts (and as
// the backward of moe_experts reads the nn.Linear ones). Used by cpu/grouped_gemm.cpp for experts with few rows.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace netmerge::cpu::NETMERGE_ISA::kmajor {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t L = Vec::size();
constexpr int kMaxRows = 8;

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

// res[t, :] += x[t, k0 .. k1) @ w[k0 .. k1, c0 .. c1) for TB rows, KB weight rows at a time: KB streams, each read
// in order along its row, and per vector of columns the TB partial sums go through registers once for KB rows.
template <typename scalar_t, int TB, int KB>
void accumulate(const float* x, int64_t K, int64_t k0, int64_t k1, const scalar_t* w, int64_t ldk, int64_t c0,
                int64_t c1, float* res) {
  const int64_t width = c1 - c0, full = width / L * L;
  for (int64_t k = k0; k + KB <= k1; k += KB) {
    const scalar_t* rows[KB];
    Vec xk[TB][KB];
    for (int r = 0; r < KB; ++r) rows[r] = w + (k + r) * ldk + c0;
    for (int t = 0; t < TB; ++t)
      for (int r = 0; r < KB; ++r) xk[t][r] = Vec(x[t * K + k + r]);
    const auto step = [&](int64_t c, int64_t count) {
      Vec wv[KB];
      for (int r = 0; r < KB; ++r) wv[r] = load(rows[r] + c, count);
      for (int t = 0; t < TB; ++t) {
        float* out = res + t * width + c;
        Vec acc = count == L ? Vec::loadu(out) : Vec::loadu(out, count);
        for (int r = 0; r < KB; ++r) acc = at::vec::fmadd(xk[t][r], wv[r], acc);
        count == L ? acc.store(out) : acc.store(out, count);
      }
    };
    for (int64_t c = 0; c < full; c += L) step(c, L);
    if (full < width) step(full, width - full);
  }
}

template <typename scalar_t, int TB>
void rows_pass(const float* x, int64_t K, const scalar_t* w, int64_t ldk, int64_t c0, int64_t c1, scalar_t* out,
               int64_t ldo, std::vector<float>& res) {
  constexpr int KB = TB <= 2 ? 4 : 2;  // registers: TB x KB broadcasts of x, KB weight vectors
  const int64_t width = c1 - c0, body = K / KB * KB;
  res.assign(TB * width, 0.f);
  accumulate<scalar_t, TB, KB>(x, K, 0, body, w, ldk, c0, c1, res.data());
  accumulate<scalar_t, TB, 1>(x, K, body, K, w, ldk, c0, c1, res.data());
  for (int t = 0; t < TB; ++t) at::vec::convert(res.data() + t * width, out + t * ldo + c0, width);
}

// Columns [c0, c1) of out[0:n] = x[0:n] @ w with w[k * ldk + c] (unit stride along the output columns), x
// contiguous [n, K], n <= kMaxRows, accumulated in float (in k order): all rows in one pass over the weights,
// read in storage order, a few weight rows at a time.
template <typename scalar_t>
void stream_gemm(const scalar_t* x, int64_t n, int64_t K, const scalar_t* w, int64_t ldk, int64_t c0, int64_t c1,
                 scalar_t* out, int64_t ldo, std::vector<float>& xf, std::vector<float>& res) {
  TORCH_CHECK(n <= kMaxRows, "stream_gemm_kmajor: at most ", kMaxRows, " rows");
  const float* xp;
  if constexpr (std::is_same_v<scalar_t, float>) {
    xp = x;
  } else {
    xf.resize(n * K);
    at::vec::convert(x, xf.data(), n * K);
    xp = xf.data();
  }
  switch (n) {
    case 1: return rows_pass<scalar_t, 1>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 2: return rows_pass<scalar_t, 2>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 3: return rows_pass<scalar_t, 3>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 4: return rows_pass<scalar_t, 4>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 5: return rows_pass<scalar_t, 5>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 6: return rows_pass<scalar_t, 6>(xp, K, w, ldk, c0, c1, out, ldo, res);
    case 7: return rows_pass<scalar_t, 7>(xp, K, w, ldk, c0, c1, out, ldo, res);
    default: return rows_pass<scalar_t, 8>(xp, K, w, ldk, c0, c1, out, ldo, res);
  }
}

}  // namespace netmerge::cpu::NETMERGE_ISA::kmajor
