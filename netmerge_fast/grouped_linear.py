"""Routed single-layer experts: every token through its k experts ``act(W_e x + b_e)``, weighted and summed.

The one-linear-layer sibling of ``moe_experts`` (whose experts are two-layer MLPs), on the same permutation
(``moe_align``) and the same grouped GEMMs that ``moe_experts``' backward uses: ``grouped_mm`` for the forward and
the input gradient, ``grouped_mm_weight_grad`` for the weight and bias gradients.
"""

from __future__ import annotations

import torch

from netmerge_fast import _checks, reference
from netmerge_fast._backends import resolve
from netmerge_fast.dispatch import _derivative, _kernels

__all__ = ["LINEAR_ACTIVATIONS", "grouped_linear"]

LINEAR_ACTIVATIONS = reference.LINEAR_ACTIVATIONS


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse mixture of single-layer experts::

        out[t] = sum_j topk_weights[t, j] * act(weight[topk_ids[t, j]] @ x[t] + bias[topk_ids[t, j]])

    Args:
        x: ``[T, in]`` float32, float16 or bfloat16 (any strides); float64 on the ``cpu`` and ``torch`` backends
            (for gradcheck).
        weight: ``[E, out, in]``, one ``nn.Linear`` weight per expert, in x's dtype and on its device. Used in
            place, whatever its strides: no call copies it.
        bias: ``[E, out]`` in x's dtype, or ``None``.
        topk_weights: ``[T, k]`` float32 routing weights (or float64), e.g. from ``topk_gating``.
        topk_ids: ``[T, k]`` integer expert ids in ``[0, E)``, or -1 for a slot routed nowhere (it contributes
            nothing).
        activation: applied to each expert's output before the routing weight: ``"none"`` (identity),
            ``"relu"``, ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``.
        backend: ``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1), ``"cpu"`` or ``"torch"``.

    Returns:
        ``[T, out]`` in x's dtype. The expert's linear output is rounded to x's dtype (as an ``nn.Linear`` output
        would be); bias, activation, routing weight and the sum over the k slots are computed in float32.

    Determinism: slots are grouped by expert in increasing slot order and every output row sums its k
    contributions in slot order, without atomics: bit-identical output run to run on one backend and machine.
    No host synchronisation on the GPU path.

    Gradients flow to x, weight, bias and topk_weights on every backend (the fused backends run the backward on
    the same grouped GEMMs). Errors name the argument: shapes that disagree, another dtype or device, ids out of
    ``[-1, E)`` (checked on CPU tensors; on GPU the check would cost a host sync, and ids outside ``[0, E)``
    contribute nothing there), float ids, an unknown activation.

    Example (a top-2 mixture of 8 experts 512 -> 256)::

        weights, ids = topk_gating(gate(x), 2)
        out = grouped_linear(x, expert_weight, expert_bias, weights, ids)   # weight [8, 256, 512]
    """
    _validate(x, weight, bias, topk_weights, topk_ids, activation)
    chosen = resolve("grouped_linear", backend, x.device, x.dtype)
    if chosen == "torch":
        return reference.grouped_linear(x, weight, bias, topk_weights, topk_ids, activation=activation)
    tensors = (x, weight, bias, topk_weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _GroupedLinear.apply(chosen, topk_ids, activation, *tensors)
    return _forward(chosen, x, weight, bias, topk_weights, topk_ids, activation)[0]


def _validate(x, weight, bias, topk_weights, topk_ids, activation) -> None:
    _checks.tensor("x", x, dim=2, floating=True)
    _checks.tensor("weight", weight, dim=3, floating=True)
    _checks.choice("activation", activation, LINEAR_ACTIVATIONS)
    E, out_features, in_features = weight.shape
    if E == 0 or out_features == 0:
        raise ValueError(f"weight must be [E, out, in] with E, out >= 1, got {list(weight.shape)}")
    if in_features != x.shape[1]:
        raise ValueError(f"weight must be [E, out, in={x.shape[1]}] to match x, got {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    _checks.same_device("weight", weight, "x", x)
    if bias is not None:
        _checks.tensor("bias", bias, dim=2, floating=True)
        if tuple(bias.shape) != (E, out_features):
            raise ValueError(f"bias must be [E={E}, out={out_features}], got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        _checks.same_device("bias", bias, "x", x)
    _checks.routing(topk_weights, topk_ids, tokens=x.shape[0], num_experts=E, like=x, like_name="x")


def _slot_layout(kernels, topk_ids, num_experts):
    """Expert-sorted slots: (slot numbers [S] int64, expert_offsets [E+1], which sorted rows are routed [S] bool,
    the expert of each sorted row [S] int64, clamped for the rows routed nowhere)."""
    sorted_ids, offsets = kernels.moe_align(topk_ids, num_experts, 0)[:2]
    rows = torch.arange(sorted_ids.numel(), device=topk_ids.device)
    routed = rows < offsets[-1]
    row_expert = torch.searchsorted(offsets[1:].long(), rows, right=True).clamp(max=num_experts - 1)
    return sorted_ids.long(), offsets, routed, row_expert


def _forward(backend, x, weight, bias, topk_weights, topk_ids, activation):
    """(out, and for the backward: the sorted layout and the expert-sorted linear outputs [S, out] in x's dtype)."""
    kernels = _kernels(backend)
    T, k = topk_ids.shape
    E, out_features = weight.shape[:2]
    acc = reference.compute_dtype(x)
    slot, offsets, routed, row_expert = _slot_layout(kernels, topk_ids, E)
    # weight [E, out, in] seen as [E, in, out]: grouped_mm computes rows @ w[e] from strides, without a copy.
    pre = kernels.grouped_mm(x[slot // k], weight.transpose(1, 2), offsets)
    if bias is not None:
        pre = (pre.to(acc) + bias[row_expert].to(acc)).to(x.dtype)
    # Rows routed nowhere: zero, whatever the GEMM left there (their routing weight is zero too).
    pre = torch.where(routed[:, None], pre, 0)
    row_weight = topk_weights.reshape(-1)[slot].to(acc) * routed
    rows = reference.linear_activation(activation, pre.to(acc)) * row_weight[:, None]
    out = rows.new_zeros(T * k, out_features).index_copy(0, slot, rows).view(T, k, out_features).sum(1)
    return out.to(x.dtype), (slot, offsets, routed, pre)


class _GroupedLinear(torch.autograd.Function):
    """Forward on the chosen backend's kernels; the backward on the same backend's grouped GEMMs, from the saved
    expert-sorted linear outputs (the activation and its derivative are recomputed from them)."""

    @staticmethod
    def forward(ctx, backend, topk_ids, activation, x, weight, bias, topk_weights):
        out, (slot, offsets, routed, pre) = _forward(backend, x, weight, bias, topk_weights, topk_ids, activation)
        ctx.save_for_backward(x, weight, topk_weights, slot, offsets, routed, pre)
        ctx.config = (backend, activation, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, topk_weights, slot, offsets, routed, pre = ctx.saved_tensors
        backend, activation, has_bias = ctx.config
        needs_x, needs_weight, needs_bias, needs_topk_weights = ctx.needs_input_grad[3:]
        kernels = _kernels(backend)
        T, k = topk_weights.shape
        dtype, acc = x.dtype, reference.compute_dtype(x)
        grad_rows = grad_out[slot // k].to(acc) * routed[:, None]
        row_weight = topk_weights.reshape(-1)[slot].to(acc)

        grad_topk_weights = None
        if needs_topk_weights:
            per_row = (grad_rows * reference.linear_activation(activation, pre.to(acc))).sum(-1)
            grad_topk_weights = per_row.new_zeros(T * k).index_copy(0, slot, per_row).view(T, k)
            grad_topk_weights = grad_topk_weights.to(topk_weights.dtype)
        d_pre = (grad_rows * row_weight[:, None] * _linear_derivative(activation, pre.to(acc))).to(dtype)
        grad_weight = kernels.grouped_mm_weight_grad(d_pre, x[slot // k], offsets) if needs_weight else None
        grad_bias = None
        if needs_bias and has_bias:
            grad_bias = kernels.grouped_mm_weight_grad(d_pre.new_ones(d_pre.shape[0], 1), d_pre, offsets)[:, 0]
        grad_x = None
        if needs_x:
            d_rows = kernels.grouped_mm(d_pre, weight, offsets).to(acc)
            grad_x = (
                d_rows.new_zeros(T * k, x.shape[1]).index_copy(0, slot, d_rows).view(T, k, x.shape[1]).sum(1).to(dtype)
            )
        return None, None, None, grad_x, grad_weight, grad_bias, grad_topk_weights


def _linear_derivative(activation: str, pre: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(pre) if activation == "none" else _derivative(activation, pre)
