"""Plain-PyTorch reference of every op: the test oracle and the ``torch`` backend.

Written for clarity, not speed: whole-tensor operations, no loops over rows, natural autograd.
Arguments are assumed valid (the public API validates them); semantics are documented on the public ops.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "apply_capacity",
    "combine_logits",
    "combine_with_winner",
    "compute_dtype",
    "grouped_linear",
    "logit_statistics",
    "moe_align",
    "moe_experts",
    "softmax_with_limits",
    "topk_gating",
    "topk_weights",
]

RENORM_EPS = 1e-20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(torch.isnan(x), float("-inf"))


def softmax_with_limits(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax that follows its limit at infinities and never returns NaN (for NaN-free input).

    +inf entries share the mass equally (the rest get 0); a slice with nothing but -inf has no mass (all 0).
    Gradients are those of the ordinary softmax on finite slices and 0 on slices whose maximum is infinite.
    """
    m = x.detach().amax(dim, keepdim=True)
    finite = torch.isfinite(m)
    e = torch.exp(torch.where(finite, x - torch.where(finite, m, 0.0), 0.0))
    e = torch.where(m == float("inf"), (x == float("inf")).to(x.dtype), e)
    e = torch.where(m == float("-inf"), 0.0, e)
    total = e.sum(dim, keepdim=True)
    return e / torch.where(total > 0, total, 1.0)


def _stable_descending_order(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by descending key, equal keys by increasing index."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def topk_gating(
    router_logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int | None = None,
    group_score: str = "max",
    softmax_after_topk: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _nan_to_neg_inf(router_logits.to(compute_dtype(router_logits)))
    T, E = x.shape
    top2_sum = group_score == "top2_sum" and num_groups > 1

    if softmax_after_topk:
        scores = x
    elif scoring == "softmax":
        scores = softmax_with_limits(x)
    else:
        scores = torch.sigmoid(x)

    # Without a bias (and without top-2 group sums) the ranking by score is the ranking by logit; using the
    # logit keeps it exact, free of rounding collisions between nearly equal probabilities.
    if bias is None and (softmax_after_topk or not top2_sum):
        key = x.detach()
    else:
        key = scores.detach() if bias is None else scores.detach() + bias.to(x.dtype)
    key = _nan_to_neg_inf(key)

    allowed = torch.ones_like(key, dtype=torch.bool)
    if num_groups > 1:
        grouped = key.view(T, num_groups, E // num_groups)
        group_key = _nan_to_neg_inf(grouped.topk(2, dim=-1).values.sum(-1) if top2_sum else grouped.amax(-1))
        best_groups = _stable_descending_order(group_key)[:, : topk_groups or num_groups]
        group_allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=x.device).scatter(1, best_groups, True)
        allowed = group_allowed.repeat_interleave(E // num_groups, dim=1)

    # Rank the allowed experts by key (ties to the lower index), then the disallowed ones behind them in index
    # order: they fill the slots left when the allowed groups hold fewer than k experts.
    order = _stable_descending_order(key.masked_fill(~allowed, float("-inf")))
    order = order.gather(1, _stable_descending_order(allowed.gather(1, order).to(torch.int8)))
    ids = order[:, :k]

    if softmax_after_topk:
        weights = softmax_with_limits(x.gather(1, ids))
    else:
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    return weights * scale, ids.to(torch.int32)


def priority_key(priority: torch.Tensor) -> torch.Tensor:
    """float32 priorities as ``apply_capacity`` compares them: NaN counts as -inf and -0.0 as +0.0."""
    p = _nan_to_neg_inf(priority.float())
    return torch.where(p == 0, 0.0, p)


def apply_capacity(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    order: str = "token",
    priority: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, weights, dropped [E] int64): in every group of ``group_size`` tokens (None: one group), each expert
    keeps its first ``capacity`` slots in the given order."""
    T, k = topk_ids.shape
    E = num_experts
    flat = topk_ids.reshape(-1).long()
    slots = flat.numel()
    routed = (flat >= 0) & (flat < E)
    # One bucket per (group, expert), and one per group for the slots routed nowhere.
    group = torch.arange(slots, device=flat.device) // k // (group_size or max(T, 1))
    bucket = group * (E + 1) + torch.where(routed, flat, E)
    if order == "token":
        by_bucket = torch.sort(bucket, stable=True).indices
    else:
        # Highest priority first, equal priorities by slot; then grouped by bucket, keeping that order.
        by_priority = torch.sort(priority_key(priority).reshape(-1), descending=True, stable=True).indices
        by_bucket = by_priority[torch.sort(bucket[by_priority], stable=True).indices]
    groups = -(-T // (group_size or max(T, 1)))
    counts = torch.zeros(groups * (E + 1), dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(flat).scatter_(
        0, by_bucket, torch.arange(slots, device=flat.device) - starts[bucket[by_bucket]]
    )
    drop = (routed & (rank >= capacity)).view(topk_ids.shape)
    dropped = (counts.view(groups, E + 1)[:, :E] - capacity).clamp_min(0).sum(0)
    return topk_ids.masked_fill(drop, -1), topk_weights.masked_fill(drop, 0), dropped


def topk_weights(
    router_logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    softmax_after_topk: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights ``topk_gating`` gives the experts ``ids [T, k]`` (routing replay): the same scores,
    renormalisation and scale. Slots with an id outside ``[0, E)`` (-1) get weight 0, take no part in the
    renormalisation and come back as -1. Returns (weights, int32 ids)."""
    x = _nan_to_neg_inf(router_logits.to(compute_dtype(router_logits)))
    ids = ids.long()
    routed = (ids >= 0) & (ids < x.shape[1])
    safe = ids.clamp(0, x.shape[1] - 1)
    if softmax_after_topk:
        weights = softmax_with_limits(x.gather(1, safe).masked_fill(~routed, float("-inf")))
    else:
        scores = softmax_with_limits(x) if scoring == "softmax" else torch.sigmoid(x)
        weights = scores.gather(1, safe) * routed
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    return weights * scale, torch.where(routed, ids, -1).to(torch.int32)


# GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate): alpha and limit as in its config.
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


def elementwise_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activation of a non-gated expert, or of the gate half of a gated one (not ``swiglu_oai``)."""
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def gated_activation(name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up; for ``swiglu_oai``: (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g) with g = min(gate, 7)."""
    if name == "swiglu_oai":
        g = gate.clamp(max=SWIGLU_OAI_LIMIT)
        u = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return (u + 1) * g * torch.sigmoid(g * SWIGLU_OAI_ALPHA)
    return elementwise_activation(name, gate) * up


def split_gate_up(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of the first projection's output [..., 2I]: concatenated, or interleaved (GPT-OSS)."""
    if interleaved:
        return h[..., 0::2], h[..., 1::2]
    inter = h.shape[-1] // 2
    return h[..., :inter], h[..., inter:]


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_size: int | None = None) -> tuple[torch.Tensor, ...]:
    flat = topk_ids.reshape(-1).long()
    slots = flat.numel()
    # Slots routed nowhere (id -1) sort behind every expert, as if they went to expert E.
    expert = torch.where(flat < 0, num_experts, flat)
    order = torch.sort(expert, stable=True).indices
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    if block_size is None:
        return order.to(torch.int32), offsets
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_starts = torch.cat([counts.new_zeros(1), padded_counts.cumsum(0)])
    capacity = slots + num_experts * (block_size - 1)
    sorted_ids = torch.full((capacity,), slots, dtype=torch.int64, device=flat.device)
    valid = expert < num_experts
    sorted_expert = expert[order][: valid.sum()]
    rank = torch.arange(sorted_expert.numel(), device=flat.device) - offsets[sorted_expert].long()
    sorted_ids[padded_starts[sorted_expert] + rank] = order[: sorted_expert.numel()]
    block_expert = torch.full((capacity // block_size,), -1, dtype=torch.int64, device=flat.device)
    blocks = torch.arange(block_expert.numel(), device=flat.device) * block_size
    in_use = blocks < padded_starts[-1]
    owner = torch.searchsorted(padded_starts[1:], blocks, right=True)
    block_expert = torch.where(in_use, owner, block_expert)
    padded_length = padded_starts[-1:].to(torch.int32)
    return sorted_ids.to(torch.int32), offsets, block_expert.to(torch.int32), padded_length


def moe_experts(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    gated: bool = True,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    apply_weights_on_input: bool = False,
    transposed: bool = False,
    gate_up_interleaved: bool = False,
) -> torch.Tensor:
    if transposed:  # x @ w instead of x @ w^T: the nn.Linear layout is the transposed view
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    dtype = compute_dtype(hidden)
    T, k = topk_ids.shape
    x = hidden.to(dtype)
    weights = topk_weights.to(dtype)
    per_slot = x.new_zeros(T, k, x.shape[1])
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        w = weights[token, slot, None]
        rows = x[token] * w if apply_weights_on_input else x[token]
        h = rows @ w_gate_up[e].to(dtype).T
        if b_gate_up is not None:
            h = h + b_gate_up[e].to(dtype)
        a = (
            gated_activation(activation, *split_gate_up(h, gate_up_interleaved))
            if gated
            else elementwise_activation(activation, h)
        )
        y = a @ w_down[e].to(dtype).T
        if b_down is not None:
            y = y + b_down[e].to(dtype)
        per_slot = per_slot.index_put((token, slot), y if apply_weights_on_input else y * w)
    if per_slot.grad_fn is None and torch.is_grad_enabled():
        # Nothing was routed (T = 0, or every id -1): the output is still a function of the inputs, with zero
        # gradients, as on the fused backends.
        inputs = (hidden, w_gate_up, w_down, topk_weights, b_gate_up, b_down)
        per_slot = per_slot + sum(0.0 * t.sum() for t in inputs if t is not None and t.requires_grad)
    return per_slot.sum(1).to(hidden.dtype)


# ---- logit statistics and combining (netmerge_fast.combine) ----------------------------------------------------------

STATISTICS = (
    "mean",
    "std",
    "var",
    "min",
    "max",
    "sum",
    "median",
    "q1",
    "q3",
    "range",
    "entropy",
    "max_prob",
    "margin",
    "logsumexp",
)
# Which statistic each selecting method ranks experts by, and whether the lowest value wins.
SELECTION_CRITERIA = {
    "std": ("std", True),
    "range": ("range", False),
    "third_quartile": ("max_minus_q3", False),
    "max_prob": ("max_prob", False),
    "entropy": ("entropy", True),
    "margin": ("margin", False),
    "energy": ("logsumexp", False),
}
_QUARTERS = {"q1": 1, "median": 2, "q3": 3}


def pack_logits(logits: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One [B, sum C_i] tensor from the packed tensor or the list of per-expert tensors."""
    return torch.cat(list(logits), dim=1) if isinstance(logits, list | tuple) else logits


def _per_layout(fn):
    """Memoises a function of (class_counts, ..., device) that builds index tensors: a host-to-device copy in
    every forward and backward would block the host, and is illegal while a CUDA graph is being captured (warm
    up before capturing). Built outside inference mode, so that autograd may save them later."""

    @functools.lru_cache(maxsize=256)
    def cached(class_counts: tuple[int, ...], *args):
        with torch.inference_mode(False):
            return fn(list(class_counts), *args)

    @functools.wraps(fn)
    def wrapper(class_counts, *args):
        if torch.compiler.is_compiling():  # a compiled graph holds them as constants
            return fn(list(class_counts), *args)
        return cached(tuple(class_counts), *args)

    return wrapper


@_per_layout
def class_count_tensor(class_counts: list[int], device: torch.device) -> torch.Tensor:
    """int64 [E]: the class counts on ``device`` (made once per layout and device)."""
    return torch.tensor(class_counts, dtype=torch.int64, device=device)


@_per_layout
def segment_ids(class_counts: list[int], device: torch.device) -> torch.Tensor:
    """int64 [sum C_i]: the expert that owns each column of the packed logits."""
    counts = class_count_tensor(class_counts, device)
    # output_size keeps the size static under torch.compile
    return torch.repeat_interleave(
        torch.arange(len(class_counts), device=device), counts, output_size=sum(class_counts)
    )


def segment_sum(v: torch.Tensor, seg: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[B, E] sums of the columns of ``v`` [B, N] owned by each expert."""
    return v.new_zeros(v.shape[0], num_experts).index_add(1, seg, v)


def segment_reduce(v: torch.Tensor, seg: torch.Tensor, num_experts: int, reduce: str) -> torch.Tensor:
    """[B, E] ``reduce`` ("amax", "amin") of the columns of ``v`` [B, N] owned by each expert; the gradient is
    shared equally among tied extremes."""
    # NaN where the values land: with include_self=False autograd still counts `self` entries equal to the result
    # among the ties it shares the gradient with, and NaN equals nothing.
    out = v.new_full((v.shape[0], num_experts), float("nan"))
    return out.scatter_reduce(1, seg.expand_as(v), v, reduce, include_self=False)


def segment_order(x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Column indices [B, N] that sort each row by (expert, value); equal values keep their column order."""
    by_value = torch.sort(x.detach(), dim=1, stable=True).indices
    by_expert = torch.sort(seg[by_value], dim=1, stable=True).indices
    return by_value.gather(1, by_expert)


@_per_layout
def quantile_positions(class_counts: list[int], quarters: int, device: torch.device):
    """Sorted positions (in the packed row) of the order statistics around q = quarters / 4 of every expert,
    and the interpolation weight: (lower [E] int64, upper [E] int64, weight [E] float32). As torch.quantile:
    position q * (C - 1), linear interpolation between its floor and ceil (computed in integers, exactly)."""
    counts = class_count_tensor(class_counts, device)
    offsets = torch.cumsum(counts, 0) - counts
    scaled = quarters * (counts - 1)
    lower = offsets + scaled // 4
    weight = (scaled % 4).float() / 4
    return lower, lower + (weight > 0).long(), weight


def lerp_with_limits(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch.lerp(a, b, w) for a <= b, except: a when w == 0 or a == b; the infinite end when exactly one end is
    infinite (the limit); NaN between -inf and +inf."""
    interp = torch.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))
    a_inf, b_inf = torch.isinf(a), torch.isinf(b)
    ends = torch.where(a_inf & b_inf, torch.full_like(a, float("nan")), torch.where(a_inf, a, b))
    return torch.where((w == 0) | (a == b), a, torch.where(a_inf | b_inf, ends, interp))


def _statistics(x: torch.Tensor, class_counts: list[int], names: tuple[str, ...]) -> torch.Tensor:
    """[B, E, len(names)] statistics of the packed logits ``x`` (already in the compute dtype)."""
    E = len(class_counts)
    seg = segment_ids(class_counts, x.device)
    n = class_count_tensor(class_counts, x.device).to(x.dtype)
    spread = lambda v: v.index_select(1, seg)  # [B, E] -> [B, N]

    hi = segment_reduce(x, seg, E, "amax")
    lo = segment_reduce(x, seg, E, "amin")
    constant = lo == hi
    total = segment_sum(x, seg, E)
    mean = torch.where(constant, lo, total / n)
    nan = float("nan")
    values = {"sum": total, "mean": mean, "min": lo, "max": hi}
    values["range"] = torch.where(constant, 0.0, hi - lo)

    if {"var", "std"} & set(names):
        m2 = segment_sum((x - spread(mean)).square(), seg, E)
        var = torch.where(n == 1, nan, torch.where(constant, 0.0, m2 / (n - 1).clamp_min(1)))
        values["var"] = var
        values["std"] = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), var)

    if {"entropy", "max_prob", "logsumexp"} & set(names):
        # Softmax in its limits: shift by the (detached) max; an infinite max keeps only the entries equal to it
        # (+inf: they share the mass; all -inf: uniform, the limit of equal logits).
        m = hi.detach()
        finite = torch.isfinite(m)
        e = torch.where(
            spread(finite), torch.exp(x - spread(torch.where(finite, m, 0.0))), (x == spread(m)).to(x.dtype)
        )
        z = segment_sum(e, seg, E)
        p = e / spread(z)
        values["logsumexp"] = m + torch.log(z)
        values["max_prob"] = segment_reduce(p, seg, E, "amax")
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
        values["entropy"] = -segment_sum(plogp, seg, E)

    if "margin" in names:
        # The two largest values as a multiset: a repeated maximum gives margin 0; a single class, always +inf.
        repeats = segment_sum((x == spread(hi)).to(x.dtype), seg, E)
        below_max = torch.where(x < spread(hi), x, float("-inf"))
        second = torch.where(repeats > 1, hi, segment_reduce(below_max, seg, E, "amax"))
        values["margin"] = torch.where(n == 1, float("inf"), torch.where(hi == second, 0.0, hi - second))

    wanted_quarters = {_QUARTERS[s] for s in names if s in _QUARTERS} | ({3} if "max_minus_q3" in names else set())
    if wanted_quarters:
        ordered = x.gather(1, segment_order(x, seg))
        for quarters in wanted_quarters:
            lower, upper, w = quantile_positions(class_counts, quarters, x.device)
            q = lerp_with_limits(ordered[:, lower], ordered[:, upper], w.to(x.dtype))
            values[{1: "q1", 2: "median", 3: "q3"}[quarters]] = q
        if "max_minus_q3" in names:
            values["max_minus_q3"] = torch.where(hi == values["q3"], 0.0, hi - values["q3"])

    has_nan = segment_sum(torch.isnan(x).to(x.dtype), seg, E) > 0
    out = torch.stack([values[s] for s in names], dim=-1)
    return torch.where(has_nan.unsqueeze(-1), nan, out)


def logit_statistics(
    logits: torch.Tensor | list[torch.Tensor],
    class_counts: list[int],
    *,
    stats: tuple[str, ...] = ("mean", "std", "max"),
) -> torch.Tensor:
    x = pack_logits(logits)
    return _statistics(x.to(compute_dtype(x)), class_counts, tuple(stats))


def select_expert(criterion: torch.Tensor, lower_wins: bool) -> torch.Tensor:
    """int64 [B]: per row, the expert with the best criterion (ties: lower index; NaN never wins; -1 if all NaN)."""
    key = -criterion if lower_wins else criterion
    valid = ~torch.isnan(key)
    best = torch.where(valid, key, float("-inf")).amax(1, keepdim=True)
    candidate = valid & (key == best)
    return torch.where(candidate.any(1), candidate.int().argmax(1), -1)


def select_by_gate(gate: torch.Tensor) -> torch.Tensor:
    """int64 [B]: argmax of float scores (as select_expert, in float32), or for a boolean claims mask the only
    claiming expert (-1 where none or several claim)."""
    if gate.dtype == torch.bool:
        return torch.where(gate.sum(1) == 1, gate.int().argmax(1), -1)
    return select_expert(gate.float(), lower_wins=False)


def combine_with_winner(
    logits: torch.Tensor | list[torch.Tensor], class_counts: list[int], method: str, winner: torch.Tensor | None
) -> torch.Tensor:
    """The combined logits [B, sum C_i] (input dtype) given each row's winner (for the selecting methods).

    Winner takes all: the winner's logits in its own slots, its minimum logit everywhere else; rows with winner -1
    are the plain concatenation. Differentiable in the logits (the winner carries no gradient).
    """
    x = pack_logits(logits)
    if method == "naive":
        return x.clone()
    seg = segment_ids(class_counts, x.device)
    E = len(class_counts)
    if method in ("ratio", "overall_ratio"):
        xc = x.to(compute_dtype(x))
        total = segment_sum(xc, seg, E).index_select(1, seg) if method == "ratio" else xc.sum(1, keepdim=True)
        return (xc / total).to(x.dtype)
    assert winner is not None
    chosen = winner.clamp_min(0).unsqueeze(1)
    fill = segment_reduce(x, seg, E, "amin").gather(1, chosen)
    keep = (seg.unsqueeze(0) == chosen) | (winner < 0).unsqueeze(1)
    return torch.where(keep, x, fill)


def combine_logits(
    logits: torch.Tensor | list[torch.Tensor],
    class_counts: list[int],
    *,
    method: str = "naive",
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined [B, sum C_i] in the input dtype, winner [B] int64, -1 where no single expert was selected)."""
    x = pack_logits(logits)
    B = x.shape[0]
    if method == "gate":
        winner = select_by_gate(gate)
    elif method in SELECTION_CRITERIA:
        name, lower_wins = SELECTION_CRITERIA[method]
        criterion = _statistics(x.detach().to(compute_dtype(x)), class_counts, (name,))[..., 0]
        winner = select_expert(criterion, lower_wins)
    else:
        winner = torch.full((B,), -1, dtype=torch.int64, device=x.device)
    return combine_with_winner(x, class_counts, method, winner), winner


# Activations of grouped_linear's single-layer experts: "none" (identity) and the element-wise ones.
LINEAR_ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")


def linear_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return x if name == "none" else elementwise_activation(name, x)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "relu",
) -> torch.Tensor:
    dtype = compute_dtype(x)
    T, k = topk_ids.shape
    per_slot = x.new_zeros(T, k, weight.shape[1], dtype=dtype)
    for e in range(weight.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        y = x[token].to(dtype) @ weight[e].to(dtype).T
        if bias is not None:
            y = y + bias[e].to(dtype)
        y = linear_activation(activation, y) * topk_weights[token, slot, None].to(dtype)
        per_slot = per_slot.index_put((token, slot), y)
    if per_slot.grad_fn is None and torch.is_grad_enabled():
        # Nothing was routed: the output is still a function of the inputs, with zero gradients.
        inputs = (x, weight, bias, topk_weights)
        per_slot = per_slot + sum(0.0 * t.sum() for t in inputs if t is not None and t.requires_grad)
    return per_slot.sum(1).to(x.dtype)
