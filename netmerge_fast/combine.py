"""Combining heterogeneous pre-trained classifiers without joint training data (Kang, Hong & Maul 2020): batched
per-expert logit statistics, and the data-free combiners of the seed repository (cwkang1998/network-merging)
generalised from 2 experts to E.

Expert i is a classifier over its own C_i classes; the merged model answers over the union, expert 0's classes
first, then expert 1's, and so on. Its logits come either as a list of E tensors ``[B, C_i]`` or as one packed
tensor ``[B, sum C_i]`` with ``class_counts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from netmerge_fast import _checks, reference
from netmerge_fast._backends import backends, resolve

__all__ = ["METHODS", "STATISTICS", "combine_logits", "logit_statistics"]

STATISTICS = reference.STATISTICS
METHODS = (
    "naive",
    "std",
    "range",
    "third_quartile",
    "max_prob",
    "entropy",
    "margin",
    "energy",
    "ratio",
    "overall_ratio",
    "gate",
)

Logits = torch.Tensor | Sequence[torch.Tensor]


def logit_statistics(
    logits: Logits,
    class_counts: Sequence[int] | torch.Tensor | None = None,
    *,
    stats: Sequence[str] | str = ("mean", "std", "max"),
    backend: str = "auto",
) -> torch.Tensor:
    """Statistics of every expert's logits, per row: ``[B, E, len(stats)]`` float32.

    Args:
        logits: a list of E tensors ``[B, C_i]``, or one packed tensor ``[B, sum C_i]`` with ``class_counts``.
            float32, float16 or bfloat16, any strides; C_i >= 1, ragged. float64 is accepted by the ``torch``
            backend and computed (and returned) in float64, for gradcheck.
        class_counts: C_i per expert (ints, or a 1-D integer tensor: a CUDA one costs a device sync); required
            with a packed tensor, optional with a list (then it must match the widths).
        stats: names from ``STATISTICS``, in the output's order (a single name is one statistic):
            ``mean``, ``sum``, ``min``, ``max``; ``var`` and ``std`` (unbiased, as ``torch.var``/``torch.std``);
            ``median``, ``q1``, ``q3`` (linear interpolation, as ``torch.quantile``); ``range`` (max - min);
            ``entropy`` and ``max_prob`` (of the softmax over the expert's classes); ``margin`` (top-1 minus
            top-2 logit); ``logsumexp``.
        backend: ``"auto"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Edge cases, identical on every backend:

    - A NaN logit makes every statistic of its expert (in that row) NaN.
    - One class (C_i = 1): var and std are NaN (as torch), margin is +inf (no runner-up), max_prob 1,
      entropy 0.
    - A constant segment (all logits equal, infinities included) has mean = that value, var = std = range = 0.
    - Infinities follow IEEE arithmetic (mean/sum become ±inf, or NaN for +inf with -inf; var/std NaN)
      except where a limit is natural: the softmax statistics put all mass on the +inf logits, shared equally,
      and an all -inf segment is uniform; logsumexp is then +inf (resp. -inf). A repeated maximum gives
      margin 0. Quartiles interpolating towards an infinite order statistic are that infinity (NaN between
      -inf and +inf).

    Gradients flow to the logits (the universal gate trains through this op) with one backward for every
    backend. Subgradient conventions: min/max (and range, max_prob, margin) share the gradient equally among
    tied extremes; quartiles send it to the order statistics a stable sort picks; std has zero gradient where
    it is 0; a NaN statistic passes no gradient, and neither do the softmax statistics of rows whose maximum
    is infinite. The backward is not itself differentiable (no double backward).

    Example (the universal gate's input, Kang et al.)::

        feats = logit_statistics([logits_a, logits_b], stats=("mean", "std", "max"))   # [B, 2, 3]
    """
    tensors, counts = _validate_logits(logits, class_counts)
    names = _validate_stats(stats)
    chosen = resolve("logit_statistics", backend, tensors[0].device, tensors[0].dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LogitStatistics.apply(chosen, counts, names, *tensors)
    return _statistics_kernel(chosen)(tensors, counts, names)


def combine_logits(
    logits: Logits,
    class_counts: Sequence[int] | torch.Tensor | None = None,
    *,
    method: str = "naive",
    gate: torch.Tensor | None = None,
    return_winner: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merge E experts' logits into one answer over the union of their classes: ``[B, sum C_i]``, input dtype.

    Args:
        logits, class_counts: as in ``logit_statistics`` (float32, float16 or bfloat16).
        method: one of ``METHODS``:

            - ``"naive"``: the concatenation (the paper's best data-free combiner).
            - selecting methods, per row one expert wins: ``"std"`` (the LOWEST std wins: that is what the seed
              code does, ``if std1 < std2: expert 1``), ``"range"`` (largest max - min), ``"third_quartile"``
              (largest max - q3, q3 as ``torch.quantile(x, 0.75)``), ``"max_prob"`` (largest max softmax
              probability), ``"entropy"`` (lowest softmax entropy), ``"margin"`` (largest top-1 minus top-2
              logit), ``"energy"`` (lowest energy -logsumexp, i.e. largest logsumexp).
            - ``"ratio"``: each expert's logits divided by the sum of its own logits; ``"overall_ratio"``: the
              concatenation divided by its total sum. Plain IEEE division, as the seed: a negative sum flips
              the order of that expert's (resp. the row's) logits, a zero sum gives ±inf or NaN.
            - ``"gate"``: ``gate`` picks the expert: float scores ``[B, E]`` (gating-network outputs or
              membership logits, compared in float32): the argmax wins; or a boolean claims mask ``[B, E]``:
              exactly one claim selects that expert, none or several fall back to the concatenation (the seed's
              PAN rule).

        gate: ``[B, E]`` float or bool, on the logits' device; only with ``method="gate"``.
        return_winner: also return ``winner`` ``[B]`` int64: the selected expert, -1 where no single expert
            was selected (``naive``, the ratios, a fallback).
        backend: ``"auto"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Winner takes all, as the seed: the winner's logits in its own slots, every other slot filled with the
    winner's minimum logit (so the argmax of the row is always one of the winner's classes). Ties go to the
    lower expert index. A NaN criterion (an expert with a NaN logit, a 1-class expert's std, ...) never wins;
    if every expert's criterion is NaN, the row falls back to the concatenation (winner -1). Statistics
    follow ``logit_statistics``' rules for infinities and constant rows.

    Not the seed, on purpose: the seed's 2-expert comparisons (``if a < b: expert 1 else expert 2``) give ties
    and NaN to expert 2; here ties go to the lower index and NaN never wins. The seed's ``thirdQ`` called its
    percentile helper with q=0.75 where it expected 75, so for fewer than 68 classes it ranked experts by
    max - min: that is ``method="range"`` here; ``"third_quartile"`` is the intended max - q3.

    Gradients flow to the logits through the combined output, on every backend; the winner is a constant (the
    gate and the criteria receive no gradient).

    Example::

        merged = combine_logits([logits_a, logits_b], method="std")          # [B, C_a + C_b]
        merged, winner = combine_logits(packed, [5, 5], method="gate", gate=pan_claims, return_winner=True)
    """
    tensors, counts = _validate_logits(logits, class_counts)
    _checks.choice("method", method, METHODS)
    _validate_gate(gate, method, tensors[0], len(counts))
    _checks.boolean("return_winner", return_winner)
    chosen = resolve("combine_logits", backend, tensors[0].device, tensors[0].dtype)
    if chosen == "torch":
        combined, winner = reference.combine_logits(tensors, counts, method=method, gate=gate)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        combined, winner = _CombineLogits.apply(counts, method, gate, *tensors)
    else:
        combined, winner = torch.ops.netmerge.combine_logits(tensors, counts, method, gate)
    return (combined, winner) if return_winner else combined


def _validate_logits(logits, class_counts) -> tuple[list[torch.Tensor], list[int]]:
    if isinstance(logits, list | tuple):
        if not logits:
            raise ValueError("logits must hold at least one expert's tensor, got an empty list")
        tensors = [_checks.tensor(f"logits[{i}]", t, dim=2, floating=True) for i, t in enumerate(logits)]
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=1):
            if t.dtype != first.dtype:
                raise TypeError(f"logits[{i}] is {t.dtype} but logits[0] is {first.dtype}; experts must share a dtype")
            _checks.same_device(f"logits[{i}]", t, "logits[0]", first)
            if t.shape[0] != first.shape[0]:
                raise ValueError(f"logits[{i}] has {t.shape[0]} rows but logits[0] has {first.shape[0]}")
        widths = [t.shape[1] for t in tensors]
        counts = widths if class_counts is None else _validate_counts(class_counts)
        if counts != widths:
            raise ValueError(f"class_counts {counts} do not match the widths of logits {widths}")
    else:
        tensors = [_checks.tensor("logits", logits, dim=2, floating=True)]
        if class_counts is None:
            raise ValueError("class_counts is required with a packed logits tensor [B, sum C_i]")
        counts = _validate_counts(class_counts)
        if sum(counts) != logits.shape[1]:
            raise ValueError(f"class_counts sum to {sum(counts)} but logits has {logits.shape[1]} columns")
    for i, c in enumerate(counts):
        if c < 1:
            raise ValueError(f"every expert needs at least one class: class_counts[{i}] = {c}")
    return tensors, counts


def _validate_counts(class_counts) -> list[int]:
    if isinstance(class_counts, torch.Tensor):
        _checks.tensor("class_counts", class_counts, dim=1, integer=True)
        class_counts = class_counts.tolist()
    if not isinstance(class_counts, Sequence) or isinstance(class_counts, str) or not class_counts:
        raise TypeError(f"class_counts must be a non-empty sequence of ints, got {class_counts!r}")
    return [_checks.integer(f"class_counts[{i}]", c, low=1) for i, c in enumerate(class_counts)]


def _validate_stats(stats) -> tuple[str, ...]:
    names = (stats,) if isinstance(stats, str) else stats
    if not isinstance(names, Sequence) or not names:
        raise TypeError(f"stats must be a non-empty sequence of statistic names, got {stats!r}")
    return tuple(_checks.choice("stats", name, STATISTICS) for name in names)


def _validate_gate(gate, method: str, logits: torch.Tensor, num_experts: int) -> None:
    if method != "gate":
        if gate is not None:
            raise ValueError(f"gate is only used with method='gate', got method={method!r}")
        return
    if gate is None:
        raise ValueError("method='gate' needs gate: float scores or a boolean claims mask [B, E]")
    _checks.tensor("gate", gate, dim=2)
    if not (gate.is_floating_point() or gate.dtype == torch.bool):
        raise TypeError(f"gate must be float scores or a boolean claims mask, got {gate.dtype}")
    if tuple(gate.shape) != (logits.shape[0], num_experts):
        raise ValueError(f"gate must have shape [B, E] = [{logits.shape[0]}, {num_experts}], got {list(gate.shape)}")
    _checks.same_device("gate", gate, "logits", logits)


def _statistics_kernel(backend: str):
    if backend == "torch":
        return lambda tensors, counts, names: reference.logit_statistics(tensors, counts, stats=names)
    return torch.ops.netmerge.logit_statistics.default


class _LogitStatistics(torch.autograd.Function):
    """Statistics on any backend; the backward is plain torch ops and serves every backend."""

    @staticmethod
    def forward(ctx, backend, class_counts, names, *tensors):
        out = _statistics_kernel(backend)(list(tensors), class_counts, names)
        ctx.save_for_backward(*tensors, out)
        ctx.config = (class_counts, names)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        *tensors, out = ctx.saved_tensors
        class_counts, names = ctx.config
        grad = _statistics_backward(reference.pack_logits(tensors), class_counts, names, out, grad_out)
        return (None, None, None, *_per_input(grad, class_counts, tensors))


def _per_input(grad, class_counts, tensors):
    """The packed gradient [B, N] split back into one gradient per input tensor, in the inputs' dtypes."""
    parts = grad.split(class_counts, dim=1) if len(tensors) > 1 else (grad,)
    return tuple(p.to(t.dtype) for p, t in zip(parts, tensors, strict=True))


def _statistics_backward(x, class_counts, names, out, grad_out):
    """d loss / d packed logits [B, N], given d loss / d statistics [B, E, S] and the statistics themselves."""
    x = x.to(reference.compute_dtype(x))
    E = len(class_counts)
    seg = reference.segment_ids(class_counts, x.device)
    n = reference.class_count_tensor(class_counts, x.device).to(x.dtype)
    spread = lambda v: v.index_select(1, seg)  # [B, E] -> [B, N]
    seg_sum = lambda v: reference.segment_sum(v, seg, E)
    seg_max = lambda v: reference.segment_reduce(v, seg, E, "amax")
    zero = x.new_zeros(())

    def share(mask):  # equal shares among the masked elements of each segment
        mask = mask.to(x.dtype)
        return mask / spread(seg_sum(mask).clamp_min(1))

    hi, lo = seg_max(x), reference.segment_reduce(x, seg, E, "amin")
    constant = lo == hi
    at_max, at_min = share(x == spread(hi)), share(x == spread(lo))
    deviation = torch.where(spread(constant), zero, x - spread(torch.where(constant, lo, seg_sum(x) / n)))
    if {"entropy", "max_prob", "logsumexp"} & set(names):
        finite = torch.isfinite(hi)
        e = torch.exp(x - spread(torch.where(finite, hi, 0.0)))
        p = torch.where(spread(finite), e / spread(seg_sum(e)), zero)  # rows with an infinite max: no gradient
        log_p = torch.log(torch.where(p > 0, p, 1.0))
    if "margin" in names:
        repeated_max = seg_sum((x == spread(hi)).to(x.dtype)) > 1
        second = torch.where(repeated_max, hi, seg_max(torch.where(x < spread(hi), x, -torch.inf)))
        runner_up = share((x == spread(second)) & (x < spread(hi)))
    if {"median", "q1", "q3"} & set(names):
        order = reference.segment_order(x, seg)

    grad = torch.zeros_like(x)
    for i, name in enumerate(names):
        nan = torch.isnan(out[..., i])
        g = torch.where(nan, zero, grad_out[..., i].to(x.dtype))  # a NaN statistic passes no gradient
        if name in ("median", "q1", "q3"):
            _quartile_backward(x, class_counts, {"q1": 1, "median": 2, "q3": 3}[name], order, g, grad)
            continue
        if name == "sum":
            term = spread(g)
        elif name == "mean":
            term = spread(g / n)
        elif name == "var":
            term = 2 * deviation * spread(g / (n - 1).clamp_min(1))
        elif name == "std":
            std = out[..., i].to(x.dtype)
            term = deviation * spread(torch.where(std > 0, g / ((n - 1).clamp_min(1) * std), zero))
        elif name in ("min", "max", "range"):
            term = spread(g) * {"min": at_min, "max": at_max, "range": at_max - at_min}[name]
        elif name == "margin":
            term = spread(torch.where((hi == second) | (n == 1), zero, g)) * (at_max - runner_up)
        elif name == "logsumexp":
            term = spread(g) * p
        elif name == "max_prob":
            term = spread(g * seg_max(p)) * (at_max - p)
        else:  # entropy
            term = -spread(g) * p * (log_p + spread(-seg_sum(p * log_p)))
        grad = grad + torch.where(spread(nan), zero, term)
    return grad


def _quartile_backward(x, class_counts, quarters, order, g, grad):
    """Adds the gradient of one quartile to ``grad``: to the two order statistics it interpolates."""
    lower, upper, w = reference.quantile_positions(class_counts, quarters, x.device)
    at_lower, at_upper = order[:, lower], order[:, upper]
    a, b = x.gather(1, at_lower), x.gather(1, at_upper)
    w = w.to(x.dtype).expand_as(a)
    a_inf, b_inf = torch.isinf(a), torch.isinf(b)
    only_a = (w == 0) | (a == b) | (a_inf & ~b_inf)
    only_b = b_inf & ~a_inf & ~only_a
    weight_a = torch.where(only_a, 1.0, torch.where(only_b | (a_inf & b_inf), 0.0, 1 - w))
    weight_b = torch.where(only_a | (a_inf & b_inf), 0.0, torch.where(only_b, 1.0, w))
    grad.scatter_add_(1, at_lower, g * weight_a)
    grad.scatter_add_(1, at_upper, g * weight_b)


class _CombineLogits(torch.autograd.Function):
    """Native forward; the backward is plain torch ops for the winners found (the reference's gradient)."""

    @staticmethod
    def forward(ctx, class_counts, method, gate, *tensors):
        combined, winner = torch.ops.netmerge.combine_logits(list(tensors), class_counts, method, gate)
        ctx.save_for_backward(*tensors, winner)
        ctx.config = (class_counts, method)
        ctx.mark_non_differentiable(winner)
        return combined, winner

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined, _grad_winner):
        *tensors, winner = ctx.saved_tensors
        class_counts, method = ctx.config
        grad = _combine_backward(reference.pack_logits(tensors), class_counts, method, winner, grad_combined)
        return (None, None, None, *_per_input(grad, class_counts, tensors))


def _combine_backward(x, class_counts, method, winner, grad_combined):
    """d loss / d packed logits [B, N], given d loss / d combined logits and each row's winner."""
    g = grad_combined.to(reference.compute_dtype(x))
    if method == "naive":
        return g
    x = x.to(g.dtype)
    E = len(class_counts)
    seg = reference.segment_ids(class_counts, x.device)
    spread = lambda v: v.index_select(1, seg)
    if method in ("ratio", "overall_ratio"):  # out = x / s: d out_j / d x_i = (delta_ij - out_j) / s
        s = spread(reference.segment_sum(x, seg, E)) if method == "ratio" else x.sum(1, keepdim=True)
        weighted = g * x / s
        dot = spread(reference.segment_sum(weighted, seg, E)) if method == "ratio" else weighted.sum(1, keepdim=True)
        return (g - dot) / s
    # Winner takes all: the winner's slots pass their gradient through; the filled slots send theirs to the winner's
    # minimum, shared equally among tied minima.
    in_winner = seg.unsqueeze(0) == winner.unsqueeze(1)
    keep = in_winner | (winner < 0).unsqueeze(1)
    fill = reference.segment_reduce(x, seg, E, "amin").gather(1, winner.clamp_min(0).unsqueeze(1))
    at_min = (in_winner & (x == fill)).to(g.dtype)
    fill_grad = torch.where(keep, 0.0, g).sum(1, keepdim=True)
    return torch.where(keep, g, 0.0) + fill_grad * at_min / at_min.sum(1, keepdim=True).clamp_min(1)


if backends()["cpu"].available:

    @torch.library.register_fake("netmerge::logit_statistics")
    def _logit_statistics_fake(logits, class_counts, stats):
        return logits[0].new_empty((logits[0].shape[0], len(class_counts), len(stats)), dtype=torch.float32)

    @torch.library.register_fake("netmerge::combine_logits")
    def _combine_logits_fake(logits, class_counts, method, gate):
        B = logits[0].shape[0]
        return logits[0].new_empty((B, sum(class_counts))), logits[0].new_empty((B,), dtype=torch.int64)
