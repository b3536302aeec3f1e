"""Grouped expert dispatch for sparse MoE layers: permute the token slots by expert, run every expert's MLP as a
grouped GEMM, and combine the weighted results."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from netmerge_fast import _checks, _torch_grouped, packed_experts, reference
from netmerge_fast._backends import direct_entry, native_status, resolve
from netmerge_fast.packed_experts import PackedExperts

__all__ = ["ACTIVATIONS", "moe_align", "moe_experts"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_size: int | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, ...]:
    """Group the token slots by expert: the permutation every grouped expert GEMM runs on.

    A slot is one (token, choice) pair of ``topk_ids [T, k]``, numbered ``t * k + j``. Within an expert, slots
    keep increasing slot order (stable), so the layout is deterministic. No host synchronisation.

    Args:
        topk_ids: ``[T, k]`` (or any shape) integer expert ids; -1 marks a slot routed nowhere.
        num_experts: E.
        block_size: ``None`` for the dense layout; an int pads every expert's segment to a multiple of it (the
            layout of vLLM's ``moe_align_block_size``, for GEMMs that take one expert per block of rows).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"``.

    Returns:
        Without ``block_size``: ``(sorted_token_ids [T*k] int32, expert_offsets [E+1] int32)``. Expert e's slots
        are ``sorted_token_ids[expert_offsets[e]:expert_offsets[e+1]]``; the slots routed nowhere follow from
        ``expert_offsets[E]`` on, so the whole is a permutation of ``range(T*k)``. The token of slot s is
        ``s // k``.

        With ``block_size``: ``(sorted_token_ids [P] int32, expert_offsets [E+1] int32, block_expert_ids
        [P / block_size] int32, padded_length [1] int32)`` with ``P = T*k + E*(block_size-1)`` (a static bound).
        Expert e's segment starts at a multiple of ``block_size``; padding and the unused tail hold the sentinel
        ``T*k``; ``block_expert_ids[b]`` is the expert of block b (-1 past ``padded_length``). Slots routed
        nowhere do not appear. ``expert_offsets`` is the same dense prefix sum as without ``block_size``.

    Example::

        sorted_token_ids, expert_offsets = moe_align(ids, num_experts=8)
    """
    _checks.tensor("topk_ids", topk_ids, integer=True)
    _checks.integer("num_experts", num_experts, low=1)
    if block_size is not None:
        _checks.integer("block_size", block_size, low=1)
    capacity = topk_ids.numel() + (num_experts * (block_size - 1) if block_size else 0)
    if capacity > _checks.MAX_SLOTS:
        raise ValueError(f"topk_ids has too many slots for int32 positions: {capacity} > {_checks.MAX_SLOTS}")
    chosen = resolve("moe_align", backend, topk_ids.device, torch.float32)
    if chosen == "torch":
        return reference.moe_align(topk_ids, num_experts, block_size)
    outs = _kernels(chosen).moe_align(topk_ids, num_experts, block_size or 0)
    return tuple(outs) if block_size else tuple(outs[:2])


def moe_experts(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor | PackedExperts,
    w_down: torch.Tensor | None,
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
    backend: str = "auto",
) -> torch.Tensor:
    """Run every token through its k experts and sum the weighted results: the expert half of a sparse MoE layer.

    Expert e is the MLP ``down(act(gate(x)) * up(x))`` (``gated=True``) or ``down(act(up(x)))``, with the
    weights in the layout of Hugging Face transformers 5 and vLLM (nn.Linear rows)::

        out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])

    Args:
        hidden: ``[T, H]`` float32, float16 or bfloat16 (any strides); float64 on the ``cpu`` and ``torch``
            backends (for gradcheck).
        w_gate_up: ``[E, 2I, H]``, gate rows first then up rows (``[E, I, H]`` of up rows when not gated);
            ``[E, H, 2I]`` with ``transposed=True``.
        w_down: ``[E, H, I]`` (``[E, I, H]`` with ``transposed=True``). Both weights in hidden's dtype and on
            its device, any strides.
            Or ``w_gate_up`` a ``PackedExperts`` (``pack_experts``: packed once, any layout, optionally int8) and
            ``w_down`` ``None``: inference only (``NotImplementedError`` if a gradient is needed), on the ``cpu``
            backend (``torch`` unpacks them); ``gated`` and hidden's dtype and H must match what was packed.
        topk_weights: ``[T, k]`` float32 routing weights (float64 with float64 hidden).
        topk_ids: ``[T, k]`` integer expert ids in ``[0, E)``, or -1 for a slot routed nowhere (it contributes
            nothing, e.g. an expert on another rank).
        activation: ``"silu"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"``, or ``"swiglu_oai"`` (GPT-OSS,
            gated only): ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 * g)`` with ``g = min(gate, 7)``.
        gated: whether ``w_gate_up`` holds gate and up rows.
        b_gate_up: optional ``[E, 2I]`` (``[E, I]``) bias of the first projection; b_down: optional ``[E, H]``.
        apply_weights_on_input: scale each token's input by its routing weight instead of the expert's output
            (Llama-4 style; the same for linear experts, not for others).
        transposed: the weights are stored as the transpose of the nn.Linear layout, ``x @ w`` instead of
            ``x @ w^T`` (GPT-OSS). They are read as they are, by strides, on every backend: no copy.
        gate_up_interleaved: gate and up are interleaved along the 2I axis of ``w_gate_up`` and ``b_gate_up``
            (gate = even, up = odd; GPT-OSS) instead of concatenated. Needs ``gated=True``.
            GPT-OSS's experts go in as they are: ``transposed=True, gate_up_interleaved=True,
            activation="swiglu_oai"`` with their biases.
        backend: ``"auto"``, ``"triton"`` (CUDA; CPU under TRITON_INTERPRET=1), ``"cpu"`` or ``"torch"``.

    Returns:
        ``[T, H]`` in hidden's dtype.

    Determinism: slots are grouped by expert in increasing slot order and every output row sums its k
    contributions in slot order in float32, without atomics: the same input gives bit-identical output on the
    same backend and machine. The intermediate activation is rounded to hidden's dtype, as in nn.Linear (on the
    triton backend each slot's weighted output too, before the float32 sum).

    Gradients flow to hidden, both weights, both biases and topk_weights on every backend (one backward, built
    from each backend's grouped GEMMs), in the layout the weights were given in. Errors name the argument:
    mismatched weight shapes, ids out of ``[-1, E)`` (checked on CPU tensors; on GPU the check would cost a host
    sync, and ids outside ``[0, E)`` contribute nothing there), weights and ids of different shapes, float ids.

    Example (Mixtral)::

        weights, ids = topk_gating(router_logits, 2)
        out = moe_experts(hidden, w_gate_up, w_down, weights, ids)
    """
    if isinstance(w_gate_up, PackedExperts):
        if transposed or gate_up_interleaved:
            raise ValueError("transposed and gate_up_interleaved describe weight tensors: pass them to pack_experts")
        return packed_experts.run(
            hidden, w_gate_up, w_down, topk_weights, topk_ids, activation=activation, gated=gated,
            b_gate_up=b_gate_up, b_down=b_down, apply_weights_on_input=apply_weights_on_input, backend=backend,
        )  # fmt: skip
    _checks.boolean("apply_weights_on_input", apply_weights_on_input)
    _checks.boolean("transposed", transposed)
    _checks.boolean("gate_up_interleaved", gate_up_interleaved)
    _validate(
        hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, transposed,
        gate_up_interleaved,
    )  # fmt: skip
    return run_validated(
        hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down,
        apply_weights_on_input, backend, transposed, gate_up_interleaved,
    )  # fmt: skip


def run_validated(
    hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, apply_weights_on_input,
    backend, transposed=False, gate_up_interleaved=False,
):  # fmt: skip
    """``moe_experts`` after its checks. For callers that check once what stays fixed (the weights, at set-up) and
    pass ids that are valid by construction (a router's top-k), so a decode step does not pay the checks each
    layer (integrations.hf); the native kernel still checks the id range on CPU. Takes ``(PackedExperts, None)``
    for the weights too."""
    if isinstance(w_gate_up, PackedExperts):
        return packed_experts.run_validated(
            hidden, w_gate_up, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, apply_weights_on_input,
            backend,
        )  # fmt: skip
    chosen = resolve("moe_experts", backend, hidden.device, hidden.dtype)
    if chosen == "torch":
        # On a GPU the reference's loop over experts would sync E times: torch's grouped GEMM instead.
        grouped = hidden.device.type == "cuda" and _torch_grouped.supports(
            hidden, *_linear_layout(w_gate_up, w_down, transposed)
        )
        return (_torch_grouped.moe_experts if grouped else reference.moe_experts)(
            hidden,
            w_gate_up,
            w_down,
            topk_weights,
            topk_ids,
            activation=activation,
            gated=gated,
            b_gate_up=b_gate_up,
            b_down=b_down,
            apply_weights_on_input=apply_weights_on_input,
            transposed=transposed,
            gate_up_interleaved=gate_up_interleaved,
        )
    tensors = (hidden, w_gate_up, w_down, topk_weights, b_gate_up, b_down)
    config = (activation, gated, apply_weights_on_input, transposed, gate_up_interleaved)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _MoeExperts.apply(chosen, topk_ids, *config, *tensors)
    w_gate_up, w_down = _linear_layout(w_gate_up, w_down, transposed)
    direct = direct_entry("moe_experts", *tensors, topk_ids) if chosen == "cpu" else None
    return (direct or _kernels(chosen).moe_experts)(
        hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down,
        apply_weights_on_input, False, gate_up_interleaved,
    )[0]  # fmt: skip


def _linear_layout(w_gate_up, w_down, transposed):
    """The weights as nn.Linear-shaped views ([E, out, in]): the kernels read either layout by strides."""
    return (w_gate_up.transpose(1, 2), w_down.transpose(1, 2)) if transposed else (w_gate_up, w_down)


def _validate(
    hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, transposed=False,
    gate_up_interleaved=False,
) -> None:  # fmt: skip
    _checks.tensor("hidden", hidden, dim=2, floating=True)
    _checks.tensor("w_gate_up", w_gate_up, dim=3, floating=True)
    _checks.tensor("w_down", w_down, dim=3, floating=True)
    _validate_activation(activation, gated)
    if gate_up_interleaved and not gated:
        raise ValueError("gate_up_interleaved=True needs gated=True")
    H = hidden.shape[1]
    gate_up, down = _linear_layout(w_gate_up, w_down, transposed)
    E, inter = down.shape[0], down.shape[2]
    width = 2 * inter if gated else inter
    what = "2I" if gated else "I"
    layout = " (transposed=True)" if transposed else ""
    if E == 0 or inter == 0:
        expected = "[E, I, H]" if transposed else "[E, H, I]"
        raise ValueError(f"w_down must be {expected} with E, I >= 1{layout}, got {list(w_down.shape)}")
    if down.shape[1] != H:
        expected = f"[E, I, H={H}]" if transposed else f"[E, H={H}, I]"
        raise ValueError(f"w_down must be {expected}{layout}, got {list(w_down.shape)}")
    if tuple(gate_up.shape) != (E, width, H):
        expected = f"[E={E}, H={H}, {what}={width}]" if transposed else f"[E={E}, {what}={width}, H={H}]"
        raise ValueError(
            f"w_gate_up must be {expected}{layout} to match w_down {list(w_down.shape)} and hidden, "
            f"got {list(w_gate_up.shape)}"
        )
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        _checks.same_device(name, t, "hidden", hidden)
    _validate_routing_and_biases(hidden, E, width, topk_weights, topk_ids, b_gate_up, b_down)


def _validate_activation(activation, gated) -> None:
    _checks.choice("activation", activation, ACTIVATIONS)
    _checks.boolean("gated", gated)
    if activation == "swiglu_oai" and not gated:
        raise ValueError("activation='swiglu_oai' needs gated=True")


def _validate_routing_and_biases(
    hidden, E, width, topk_weights, topk_ids, b_gate_up, b_down, check_values=True
) -> None:  # fmt: skip
    """The checks of a call on E experts of first-projection width ``width`` (the weights' own are done)."""
    T, H = hidden.shape
    # A value check costs a host sync: done for CPU tensors in eager mode (the C++ kernel checks again).
    _checks.routing(
        topk_weights, topk_ids, tokens=T, num_experts=E, like=hidden, like_name="hidden", check_values=check_values
    )
    for name, bias, shape in (("b_gate_up", b_gate_up, (E, width)), ("b_down", b_down, (E, H))):
        if bias is None:
            continue
        _checks.tensor(name, bias, dim=2, floating=True)
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be [{', '.join(map(str, shape))}], got {list(bias.shape)}")
        _checks.same_device(name, bias, "hidden", hidden)


class _Kernels(NamedTuple):
    """A backend's four primitives; the autograd Function below is written once against them."""

    moe_align: Any
    moe_experts: Any
    grouped_mm: Any
    grouped_mm_weight_grad: Any


def _kernels(backend: str) -> _Kernels:
    if backend == "cpu":
        ops = torch.ops.netmerge
        return _Kernels(
            moe_align=ops.moe_align.default,
            moe_experts=ops.moe_experts.default,
            grouped_mm=ops.grouped_mm.default,
            grouped_mm_weight_grad=ops.grouped_mm_weight_grad.default,
        )
    from netmerge_fast.triton_kernels import moe_experts as triton_moe
    from netmerge_fast.triton_kernels.moe_align import moe_align_triton

    return _Kernels(
        moe_align=moe_align_triton,
        moe_experts=triton_moe.moe_experts_triton,
        grouped_mm=triton_moe.grouped_mm_triton,
        grouped_mm_weight_grad=triton_moe.grouped_mm_weight_grad_triton,
    )


class _MoeExperts(torch.autograd.Function):
    """Fused forward on any backend; the backward runs on the same backend's grouped GEMMs.

    The forward keeps the expert-sorted pre-activation ``gate_up`` [T*k, 2I]; the backward recomputes the
    activation from it and never needs the expert outputs: d/d(weight) of a slot is <d(act), act> with the
    unweighted d(act) that the down-projection backward computes anyway.
    """

    @staticmethod
    def forward(
        ctx,
        backend,
        topk_ids,
        activation,
        gated,
        apply_weights_on_input,
        transposed,
        interleaved,
        hidden,
        w_gate_up,
        w_down,
        topk_weights,
        b_gate_up,
        b_down,
    ):
        out, sorted_ids, offsets, gate_up = _kernels(backend).moe_experts(
            hidden, *_linear_layout(w_gate_up, w_down, transposed), topk_weights, topk_ids, activation, gated,
            b_gate_up, b_down, apply_weights_on_input, True, interleaved,
        )  # fmt: skip
        ctx.save_for_backward(hidden, w_gate_up, w_down, topk_weights, b_down, sorted_ids, offsets, gate_up)
        has_b_gate_up = b_gate_up is not None
        ctx.config = (backend, activation, gated, apply_weights_on_input, has_b_gate_up, transposed, interleaved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, w_gate_up, w_down, topk_weights, b_down, sorted_ids, offsets, gate_up = ctx.saved_tensors
        backend, activation, gated, on_input, has_b_gate_up, transposed, interleaved = ctx.config
        needs = ctx.needs_input_grad[7:]
        grads = _experts_backward(
            _kernels(backend), grad_out, hidden, w_gate_up, w_down, topk_weights, b_down, sorted_ids, offsets,
            gate_up, activation, gated, on_input, has_b_gate_up, needs, transposed, interleaved,
        )  # fmt: skip
        return (None,) * 7 + grads


def _experts_backward(
    kernels,
    grad_out,
    hidden,
    w_gate_up,
    w_down,
    topk_weights,
    b_down,
    sorted_ids,
    offsets,
    gate_up,
    activation,
    gated,
    on_input,
    has_b_gate_up,
    needs,
    transposed=False,
    interleaved=False,
):
    """Gradients (hidden, w_gate_up, w_down, topk_weights, b_gate_up, b_down) from the saved expert-sorted state,
    the weights' in their own layout (``transposed``); ``gate_up`` and its gradient keep the weights' column order.

    Rows are the T*k slots in expert order; rows from expert_offsets[E] on are slots routed nowhere and are
    masked to zero so they contribute nothing (no host sync to find where they start).
    """
    w_gate_up, w_down = _linear_layout(w_gate_up, w_down, transposed)
    # d(x @ W^T)/dW is a^T @ b in the nn.Linear layout; its transpose b^T @ a for weights stored transposed.
    weight_grad = (lambda a, b: kernels.grouped_mm_weight_grad(b, a, offsets)) if transposed else (
        lambda a, b: kernels.grouped_mm_weight_grad(a, b, offsets)
    )  # fmt: skip
    T, H = hidden.shape
    k = topk_weights.shape[1]
    S = T * k
    dtype, acc = hidden.dtype, reference.compute_dtype(hidden)
    slot = sorted_ids.long()
    token = slot // k
    valid = torch.arange(S, device=hidden.device) < offsets[-1]
    row_weight = topk_weights.reshape(-1)[slot].to(acc) * valid
    grad_rows = grad_out[token] * valid[:, None].to(dtype)

    # Down projection: d(act) before the routing weight, then the weight's share.
    d_act_unweighted = kernels.grouped_mm(grad_rows, w_down, offsets).to(acc)
    act = _activate(gate_up.to(acc), activation, gated, interleaved)
    grad_w = None
    if on_input:
        d_act, grad_y = d_act_unweighted, grad_rows
    else:
        d_act = d_act_unweighted * row_weight[:, None]
        grad_y = (grad_rows.to(acc) * row_weight[:, None]).to(dtype)
        grad_w = (d_act_unweighted * act).sum(-1)
        if b_down is not None:
            row_expert = torch.searchsorted(offsets[1:].long(), torch.arange(S, device=hidden.device), right=True)
            grad_w = grad_w + (grad_rows.to(acc) * b_down[row_expert.clamp(max=b_down.shape[0] - 1)].to(acc)).sum(-1)
    ones = torch.ones(S, 1, dtype=dtype, device=hidden.device)
    grad_w_down = weight_grad(grad_y, act.to(dtype)) if needs[2] else None
    grad_b_down = kernels.grouped_mm_weight_grad(ones, grad_y, offsets)[:, 0] if needs[5] else None

    # Activation and first projection.
    d_pre = _activation_backward(gate_up.to(acc), d_act, activation, gated, interleaved).to(dtype)
    x_rows = hidden[token]
    if on_input:
        x_rows = (x_rows.to(acc) * row_weight[:, None]).to(dtype)
    grad_w_gate_up = weight_grad(d_pre, x_rows) if needs[1] else None
    grad_b_gate_up = kernels.grouped_mm_weight_grad(ones, d_pre, offsets)[:, 0] if needs[4] and has_b_gate_up else None
    grad_hidden = None
    if needs[0] or (on_input and needs[3]):
        d_x = kernels.grouped_mm(d_pre, w_gate_up, offsets).to(acc)
        if on_input:
            grad_w = (d_x * hidden[token].to(acc)).sum(-1) * valid
            d_x = d_x * row_weight[:, None]
        grad_hidden = d_x.new_zeros(S, H).index_copy(0, slot, d_x).view(T, k, H).sum(1).to(dtype)
    grad_topk_weights = None
    if needs[3] and grad_w is not None:
        grad_topk_weights = (grad_w * valid).new_zeros(S).index_copy(0, slot, grad_w * valid)
        grad_topk_weights = grad_topk_weights.view(T, k).to(topk_weights.dtype)
    return grad_hidden, grad_w_gate_up, grad_w_down, grad_topk_weights, grad_b_gate_up, grad_b_down


def _activate(pre: torch.Tensor, activation: str, gated: bool, interleaved: bool) -> torch.Tensor:
    if not gated:
        return reference.elementwise_activation(activation, pre)
    return reference.gated_activation(activation, *reference.split_gate_up(pre, interleaved))


def _derivative(activation: str, x: torch.Tensor) -> torch.Tensor:
    """d act / dx of the element-wise activations, in closed form (traceable, no autograd inside backward)."""
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return (x > 0).to(x.dtype)  # relu


def _activation_backward(
    pre: torch.Tensor, d_act: torch.Tensor, activation: str, gated: bool, interleaved: bool
) -> torch.Tensor:
    if not gated:
        return d_act * _derivative(activation, pre)
    gate, up = reference.split_gate_up(pre, interleaved)
    if activation == "swiglu_oai":
        limit, alpha = reference.SWIGLU_OAI_LIMIT, reference.SWIGLU_OAI_ALPHA
        g = gate.clamp(max=limit)
        s = torch.sigmoid(alpha * g)
        glu = g * s
        d_gate = d_act * (up.clamp(-limit, limit) + 1) * (s + alpha * g * s * (1 - s)) * (gate <= limit)
        d_up = d_act * glu * ((up >= -limit) & (up <= limit))
    else:
        d_gate = d_act * up * _derivative(activation, gate)
        d_up = d_act * reference.elementwise_activation(activation, gate)
    return torch.stack([d_gate, d_up], dim=2).flatten(1) if interleaved else torch.cat([d_gate, d_up], dim=1)


if native_status().available:

    @torch.library.register_fake("netmerge::moe_align")
    def _moe_align_fake(topk_ids, num_experts, block_size):
        slots = topk_ids.numel()
        capacity = slots + num_experts * (block_size - 1) if block_size else slots
        blocks = capacity // block_size if block_size else 0
        new = lambda n: topk_ids.new_empty((n,), dtype=torch.int32)
        return new(capacity), new(num_experts + 1), new(blocks), new(1 if block_size else 0)

    @torch.library.register_fake("netmerge::moe_experts")
    def _moe_experts_fake(
        hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, on_input, save,
        gate_up_interleaved=False,
    ):  # fmt: skip
        slots = topk_ids.numel()
        return (
            torch.empty_like(hidden, memory_format=torch.contiguous_format),
            hidden.new_empty((slots,), dtype=torch.int32),
            hidden.new_empty((w_gate_up.shape[0] + 1,), dtype=torch.int32),
            hidden.new_empty((slots if save else 0, w_gate_up.shape[1])),
        )

    @torch.library.register_fake("netmerge::grouped_mm")
    def _grouped_mm_fake(x, w, expert_offsets):
        return x.new_empty((x.shape[0], w.shape[2]))

    @torch.library.register_fake("netmerge::grouped_mm_weight_grad")
    def _grouped_mm_weight_grad_fake(a, b, expert_offsets):
        return a.new_empty((expert_offsets.shape[0] - 1, a.shape[1], b.shape[1]))
