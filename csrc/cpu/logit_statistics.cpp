// CPU launcher of logit_statistics: tasks are (block of R rows, piece of experts), in parallel; each computes its
// statistics rows-in-lanes and writes its [rows][experts of the piece][S] slice of the output with one transpose.
#include <ATen/ops/empty.h>

#include <string>
#include <vector>

#include "cpu/segment_statistics.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {

at::Tensor logit_statistics(at::TensorList logits, at::IntArrayRef class_counts, at::ArrayRef<std::string> stats) {
  using namespace segments;
  const std::vector<int32_t> codes = statistic_codes(stats, "logit_statistics");
  const K::Needs needs = K::needs_of(codes.data(), static_cast<int32_t>(codes.size()));
  const Layout layout = make_layout(logits, class_counts, needs.any_quartile(), "logit_statistics");
  const int64_t B = layout.rows, E = static_cast<int64_t>(layout.segments.size());
  const int64_t S = static_cast<int64_t>(codes.size());
  auto out = at::empty({B, E, S}, logits[0].options().dtype(at::kFloat));
  if (B == 0) return out;

  float* out_ptr = out.data_ptr<float>();
  const int64_t pieces = static_cast<int64_t>(layout.pieces.size());
  const int64_t tasks = at::divup(B, R) * pieces;
  dispatch_logits(layout.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, tasks, task_grain(std::min(R, B) * layout.columns / pieces), [&](int64_t begin, int64_t end) {
      Engine<scalar_t> engine(layout, codes);
      std::vector<float> results;
      for (int64_t task = begin; task < end; ++task) {
        const Piece& piece = layout.pieces[task % pieces];
        const int64_t b0 = task / pieces * R, rows = std::min(R, B - b0);
        const int64_t width = (piece.last - piece.first) * S;
        results.resize(width * R);
        engine.run(piece, b0, rows, results.data());
        at::vec::transpose_mxn<float>(results.data(), R, out_ptr + b0 * E * S + piece.first * S, E * S,
                                      static_cast<int>(width), static_cast<int>(rows));
      }
    });
  });
  return out;
}

}  // namespace netmerge::cpu::NETMERGE_ISA
