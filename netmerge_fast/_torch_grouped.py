"""The torch backend's moe_experts for CUDA tensors: plain PyTorch around torch's grouped GEMM, free of host syncs.

reference.moe_experts loops over the experts with ``nonzero``: E host synchronisations per layer on a GPU. This
path sorts the slots by expert (a stable sort), finds each expert's rows with ``searchsorted``, and runs both
projections as ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` before torch 2.10): no sync, graph
capturable where torch's grouped GEMM is (its fast kernels; torch's own fallback for other dtypes and older GPUs
copies the offsets to the host once per GEMM). Same semantics as the reference: the pre-activation rounded to
hidden's dtype, float32 activation and routing weight, every token's k results summed in slot order in float32.
Differentiable through torch's own grouped GEMM backward.
"""

from __future__ import annotations

import torch

from netmerge_fast import reference

__all__ = ["grouped_mm_function", "moe_experts", "supports"]


def grouped_mm_function():
    """torch's grouped GEMM, or None where this torch has none."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned_operand(t: torch.Tensor) -> bool:
    """torch's grouped GEMM takes operands whose base and non-unit strides are multiples of 16 bytes, with one of
    the two matrix dimensions contiguous."""
    size = t.element_size()
    matrix = t.stride()[-2:]
    return (
        t.storage_offset() * size % 16 == 0  # allocations themselves are aligned
        and 1 in matrix
        and all(s * size % 16 == 0 for s in t.stride() if s != 1)
        and all(n > 0 for n in t.shape)
    )


def supports(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether this path serves these inputs: a grouped GEMM exists, float32/float16/bfloat16, shapes and strides
    it accepts (dimensions whose bytes are multiples of 16), at least one token."""
    if grouped_mm_function() is None or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    size = hidden.element_size()
    inter = w_down.shape[2]
    dims = (hidden.shape[1], w_gate_up.shape[1], inter)
    return (
        hidden.shape[0] > 0
        and all(d * size % 16 == 0 for d in dims)
        and _aligned_operand(w_gate_up.transpose(1, 2))
        and _aligned_operand(w_down.transpose(1, 2))
    )


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
    """moe_experts (see netmerge_fast.moe_experts) on torch's grouped GEMM; inputs as ``supports`` accepts (in the
    nn.Linear layout; ``transposed`` weights are passed to it as their transposes)."""
    grouped_mm = grouped_mm_function()
    if transposed:  # nn.Linear-shaped views [E, out, in]: the GEMM reads either layout by strides
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    T, k = topk_ids.shape
    E = w_down.shape[0]
    dtype = hidden.dtype
    flat = topk_ids.reshape(-1).long()
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)  # slots routed nowhere sort last
    order = torch.sort(bucket, stable=True).indices
    sorted_bucket = bucket[order]
    # End of each expert's rows; rows past the last end (routed nowhere) are left unwritten by the GEMMs.
    ends = torch.searchsorted(sorted_bucket, torch.arange(E, device=flat.device), right=True).to(torch.int32)
    valid = (sorted_bucket < E)[:, None]
    row_expert = sorted_bucket.clamp(max=E - 1)
    weight = topk_weights.reshape(-1)[order].float()[:, None]

    def rows_bias(bias):  # torch.where, not a product: the unwritten rows may hold NaN
        return torch.where(valid, bias[row_expert].float(), 0)

    x = hidden[order // k]
    if apply_weights_on_input:
        x = (x.float() * weight).to(dtype)
    # Zeroing the rows routed nowhere also zeroes their (unwritten) rows of the GEMM's input gradient.
    x = x.masked_fill(~valid, 0)
    pre = grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)
    if b_gate_up is not None:
        pre = (pre.float() + rows_bias(b_gate_up)).to(dtype)
    pre = pre.float()
    if gated:
        act = reference.gated_activation(activation, *reference.split_gate_up(pre, gate_up_interleaved))
    else:
        act = reference.elementwise_activation(activation, pre)
    y = grouped_mm(act.to(dtype), w_down.transpose(1, 2), offs=ends).float()
    if b_down is not None:
        y = y + rows_bias(b_down)
    y = torch.where(valid, y, 0)
    if not apply_weights_on_input:
        y = y * weight
    out = y.new_zeros(y.shape).index_copy(0, order, y)
    return out.view(T, k, -1).sum(1).to(dtype)
