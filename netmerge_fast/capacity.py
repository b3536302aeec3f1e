"""Expert capacity and token dropping (Switch Transformers / GShard): each expert takes at most ``capacity`` slots."""

from __future__ import annotations

import math

import torch

from netmerge_fast import _checks, reference
from netmerge_fast._backends import native_status, resolve

__all__ = ["apply_capacity", "expert_capacity"]

_ORDERS = ("token", "score")
_MAX_SLOTS = 2**31 - 1  # slot numbers are int32 in the kernels


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """``ceil(capacity_factor * num_tokens * top_k / num_experts)`` (Switch / GShard), computed as written in
    float64; ``None`` or ``0`` gives ``None`` (dropless).

    Example: 1024 tokens, top-2 of 8 experts, factor 1.25 -> 320 slots per expert.
    """
    if capacity_factor is None or capacity_factor == 0:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    order: str = "token",
    backend: str = "auto",
    *,
    priority: torch.Tensor | None = None,
    group_size: int | None = None,
    return_dropped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` slots per expert; the others are routed nowhere (id -1, weight 0).

    A slot is one (token, choice) pair of ``topk_ids [T, k]``, numbered ``s = t * k + j``. Among the slots routed
    to expert e, the first ``capacity`` in the given order are kept:

    - ``order="token"`` (Switch Transformers): in slot order, so earlier tokens win (and a token's first choice
      comes before its second).
    - ``order="score"`` (GShard's / V-MoE's batch-prioritised routing): highest ``priority`` first, equal
      priorities to the lower slot. The priority defaults to ``topk_weights``; ``topk_gating(..., capacity=)``
      passes the router probability of each slot. Priorities are compared in float32, NaN as -inf.

    With ``group_size``, the tokens form consecutive groups of ``group_size`` rows (the last may be shorter) and
    the capacity holds in each group on its own: Switch Transformers' per-sequence capacity is
    ``group_size=sequence_length`` on ``[batch * sequence, k]``, GShard's groups likewise.

    The weights are not renormalised after dropping (as Switch and GShard). Slots that already had an id outside
    ``[0, E)`` (-1: routed nowhere) are left as they are and do not count. Deterministic, the same answer on
    every backend, no host synchronisation on GPU.

    Args:
        topk_ids: ``[T, k]`` int32 or int64 expert ids (-1: routed nowhere), e.g. from ``topk_gating``.
        topk_weights: ``[T, k]`` floating routing weights.
        num_experts: E.
        capacity: slots each expert keeps, ``>= 0`` (``expert_capacity`` computes Switch's).
        order: ``"token"`` or ``"score"``.
        backend: ``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1), ``"cpu"`` or ``"torch"``.
        priority: ``[T, k]`` floating, for ``order="score"`` only (default: ``topk_weights``).
        group_size: tokens per capacity group, ``>= 1`` (``None``: all T tokens are one group).
        return_dropped: also return the number of slots each expert dropped (summed over the groups).

    Returns:
        ``(ids, weights)`` with the dtypes of the inputs (dropped slots: id -1, weight 0), plus
        ``dropped [E] int64`` with ``return_dropped``. Gradients flow to ``topk_weights`` through the kept slots.

    Errors: ``TypeError``/``ValueError`` naming the argument for wrong ranks, shapes, dtypes or devices, a
    negative capacity, an unknown order, a priority with ``order="token"``, and (checked on CPU tensors only:
    on GPU it would cost a host sync) ids outside ``[-1, E)``.

    Example (Switch Transformers, capacity factor 1.25)::

        weights, ids = topk_gating(router_logits, 1)
        ids, weights = apply_capacity(ids, weights, E, expert_capacity(T, 1, E, 1.25))
        out = moe_experts(hidden, w_gate_up, w_down, weights, ids)    # dropped tokens get 0
    """
    _validate(topk_ids, topk_weights, num_experts, capacity, order, priority)
    if group_size is not None:
        _checks.integer("group_size", group_size, low=1)
    _checks.boolean("return_dropped", return_dropped)
    if order == "score" and priority is None:
        priority = topk_weights
    chosen = resolve("apply_capacity", backend, topk_ids.device, topk_weights.dtype)
    if chosen == "torch":
        ids, weights, dropped = reference.apply_capacity(
            topk_ids, topk_weights, num_experts, capacity, order, priority.detach() if priority is not None else None,
            group_size,
        )  # fmt: skip
    else:
        # Capacities and groups past the sizes change nothing; clamping keeps them in the kernels' int64.
        capacity = min(capacity, topk_ids.numel())
        group_size = max(1, min(group_size or topk_ids.shape[0], topk_ids.shape[0]))
        ids, dropped = _kernel(chosen)(
            topk_ids, priority.detach() if priority is not None else None, num_experts, capacity, order, group_size
        )
        weights = topk_weights.masked_fill(ids != topk_ids, 0)
    return (ids, weights, dropped) if return_dropped else (ids, weights)


def _validate(topk_ids, topk_weights, num_experts, capacity, order, priority) -> None:
    _checks.tensor("topk_ids", topk_ids, dim=2, integer=True)
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be an int32 or int64 tensor, got {topk_ids.dtype}")
    _checks.tensor("topk_weights", topk_weights, dim=2, floating=True)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {list(topk_ids.shape)}, got {list(topk_weights.shape)}"
        )
    _checks.same_device("topk_weights", topk_weights, "topk_ids", topk_ids)
    _checks.integer("num_experts", num_experts, low=1)
    _checks.integer("capacity", capacity, low=0)
    _checks.choice("order", order, _ORDERS)
    if priority is not None:
        if order != "score":
            raise ValueError("priority is only used with order='score'")
        _checks.tensor("priority", priority, dim=2, floating=True)
        if priority.shape != topk_ids.shape:
            raise ValueError(f"priority must have topk_ids' shape {list(topk_ids.shape)}, got {list(priority.shape)}")
        _checks.same_device("priority", priority, "topk_ids", topk_ids)
    if topk_ids.numel() > _MAX_SLOTS:
        raise ValueError(f"T * k must be below 2^31, got {topk_ids.numel()}")
    # A value check costs a host sync: done for CPU tensors in eager mode only.
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        low, high = (v.item() for v in torch.aminmax(topk_ids))
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"topk_ids must be in [-1, E={num_experts}) (-1: routed nowhere), got values in [{low}, {high}]"
            )


def _kernel(backend: str):
    if backend == "cpu":
        return torch.ops.netmerge.apply_capacity.default
    from netmerge_fast.triton_kernels.apply_capacity import apply_capacity_triton

    return apply_capacity_triton


if native_status().available:

    @torch.library.register_fake("netmerge::apply_capacity")
    def _apply_capacity_fake(topk_ids, priority, num_experts, capacity, order, group_size):
        return torch.empty_like(topk_ids, memory_format=torch.contiguous_format), topk_ids.new_empty(
            (num_experts,), dtype=torch.int64
        )
