"""Plain-PyTorch reference of every op: the test oracle and the ``torch`` backend.

Written for clarity, not speed: whole-tensor operations, no loops over rows, natural autograd.
Arguments are assumed valid (the public API validates them); semantics are documented on the public ops.
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "softmax_with_limits", "topk_gating"]

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
