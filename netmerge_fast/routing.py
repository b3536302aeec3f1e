"""Fused top-k routing for sparse MoE layers, and the router losses used to train them."""

from __future__ import annotations

import functools

import torch

from netmerge_fast import _checks, reference
from netmerge_fast._backends import direct_entry, native_status, resolve
from netmerge_fast.capacity import apply_capacity

__all__ = ["expert_counts", "load_balancing_loss", "router_z_loss", "topk_gating"]

_SCORINGS = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")
_CAPACITY_ORDERS = ("token", "score")
_cpu_kernel = None


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
    backend: str = "auto",
    capacity: int | None = None,
    capacity_order: str = "token",
    replay_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` experts per token and their weights, in one pass over the router logits.

    Args:
        router_logits: ``[T, E]`` float32, float16 or bfloat16 (any strides). float64 is accepted by the
            ``torch`` backend and computed in float64 (for gradcheck).
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` (probabilities over all E experts) or ``"sigmoid"`` (independent scores).
        renormalize: divide the k weights by their sum (plus 1e-20, as DeepSeek-V3; invisible unless the
            chosen mass is ~0). Ignored with ``softmax_after_topk`` (those weights already sum to 1).
        bias: ``[E]`` added to the scores for selection only (DeepSeek-V3 ``e_score_correction_bias``);
            the weights use the unbiased scores. No gradient flows to it.
        num_groups, topk_groups: group-limited routing. The E experts form ``num_groups`` contiguous groups;
            the experts of the best ``topk_groups`` groups are picked first. ``topk_groups=None`` keeps all.
            When those groups hold fewer than k experts (``topk_groups * E / num_groups < k``), the other
            experts fill the remaining slots in index order, weighted by their own (unbiased) scores like
            every slot: transformers' DeepSeek-V3 router masks them to -inf and lets its top-k take them.
        group_score: how a group is scored: ``"max"`` (its best key) or ``"top2_sum"`` (sum of its two best
            keys, DeepSeek-V3).
        softmax_after_topk: rank by raw logits (+ bias) and apply the softmax over the k chosen (GPT-OSS).
        scale: multiplies the final weights (``routed_scaling_factor``).
        backend: ``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1), ``"cpu"`` or ``"torch"``.
        capacity: slots each expert keeps (``None``: dropless). The slots past it are dropped by
            ``apply_capacity`` (id -1, weight 0; the weights are not renormalised after dropping).
        capacity_order: ``"token"`` (earlier slots ``t * k + j`` win, Switch) or ``"score"`` (the higher router
            probability wins, ties to the lower slot; the probability is the slot's softmax or sigmoid score
            before renormalisation and scale, or its weight with ``softmax_after_topk``).
        replay_ids: ``[T, k]`` integer expert ids to use instead of selecting (routing replay): the weights are
            those these experts get with the same scoring, renormalisation and scale, and gradients flow to the
            logits; ``bias`` and the group options take no part (they only select). Ids of -1 get weight 0 and
            no share of the renormalisation; on CPU tensors ids outside ``[-1, E)`` are an error. Computed with
            torch ops on every backend.

    Returns:
        ``(weights [T, k] float32, ids [T, k] int32)``: slots in descending order of selection key (with
        ``replay_ids``: in its order).

    Selection key: the logit itself when there is no bias and groups are scored by ``"max"`` (same order as
    the scores, but exact); otherwise score + bias in float32. Equal keys go to the lower expert index, on
    every backend. Ids in a row are distinct and always in ``[0, E)``.

    Non-finite logits: NaN is treated as -inf, so it is never picked over a finite value and never makes a
    weight NaN. Softmax follows its limit: +inf logits share the mass equally. A row with no finite and no
    +inf logit (all -inf/NaN) has no mass: its slots hold experts in index order (of the allowed groups)
    with weight 0. Sigmoid maps -inf to 0 and +inf to 1.

    Gradients flow to ``router_logits`` through the weights (zero for rows whose max logit is infinite).

    Example (Mixtral)::

        weights, ids = topk_gating(router_logits, 2)
    """
    _validate(
        router_logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, softmax_after_topk, scale
    )
    _checks.choice("capacity_order", capacity_order, _CAPACITY_ORDERS)
    if capacity is not None or replay_ids is not None:
        return _route_for_training(
            router_logits, k, capacity, capacity_order, replay_ids, scoring=scoring, renormalize=renormalize,
            bias=bias, num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
            softmax_after_topk=softmax_after_topk, scale=scale, backend=backend,
        )  # fmt: skip
    topk_groups = num_groups if topk_groups is None else topk_groups
    chosen = resolve("topk_gating", backend, router_logits.device, router_logits.dtype)
    if chosen == "torch":
        return reference.topk_gating(
            router_logits,
            k,
            scoring=scoring,
            renormalize=renormalize,
            bias=bias,
            num_groups=num_groups,
            topk_groups=topk_groups,
            group_score=group_score,
            softmax_after_topk=softmax_after_topk,
            scale=scale,
        )
    args = (k, scoring, renormalize, bias, num_groups, topk_groups, group_score, softmax_after_topk, float(scale))
    if torch.is_grad_enabled() and router_logits.requires_grad:
        return _TopkGating.apply(router_logits, chosen, *args)
    kernel = direct_entry("topk_gating", router_logits, bias) if chosen == "cpu" else None
    return (kernel or _kernel(chosen))(router_logits, *args)


def _validate(
    router_logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, softmax_after_topk, scale
) -> None:
    _checks.tensor("router_logits", router_logits, dim=2, floating=True)
    options = (router_logits.shape[1], k, scoring, renormalize, num_groups, topk_groups, group_score)
    options += (softmax_after_topk, scale)
    # The options of a model's router repeat every call: checked once (per call only what cannot be cached).
    if torch.compiler.is_compiling():
        _validate_options(*options)
    else:
        try:
            hash(options)
        except TypeError:  # an unhashable argument, which no check accepts: the check names it
            _validate_options(*options)
        else:
            _validate_options_cached(*options)
    if bias is not None:
        _checks.tensor("bias", bias, dim=1, floating=True)
        if bias.shape[0] != router_logits.shape[1]:
            raise ValueError(f"bias must have shape [E]=[{router_logits.shape[1]}], got [{bias.shape[0]}]")
        _checks.same_device("bias", bias, "router_logits", router_logits)


def _validate_options(E, k, scoring, renormalize, num_groups, topk_groups, group_score, softmax_after_topk, scale):
    if E == 0:
        raise ValueError("router_logits must have at least one expert column, got shape [T, 0]")
    _checks.integer("k", k, low=1, high=E)
    _checks.choice("scoring", scoring, _SCORINGS)
    _checks.boolean("renormalize", renormalize)
    _checks.integer("num_groups", num_groups, low=1, high=E)
    if E % num_groups:
        raise ValueError(f"num_groups must divide the number of experts E={E}, got {num_groups}")
    group_size = E // num_groups
    if topk_groups is not None:
        _checks.integer("topk_groups", topk_groups, low=1, high=num_groups)
    _checks.choice("group_score", group_score, _GROUP_SCORES)
    if group_score == "top2_sum" and num_groups > 1 and group_size < 2:
        raise ValueError(f"group_score='top2_sum' needs groups of at least 2 experts, got {group_size}")
    _checks.boolean("softmax_after_topk", softmax_after_topk)
    if softmax_after_topk and scoring != "softmax":
        raise ValueError("softmax_after_topk=True needs scoring='softmax'")
    _checks.finite_real("scale", scale)


# typed: True and 1 (or 2 and 2.0) are different cache entries, so k=True still fails its check.
_validate_options_cached = functools.lru_cache(maxsize=256, typed=True)(_validate_options)


def _kernel(backend: str):
    if backend == "cpu":
        global _cpu_kernel
        if _cpu_kernel is None:  # torch.ops' attribute chain costs about half a microsecond per call
            _cpu_kernel = torch.ops.netmerge.topk_gating.default
        return _cpu_kernel
    from netmerge_fast.triton_kernels.topk_gating import topk_gating_triton

    return topk_gating_triton


def _route_for_training(router_logits, k, capacity, capacity_order, replay_ids, **routing):
    """Selection (or replay of ``replay_ids``), then ``apply_capacity``: composed, so every top-k kernel serves."""
    if replay_ids is None:
        weights, ids = topk_gating(router_logits, k, **routing)
    else:
        _validate_replay(replay_ids, router_logits, k)
        weights, ids = reference.topk_weights(router_logits, replay_ids, **_weight_options(routing))
    if capacity is None:
        return weights, ids
    priority = slot_probabilities(router_logits, ids, routing) if capacity_order == "score" else None
    ids, weights = apply_capacity(
        ids, weights, router_logits.shape[1], capacity, capacity_order, routing["backend"], priority=priority
    )
    return weights, ids


def _weight_options(routing: dict) -> dict:
    return {name: routing[name] for name in ("scoring", "renormalize", "softmax_after_topk", "scale")}


def slot_probabilities(router_logits: torch.Tensor, ids: torch.Tensor, routing: dict) -> torch.Tensor:
    """[T, k] float32, no gradient: each slot's router probability (softmax or sigmoid score, before
    renormalisation and scale; the weight with softmax_after_topk), the priority of capacity_order="score"."""
    options = dict(_weight_options(routing), renormalize=False, scale=1.0)
    return reference.topk_weights(router_logits.detach(), ids, **options)[0].float()


def _validate_replay(replay_ids, router_logits, k) -> None:
    _checks.tensor("replay_ids", replay_ids, dim=2, integer=True)
    T, E = router_logits.shape
    if tuple(replay_ids.shape) != (T, k):
        raise ValueError(f"replay_ids must have shape [T, k]=[{T}, {k}], got {list(replay_ids.shape)}")
    _checks.same_device("replay_ids", replay_ids, "router_logits", router_logits)
    # A value check costs a host sync: done for CPU tensors in eager mode only.
    if replay_ids.device.type == "cpu" and replay_ids.numel() and not torch.compiler.is_compiling():
        low, high = (v.item() for v in torch.aminmax(replay_ids))
        if low < -1 or high >= E:
            raise ValueError(f"replay_ids must be in [-1, E={E}) (-1: routed nowhere), got values in [{low}, {high}]")


class _TopkGating(torch.autograd.Function):
    """Fused forward on any backend; the backward is plain torch ops and serves every backend."""

    @staticmethod
    def forward(
        ctx,
        router_logits,
        backend,
        k,
        scoring,
        renormalize,
        bias,
        num_groups,
        topk_groups,
        group_score,
        softmax_after_topk,
        scale,
    ):
        weights, ids = _kernel(backend)(
            router_logits,
            k,
            scoring,
            renormalize,
            bias,
            num_groups,
            topk_groups,
            group_score,
            softmax_after_topk,
            scale,
        )
        ctx.save_for_backward(router_logits, ids)
        ctx.config = (scoring, renormalize, softmax_after_topk, scale)
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        router_logits, ids = ctx.saved_tensors
        grad = _weights_backward(router_logits, ids.long(), grad_weights, *ctx.config)
        return (grad,) + (None,) * 10


def _weights_backward(router_logits, ids, grad_w, scoring, renormalize, softmax_after_topk, scale):
    """d loss / d router_logits, given d loss / d weights and the chosen ids (which carry no gradient)."""
    x = router_logits.float().masked_fill(torch.isnan(router_logits), float("-inf"))
    g = grad_w.float()
    if softmax_after_topk:
        raw = reference.softmax_with_limits(x.gather(1, ids))
    elif scoring == "softmax":
        probs = reference.softmax_with_limits(x)
        raw = probs.gather(1, ids)
    else:
        raw = torch.sigmoid(x.gather(1, ids))

    if renormalize and not softmax_after_topk:
        total = raw.sum(-1, keepdim=True) + reference.RENORM_EPS
        g_raw = scale * (g - (g * raw).sum(-1, keepdim=True) / total) / total
    else:
        g_raw = scale * g

    if softmax_after_topk:
        chosen_max = x.gather(1, ids).amax(-1, keepdim=True)
        g_chosen = raw * (g_raw - (g_raw * raw).sum(-1, keepdim=True))
        g_chosen = torch.where(torch.isfinite(chosen_max), g_chosen, 0.0)
        grad = torch.zeros_like(x).scatter(1, ids, g_chosen)
    elif scoring == "softmax":
        row_max = x.amax(-1, keepdim=True)
        grad = probs * (torch.zeros_like(x).scatter(1, ids, g_raw) - (g_raw * raw).sum(-1, keepdim=True))
        grad = torch.where(torch.isfinite(row_max), grad, 0.0)
    else:
        grad = torch.zeros_like(x).scatter(1, ids, g_raw * raw * (1.0 - raw))
    return grad.to(router_logits.dtype)


if native_status().available:

    @torch.library.register_fake("netmerge::topk_gating")
    def _topk_gating_fake(
        router_logits, k, scoring, renormalize, bias, num_groups, topk_groups, group_score, softmax_after_topk, scale
    ):
        T = router_logits.shape[0]
        return (
            router_logits.new_empty((T, k), dtype=torch.float32),
            router_logits.new_empty((T, k), dtype=torch.int32),
        )


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many token slots each expert received: int64 ``[num_experts]``.

    ``ids`` is any integer tensor of expert ids (typically ``[T, k]``); ids outside ``[0, num_experts)``,
    such as -1 for a slot routed nowhere, are not counted. No host synchronisation.
    """
    _checks.tensor("ids", ids, integer=True)
    _checks.integer("num_experts", num_experts, low=1)
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat.clamp(0, num_experts - 1), valid.long())


def load_balancing_loss(
    router_logits: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer / Mixtral auxiliary loss: ``E * sum_e f_e * P_e`` (float32 scalar; float64 input
    stays float64, as in every loss here).

    ``f_e`` is the fraction of tokens that chose expert e (counted over all k slots, so ``sum_e f_e = k``),
    ``P_e`` the mean softmax probability of expert e. Equals 1 * k for perfectly uniform routing; the
    gradient flows through ``P`` into ``router_logits``. An empty batch gives 0.

    Several layers go in as one batch: their logits (and ids) concatenated along the tokens, as Hugging Face's
    ``load_balancing_loss_func`` concatenates its tuple of layers; the value is then the same as its.

    ``attention_mask``: ``[B, S]`` (any shape with B*S elements), bool, integer or floating, for
    ``router_logits`` of ``L * B * S`` rows (L layers of the same batch, in order): ``f`` and ``P`` then weigh
    each token by its mask value (padding 0), over all layers, exactly as ``load_balancing_loss_func(...,
    attention_mask)``. A mask without any unpadded token gives 0 (Hugging Face's gives NaN, 0/0).
    """
    _checks.tensor("router_logits", router_logits, dim=2, floating=True)
    _checks.tensor("ids", ids, dim=2, integer=True)
    _checks.integer("num_experts", num_experts, low=1)
    if router_logits.shape[1] != num_experts:
        raise ValueError(
            f"router_logits must have num_experts={num_experts} columns, got shape {list(router_logits.shape)}"
        )
    if ids.shape[0] != router_logits.shape[0]:
        raise ValueError(f"ids must have one row per token ({router_logits.shape[0]}), got {ids.shape[0]}")
    T = router_logits.shape[0]
    x = router_logits.to(reference.compute_dtype(router_logits))
    if attention_mask is not None:
        _checks.tensor("attention_mask", attention_mask)
        _checks.same_device("attention_mask", attention_mask, "router_logits", router_logits)
        tokens = attention_mask.numel()
        if tokens == 0 or T % tokens:
            raise ValueError(
                f"attention_mask must have B*S elements with router_logits' rows = layers * B*S, got "
                f"{tokens} mask elements for {T} rows"
            )
    if T == 0:
        return x.sum() * 0.0
    probs = torch.softmax(x, dim=-1)
    if attention_mask is None:
        fraction = expert_counts(ids, num_experts).to(x.dtype) / T
        return num_experts * (fraction * probs.mean(0)).sum()
    # Row t is token t % (B*S) of layer t // (B*S).
    weight = attention_mask.reshape(-1).to(x.dtype).repeat(T // attention_mask.numel())
    total = weight.sum()
    flat = ids.long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = x.new_zeros(num_experts).scatter_add_(
        0, flat.clamp(0, num_experts - 1).reshape(-1), (weight[:, None] * valid).reshape(-1)
    )
    total = torch.where(total > 0, total, 1.0)  # no unpadded token: counts and probabilities are all 0
    return num_experts * (counts * (weight[:, None] * probs).sum(0)).sum() / (total * total)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(router_logits)^2`` (float32 scalar; 0 if empty)."""
    _checks.tensor("router_logits", router_logits, dim=2, floating=True)
    x = router_logits.to(reference.compute_dtype(router_logits))
    if x.shape[0] == 0:
        return x.sum() * 0.0
    return torch.logsumexp(x, dim=-1).square().mean()
