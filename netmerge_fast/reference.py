"""Plain-PyTorch reference of every op: the test oracle and the ``torch`` backend.

Written for clarity, not speed: whole-tensor operations, no loops over rows, natural autograd.
Arguments are assumed valid (the public API validates them); semantics are documented on the public ops.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "moe_align", "moe_experts", "softmax_with_limits", "topk_gating"]

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

    # Rank by key (ties to the lower index), then move every disallowed expert behind the allowed ones.
    order = _stable_descending_order(key)
    order = order.gather(1, _stable_descending_order(allowed.gather(1, order).to(torch.int8)))
    ids = order[:, :k]

    if softmax_after_topk:
        weights = softmax_with_limits(x.gather(1, ids))
    else:
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + RENORM_EPS)
    return weights * scale, ids.to(torch.int32)


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
) -> torch.Tensor:
    dtype = compute_dtype(hidden)
    T, k = topk_ids.shape
    x = hidden.to(dtype)
    weights = topk_weights.to(dtype)
    inter = w_down.shape[2]
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
        a = gated_activation(activation, h[:, :inter], h[:, inter:]) if gated else elementwise_activation(activation, h)
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
