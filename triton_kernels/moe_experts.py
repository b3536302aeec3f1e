"""Triton moe_experts: grouped GEMMs that read their input rows straight from the tokens, the activation fused
into the first GEMM's epilogue and the routing weight into the second's, and a slot-order combine.

Prefill: moe_align pads every expert's slots to a multiple of BLOCK_M, so each block of rows belongs to one
expert (the vLLM layout); block b reads its expert's weights and gathers its rows by slot id. Decode (few
slots): each (token, expert) slot is its own block, with no alignment pass at all. Both layouts index the
intermediate activation by "work row" (padded row, or slot). The down-projection writes each slot's weighted
output to its own row, and the combine sums every token's k rows in slot order: no atomics, deterministic.

The backward of moe_experts (netmerge_fast/dispatch.py) uses grouped_mm_triton and
grouped_mm_weight_grad_triton on the expert-sorted rows.
"""

import torch
import triton
import triton.language as tl
from netmerge_fast.triton_kernels.moe_align import moe_align_triton

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}
_SWIGLU_OAI_ALPHA = tl.constexpr(1.702)
_SWIGLU_OAI_LIMIT = tl.constexpr(7.0)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _gated(gate, up, ACT: tl.constexpr):
    if ACT == 4:
        g = tl.minimum(gate, _SWIGLU_OAI_LIMIT)
        u = tl.minimum(tl.maximum(up, -_SWIGLU_OAI_LIMIT), _SWIGLU_OAI_LIMIT)
        return (u + 1.0) * g * tl.sigmoid(g * _SWIGLU_OAI_ALPHA)
    else:
        return _activation(gate, ACT) * up


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr):
    """acc [M, N] += a [M, K] @ b [K, N]; tensor cores when M is a full tile, FMAs for a single decode row."""
    if USE_DOT:
        # float32 operands multiply in full precision (no TF32), as torch.matmul does by default.
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return acc + tl.sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), axis=1)


@triton.jit
def _rows_times_weight(
    row_ptrs,
    row_ok,
    K,
    w_ptr,
    stride_wk,
    stride_wn,
    cols,
    col_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] float32 = rows [BLOCK_M, K] (contiguous, starting at row_ptrs) @ w[:K, cols]."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(row_ptrs[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + ks[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = _mma(acc, a, w, USE_DOT)
    return acc


@triton.jit
def _work_rows(
    work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M: tl.constexpr, PER_SLOT: tl.constexpr
):
    """The work rows of block pid_m, their slots, which of them are real, and the block's expert (-1: none)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PER_SLOT:
        slot = rows
        expert = tl.load(ids_ptr + pid_m).to(tl.int32)
        expert = tl.where((expert >= 0) & (expert < E), expert, -1)
    else:
        slot = tl.load(work_slot_ptr + rows)
        expert = tl.load(block_expert_ptr + pid_m)
    return rows.to(tl.int64), slot.to(tl.int64), slot < slots, expert


@triton.jit
def _up_kernel(
    hidden_ptr,
    w_ptr,
    bias_ptr,
    topk_w_ptr,
    ids_ptr,
    work_slot_ptr,
    block_expert_ptr,
    dense_row_ptr,
    act_ptr,
    gate_up_ptr,
    slots,
    top_k,
    E,
    H,
    inter,
    stride_ht,
    stride_hh,
    stride_we,
    stride_wn,
    stride_wh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SLOT: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
    SAVE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, slot, real, expert = _work_rows(work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M, PER_SLOT)
    if expert < 0:
        return
    token = tl.where(real, slot // top_k, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    # Columns of the gate and up halves in the weights' column order: [gate; up], or gate/up interleaved.
    if INTERLEAVED:
        gate_cols = 2 * cols
        up_cols = 2 * cols + 1
    else:
        gate_cols = cols
        up_cols = inter + cols
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    gate_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(
            hidden_ptr + token[:, None] * stride_ht + ks[None, :].to(tl.int64) * stride_hh,
            mask=real[:, None] & k_ok[None, :],
            other=0.0,
        )
        k_offsets = ks[:, None].to(tl.int64) * stride_wh
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate_w = tl.load(w_expert + k_offsets + gate_cols[None, :].to(tl.int64) * stride_wn, mask=w_mask, other=0.0)
        gate_acc = _mma(gate_acc, x, gate_w, not PER_SLOT)
        if GATED:
            up_w = tl.load(w_expert + k_offsets + up_cols[None, :].to(tl.int64) * stride_wn, mask=w_mask, other=0.0)
            up_acc = _mma(up_acc, x, up_w, not PER_SLOT)
    if ON_INPUT:
        # (w x) W^T = w (x W^T): the routing weight scales the accumulator instead of every input element.
        scale = tl.load(topk_w_ptr + slot, mask=real, other=0.0)[:, None]
        gate_acc *= scale
        up_acc *= scale
    out_type = act_ptr.dtype.element_ty
    if HAS_BIAS:
        bias = bias_ptr + expert.to(tl.int64) * (2 * inter if GATED else inter)
        gate_acc += tl.load(bias + gate_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up_acc += tl.load(bias + up_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Round the pre-activation to the input dtype, as an nn.Linear output would be, before activating it.
    gate = gate_acc.to(out_type).to(tl.float32)
    up = up_acc.to(out_type).to(tl.float32)
    out = _gated(gate, up, ACT) if GATED else _activation(gate, ACT)
    store_mask = real[:, None] & col_ok[None, :]
    tl.store(act_ptr + rows[:, None] * inter + cols[None, :], out.to(out_type), mask=store_mask)
    if SAVE:
        dense = tl.load(dense_row_ptr + rows, mask=real, other=0).to(tl.int64)
        width = 2 * inter if GATED else inter
        tl.store(gate_up_ptr + dense[:, None] * width + gate_cols[None, :], gate.to(out_type), mask=store_mask)
        if GATED:
            tl.store(gate_up_ptr + dense[:, None] * width + up_cols[None, :], up.to(out_type), mask=store_mask)


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    bias_ptr,
    topk_w_ptr,
    ids_ptr,
    work_slot_ptr,
    block_expert_ptr,
    y_ptr,
    slots,
    E,
    H,
    inter,
    stride_we,
    stride_wn,
    stride_wi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, slot, real, expert = _work_rows(work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M, PER_SLOT)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    acc = _rows_times_weight(
        act_ptr + rows * inter,
        real,
        inter,
        w_ptr + expert.to(tl.int64) * stride_we,
        stride_wi,
        stride_wn,
        cols,
        col_ok,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        not PER_SLOT,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if not ON_INPUT:
        acc *= tl.load(topk_w_ptr + slot, mask=real, other=0.0)[:, None]
    tl.store(y_ptr + slot[:, None] * H + cols[None, :], acc, mask=real[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, top_k, E, H, BLOCK_H: tl.constexpr):
    """out[t] = sum over t's slots in slot order (slots routed nowhere have no row and are skipped)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in range(top_k):
        slot = t * top_k + j
        expert = tl.load(ids_ptr + slot + 0 * cols)  # as a block: masks must be blocks
        routed = (expert >= 0) & (expert < E)
        acc += tl.load(y_ptr + slot * H + cols, mask=col_ok & routed, other=0.0)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    K,
    N,
    stride_we,
    stride_wk,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[r] = x[r] @ w[e] for the sorted rows r of expert e; one program per (row tile, column tile)."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    rows = tl.load(tile_row_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(offsets_ptr + expert + 1)
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = _rows_times_weight(
        x_ptr + rows * K, row_ok, K, w_expert, stride_wk, stride_wn, cols, col_ok, BLOCK_M, BLOCK_N, BLOCK_K, True
    )
    tl.store(
        out_ptr + rows[:, None] * N + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, offsets_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr
):
    """out[e] = a[rows of e]^T @ b[rows of e]: each program walks its expert's rows in order (deterministic)."""
    expert = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < end
        rs = rs.to(tl.int64)
        a = tl.load(a_ptr + rs[None, :] * M + ms[:, None], mask=r_ok[None, :] & (ms < M)[:, None], other=0.0)
        b = tl.load(b_ptr + rs[:, None] * N + ns[None, :], mask=r_ok[:, None] & (ns < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    out = out_ptr + expert.to(tl.int64) * M * N + ms[:, None].to(tl.int64) * N + ns[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & (ns < N)[None, :])


# Decode when every expert gets about one slot: a GEMM tile of BLOCK_M rows would be mostly padding.
_DECODE_MAX_SLOTS = 64


def launch_config(slots: int, num_experts: int, H: int, inter: int) -> dict:
    """Tile sizes for one call (shared with the compile check in tests): decode path, or BLOCK_M by rows/expert."""
    if slots <= _DECODE_MAX_SLOTS:
        return {"PER_SLOT": True, "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
    rows_per_expert = slots / num_experts
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 48 else 64
    return {"PER_SLOT": False, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}


def _positions(sorted_ids: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: where each slot sits in the expert-sorted order."""
    positions = torch.empty_like(sorted_ids)
    positions[sorted_ids.long()] = torch.arange(sorted_ids.numel(), dtype=sorted_ids.dtype, device=sorted_ids.device)
    return positions


@torch.library.triton_op("netmerge::moe_experts_triton", mutates_args=())
def moe_experts_triton(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    gated: bool,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    apply_weights_on_input: bool,
    save_gate_up: bool,
    gate_up_interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, H = hidden.shape
    E, inter = w_down.shape[0], w_down.shape[2]
    top_k = topk_ids.shape[1]
    slots = T * top_k
    width = w_gate_up.shape[1]
    device = hidden.device
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    config = launch_config(slots, E, H, inter)
    per_slot, block_m = config["PER_SLOT"], config["BLOCK_M"]

    out = torch.empty((T, H), dtype=hidden.dtype, device=device)
    if per_slot and not save_gate_up:
        sorted_ids = torch.empty(0, dtype=torch.int32, device=device)
        offsets = torch.empty(0, dtype=torch.int32, device=device)
    else:
        sorted_ids, offsets, _, _ = moe_align_triton(topk_ids, E, 0)
    gate_up = torch.zeros((slots if save_gate_up else 0, width), dtype=hidden.dtype, device=device)
    if T == 0:
        return out, sorted_ids, offsets, gate_up

    if per_slot:
        work_slot = block_expert = ids  # unused: each slot is its own block
        blocks = slots
        dense_row = _positions(sorted_ids) if save_gate_up else ids
    else:
        work_slot, _, block_expert, _ = moe_align_triton(topk_ids, E, block_m)
        blocks = block_expert.numel()
        dense_row = _positions(sorted_ids)[work_slot.long().clamp(max=slots - 1)] if save_gate_up else ids
    work_rows = blocks * block_m
    act = torch.empty((work_rows, inter), dtype=hidden.dtype, device=device)
    y = torch.empty((slots, H), dtype=torch.float32, device=device)
    tiles = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PER_SLOT")}
    flags = {"HAS_BIAS": False, "ON_INPUT": apply_weights_on_input, "num_warps": config["num_warps"]}

    torch.library.wrap_triton(_up_kernel)[(blocks, triton.cdiv(inter, config["BLOCK_N"]))](
        hidden,
        w_gate_up,
        b_gate_up.contiguous() if b_gate_up is not None else w_gate_up,
        weights,
        ids,
        work_slot,
        block_expert,
        dense_row,
        act,
        gate_up,
        slots,
        top_k,
        E,
        H,
        inter,
        hidden.stride(0),
        hidden.stride(1),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        w_gate_up.stride(2),
        GATED=gated,
        ACT=ACTIVATION_CODES[activation],
        SAVE=save_gate_up,
        INTERLEAVED=gate_up_interleaved,
        **tiles,
        **dict(flags, HAS_BIAS=b_gate_up is not None),
    )
    torch.library.wrap_triton(_down_kernel)[(blocks, triton.cdiv(H, config["BLOCK_N"]))](
        act,
        w_down,
        b_down.contiguous() if b_down is not None else w_down,
        weights,
        ids,
        work_slot,
        block_expert,
        y,
        slots,
        E,
        H,
        inter,
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        **tiles,
        **dict(flags, HAS_BIAS=b_down is not None),
    )
    block_h = min(triton.next_power_of_2(H), 1024)
    torch.library.wrap_triton(_combine_kernel)[(T, triton.cdiv(H, block_h))](y, ids, out, top_k, E, H, BLOCK_H=block_h)
    return out, sorted_ids, offsets, gate_up


_GROUPED_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}


def _row_tiles(offsets: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A static list of row tiles (at most rows/block_m + E), each inside one expert: (expert or -1, first row)."""
    E = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    tile_ends = torch.cumsum((counts + block_m - 1) // block_m, 0)
    tile = torch.arange(triton.cdiv(rows, block_m) + E, device=offsets.device)
    expert = torch.searchsorted(tile_ends, tile, right=True)
    in_use = expert < E
    expert = expert.clamp(max=E - 1)
    first_tile = tile_ends[expert] - (counts[expert] + block_m - 1) // block_m
    row = offsets[:-1].long()[expert] + (tile - first_tile) * block_m
    return torch.where(in_use, expert, -1).to(torch.int32), row.to(torch.int32)


@torch.library.triton_op("netmerge::grouped_mm_triton", mutates_args=())
def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    S, K = x.shape
    N = w.shape[2]
    out = torch.zeros((S, N), dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    tile = _GROUPED_TILE
    tile_expert, tile_row = _row_tiles(expert_offsets, S, tile["BLOCK_M"])
    grid = (tile_expert.numel(), triton.cdiv(N, tile["BLOCK_N"]))
    torch.library.wrap_triton(_grouped_mm_kernel)[grid](
        x.contiguous(), w, out, expert_offsets, tile_expert, tile_row, K, N, w.stride(0), w.stride(1), w.stride(2),
        **tile,
    )  # fmt: skip
    return out


@torch.library.triton_op("netmerge::grouped_mm_weight_grad_triton", mutates_args=())
def grouped_mm_weight_grad_triton(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    E = expert_offsets.numel() - 1
    M, N = a.shape[1], b.shape[1]
    out = torch.empty((E, M, N), dtype=a.dtype, device=a.device)
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    grid = (E, triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    torch.library.wrap_triton(_weight_grad_kernel)[grid](
        a.contiguous(), b.contiguous(), out, expert_offsets, M, N, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=32
    )
    return out
