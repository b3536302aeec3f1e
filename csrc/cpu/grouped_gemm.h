// Grouped GEMM on CPU, shared by moe_experts and the grouped_mm ops that its backward uses.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace netmerge::cpu {
namespace NETMERGE_ISA {

// out[s, :] = x[s, :] @ w[e]^T for every row s of expert e, i.e. rows [offsets[e], offsets[e + 1]).
// x: [S, K] contiguous; w: [E, N, K], any strides; out: [S, N] contiguous, same dtype. offsets: E + 1 host
// values. Rows from offsets[E] on are left untouched.
//
// The work is split into (expert, block of output columns) tasks sized to keep both the GEMMs efficient
// and the threads evenly loaded; each task runs single-threaded. Experts with few rows (decode) go through
// a weight-streaming kernel that reads each weight once for all of the expert's rows; the others through
// ATen's CPU matmul on contiguous slices.
void grouped_gemm(const at::Tensor& x, const at::Tensor& w, const int64_t* offsets, at::Tensor& out);

}  // namespace NETMERGE_ISA

// Runs fn(i) for i in [0, n) on all threads, handing tasks out one at a time (tasks of uneven size balance).
// Work below ~50 us (fewer than kParallelFlops flops and kParallelBytes bytes read from memory) runs on the
// calling thread: waking the others costs more.
constexpr double kParallelFlops = 4e6;
constexpr double kParallelBytes = 1 << 20;
template <typename F>
void parallel_tasks(int64_t n, const F& fn, double flops = kParallelFlops, double bytes = 0);

}  // namespace netmerge::cpu

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>

#include <atomic>

template <typename F>
void netmerge::cpu::parallel_tasks(int64_t n, const F& fn, double flops, double bytes) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const bool worth_it = flops >= kParallelFlops || bytes >= kParallelBytes;
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, workers, worth_it ? 1 : workers, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state: the ATen calls in fn are below autograd, and
    // under the caller's inference mode (at::mm_out into inference tensors fails outside it).
    c10::InferenceMode inference_mode(inference);
    at::AutoDispatchBelowAutograd below_autograd;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}
