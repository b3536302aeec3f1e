// The machine's float32 arithmetic peak for the benchmarks: independent FMA chains on registers only (no memory
// traffic), on every thread at once. A dense matmul below this rate means the library, not the machine, set the
// limit the benchmarks compare with.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <chrono>

#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
// Enough independent chains to cover the FMA latency on every pipe (2 pipes x 4-5 cycles on current x86).
constexpr int kChains = 12;

float chains(int64_t iterations, float seed) {
  Vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Vec(seed + static_cast<float>(i));
  const Vec m(0.999999f), a(seed * 1e-7f);
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = at::vec::fmadd(acc[i], m, a);
  Vec total(0.f);
  for (int i = 0; i < kChains; ++i) total = total + acc[i];
  alignas(64) float lanes[Vec::size()];
  total.store(lanes);
  return lanes[0];
}

// Seconds for `iterations` steps on every thread, all started together.
double timed(int64_t iterations, volatile float* sink) {
  const int64_t threads = at::get_num_threads();
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) *sink = chains(iterations, *sink + 1.f);
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

double fma_peak(double seconds) {
  volatile float sink = 1.f;
  int64_t iterations = 1 << 14;
  double elapsed = timed(iterations, &sink);
  while (elapsed < seconds / 4) {
    iterations *= 2;
    elapsed = timed(iterations, &sink);
  }
  double best = elapsed;
  for (int run = 0; run < 3; ++run) best = std::min(best, timed(iterations, &sink));
  const double flops = 2.0 * kChains * Vec::size() * static_cast<double>(iterations) * at::get_num_threads();
  return flops / best;
}

}  // namespace netmerge::cpu::NETMERGE_ISA
