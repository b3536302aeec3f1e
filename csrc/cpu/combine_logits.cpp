// CPU launcher of combine_logits, per block of R rows: (1) the statistics each method needs (its criterion and
// the experts' minima, or their sums), (2) the winner, lane-wise across the block's rows, (3) each output row.
// With many blocks the three steps run back to back on one block while its logits are in cache; with few, step
// (1) is spread over (block, piece) tasks first so that long rows still use every thread.
#include <ATen/ops/empty.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/segment_statistics.h"
#include "ops.h"

namespace netmerge::cpu::NETMERGE_ISA {
namespace {

using namespace segments;

template <typename scalar_t>
class Assembler {
 public:
  Assembler(const Layout& layout, const CombinePlan& plan, const float* gate, scalar_t* out, int64_t* winner)
      : layout_(layout), plan_(plan), gate_(gate), out_(out), winner_(winner) {}

  // Steps (2) and (3) for rows [b0, b0 + rows), given step (1)'s stats[(e * S + s) * R + r].
  void finish_block(int64_t b0, int64_t rows, const float* stats) {
    const int64_t E = static_cast<int64_t>(layout_.segments.size());
    const int64_t S = static_cast<int64_t>(plan_.stats.size());
    alignas(64) float winner[R], divisor[R];
    Vec chosen(-1.f);
    const K::CombineKind kind = plan_.rule.kind;
    if (kind == K::kGateScores || kind == K::kGateClaims) {
      gate_lanes_.assign(E * R, 0.f);
      at::vec::transpose_mxn<float>(gate_ + b0 * E, E, gate_lanes_.data(), R, static_cast<int>(rows),
                                    static_cast<int>(E));
    }
    if (kind == K::kSelect || kind == K::kGateScores) {
      const float* criteria = kind == K::kSelect ? stats : gate_lanes_.data();
      const int64_t stride = kind == K::kSelect ? S * R : R;
      auto selection = K::Selection<VecMath>::empty();
      for (int64_t e = 0; e < E; ++e)
        selection.consider(static_cast<float>(e), Vec::loadu(criteria + e * stride), plan_.rule.lower_wins);
      chosen = selection.winner;
    } else if (kind == K::kGateClaims) {
      auto claims = K::Claims<VecMath>::empty();
      for (int64_t e = 0; e < E; ++e)
        claims.consider(static_cast<float>(e), Vec::loadu(gate_lanes_.data() + e * R) != Vec(0.f));
      chosen = claims.winner();
    } else if (kind == K::kOverallRatio) {
      Vec total(0.f);
      for (int64_t e = 0; e < E; ++e) total = total + Vec::loadu(stats + e * S * R);
      total.store(divisor);
    }
    chosen.store(winner);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = b0 + r, w = static_cast<int64_t>(winner[r]);
      winner_[b] = w;
      scalar_t* out_row = out_ + b * layout_.columns;
      if (kind == K::kRatio || kind == K::kOverallRatio) {
        for (int64_t e = 0; e < E; ++e) {
          const Segment& s = layout_.segments[e];
          divide(row_of(s, b), s.count, kind == K::kRatio ? stats[e * S * R + r] : divisor[r], out_row + s.column);
        }
      } else if (w >= 0) {
        const Segment& s = layout_.segments[w];
        std::fill_n(out_row, layout_.columns, static_cast<scalar_t>(stats[(w * S + plan_.min_slot) * R + r]));
        std::memcpy(out_row + s.column, row_of(s, b), s.count * sizeof(scalar_t));
      } else {
        copy_row(b, out_row);
      }
    }
  }

  void copy_row(int64_t b, scalar_t* out_row) const {
    const auto& seg = layout_.segments;
    for (const Piece& run : layout_.copy_runs) {
      const int64_t width = seg[run.last - 1].column + seg[run.last - 1].count - seg[run.first].column;
      std::memcpy(out_row + seg[run.first].column, row_of(seg[run.first], b), width * sizeof(scalar_t));
    }
  }

 private:
  const scalar_t* row_of(const Segment& s, int64_t b) const {
    return reinterpret_cast<const scalar_t*>(s.base) + b * s.row_stride;
  }

  // out = x / d, in float32 (a division, not a multiplication by 1/d: the same rounding as the reference).
  void divide(const scalar_t* x, int64_t n, float d, scalar_t* out) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      int64_t j = 0;
      for (; j + R <= n; j += R) (Vec::loadu(x + j) / Vec(d)).store(out + j);
      for (; j < n; ++j) out[j] = x[j] / d;
    } else {
      as_float_.resize(n);
      to_float(x, as_float_.data(), n);
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(as_float_[j] / d);
    }
  }

  const Layout& layout_;
  const CombinePlan& plan_;
  const float* gate_;
  scalar_t* out_;
  int64_t* winner_;
  std::vector<float> gate_lanes_, as_float_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> combine_logits(at::TensorList logits, at::IntArrayRef class_counts,
                                                  c10::string_view method, const std::optional<at::Tensor>& gate) {
  const CombinePlan plan = combine_plan(method, gate.has_value() && gate->scalar_type() == at::kBool);
  const bool quartiles = plan.rule.kind == K::kSelect && K::quarters_of(plan.rule.criterion) > 0;
  const Layout layout = make_layout(logits, class_counts, quartiles, "combine_logits");
  const int64_t B = layout.rows, E = static_cast<int64_t>(layout.segments.size());
  const at::Tensor gate_f = gate_as_float(plan, gate, layout, logits[0]);
  auto combined = at::empty({B, layout.columns}, logits[0].options());
  auto winner = at::empty({B}, logits[0].options().dtype(at::kLong));
  if (B == 0) return {combined, winner};

  const int64_t S = static_cast<int64_t>(plan.stats.size());
  const int64_t blocks = at::divup(B, R), pieces = static_cast<int64_t>(layout.pieces.size());
  const bool fused = blocks >= 4 * at::get_num_threads();
  const int64_t rows_per_block = std::min(R, B);
  std::vector<float> all_stats(fused || S == 0 ? 0 : blocks * E * S * R);
  dispatch_logits(layout.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto* out = reinterpret_cast<scalar_t*>(combined.data_ptr());
    const float* gate_ptr = gate_f.defined() ? gate_f.const_data_ptr<float>() : nullptr;
    if (!fused && S > 0) {
      at::parallel_for(0, blocks * pieces, task_grain(rows_per_block * layout.columns / pieces),
                       [&](int64_t begin, int64_t end) {
        Engine<scalar_t> engine(layout, plan.stats);
        for (int64_t task = begin; task < end; ++task) {
          const Piece& piece = layout.pieces[task % pieces];
          const int64_t block = task / pieces, b0 = block * R;
          engine.run(piece, b0, std::min(R, B - b0), all_stats.data() + (block * E + piece.first) * S * R);
        }
      });
    }
    at::parallel_for(0, blocks, task_grain(rows_per_block * layout.columns), [&](int64_t begin, int64_t end) {
      Engine<scalar_t> engine(layout, plan.stats);
      Assembler<scalar_t> assembler(layout, plan, gate_ptr, out, winner.data_ptr<int64_t>());
      std::vector<float> block_stats(fused ? E * S * R : 0);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t b0 = block * R, rows = std::min(R, B - b0);
        const float* stats = S > 0 ? all_stats.data() + block * E * S * R : nullptr;
        if (fused && S > 0) {
          for (const Piece& piece : layout.pieces)
            engine.run(piece, b0, rows, block_stats.data() + piece.first * S * R);
          stats = block_stats.data();
        }
        assembler.finish_block(b0, rows, stats);
      }
    });
  });
  return {combined, winner};
}

}  // namespace netmerge::cpu::NETMERGE_ISA
