"""Triton moe_experts: grouped GEMMs that read their input rows straight from the tokens, the activation fused
into the first GEMM's epilogue and the routing weight into the second's, and a slot-order combine.

Two layouts, by the number of slots (token, expert pairs):

  per slot   slots <= E (decode: about one slot per expert): each slot is its own program, a [1, K] row
             against its expert's weight tiles on FMAs; no alignment pass at all.
  aligned    otherwise: moe_align pads every expert's slots to a multiple of BLOCK_M, so each block of rows
             belongs to one expert (the vLLM layout); tl.dot tiles with BLOCK_M from 16 rows, in grouped
             (swizzled) program order so that consecutive programs share weight tiles in L2.

Tiles come from moe_configs (a per-device table, or a default by rows per expert). When a GEMM's grid would
leave SMs idle, its K loop is split: partial sums go to a float32 buffer and are reduced in a fixed order (the
first GEMM's by a small epilogue kernel, the second's by the combine), so results stay deterministic. An
EVEN_K specialisation drops the K masks when BLOCK_K divides K.

The down-projection writes each slot's weighted output to its own row, in hidden's dtype, and the combine sums
every token's k rows in slot order in float32: no atomics. Above CHUNK_TOKENS tokens (inference), the call runs
chunk by chunk so its intermediates stay bounded: [chunk * k, H] outputs and [chunk * k, I] activations.

The backward of moe_experts (netmerge_fast/dispatch.py) uses grouped_mm_triton and
grouped_mm_weight_grad_triton on the expert-sorted rows.
"""

import torch
import triton
import triton.language as tl
from netmerge_fast.triton_kernels import moe_configs
from netmerge_fast.triton_kernels.moe_align import align

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}
_SWIGLU_OAI_ALPHA = tl.constexpr(1.702)
_SWIGLU_OAI_LIMIT = tl.constexpr(7.0)
# Tokens per chunk of an inference call: bounds the [T*k, H] and [T*k, I] intermediates (Qwen3-30B-A3B in
# bfloat16: 256 MB and 100 MB per chunk instead of 512 MB and 200 MB at 16k tokens).
CHUNK_TOKENS = 8192


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
    """acc [M, N] += a [M, K] @ b [K, N]; tensor cores for row tiles, FMAs for a single (per-slot) row."""
    if USE_DOT:
        # float32 operands multiply in full precision (no TF32), as torch.matmul does by default.
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return acc + tl.sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), axis=1)


@triton.jit
def _tile(pid, blocks_m, blocks_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program pid: GROUP_M row blocks walk each column block in turn, so programs
    running together read the same weight tile (one expert's, when the rows are one expert's)."""
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's share [start, end) of the K loop: whole BLOCK_K steps, split SPLIT_K ways."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    start = tl.program_id(1) * per_split
    return start, tl.minimum(start + per_split, K)


@triton.jit
def _k_mask(ks, k_end, EVEN_K: tl.constexpr):
    """Which of ks are inside the K loop; a constant without a ragged end, so loads along K vectorise."""
    if EVEN_K:
        return tl.full(ks.shape, True, tl.int1)
    else:
        return ks < k_end


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
def _gate_up_columns(cols, inter, INTERLEAVED: tl.constexpr):
    """Where the gate and up halves of output columns `cols` sit among the first GEMM's 2I outputs: [gate; up],
    or interleaved (gate even, up odd; GPT-OSS)."""
    if INTERLEAVED:
        return 2 * cols, 2 * cols + 1
    else:
        return cols, inter + cols


@triton.jit
def _up_epilogue(
    gate_acc,
    up_acc,
    rows,
    slot,
    real,
    expert,
    cols,
    col_ok,
    bias_ptr,
    topk_w_ptr,
    position_ptr,
    act_ptr,
    gate_up_ptr,
    inter,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
    SAVE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Routing weight (on input), bias, rounding, activation; stores act and (SAVE) the pre-activation."""
    gate_cols, up_cols = _gate_up_columns(cols, inter, INTERLEAVED)
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
        dense = tl.load(position_ptr + slot, mask=real, other=0).to(tl.int64)
        width = 2 * inter if GATED else inter
        tl.store(gate_up_ptr + dense[:, None] * width + gate_cols[None, :], gate.to(out_type), mask=store_mask)
        if GATED:
            tl.store(gate_up_ptr + dense[:, None] * width + up_cols[None, :], up.to(out_type), mask=store_mask)


@triton.jit
def _up_kernel(
    hidden_ptr,
    w_ptr,
    bias_ptr,
    topk_w_ptr,
    ids_ptr,
    work_slot_ptr,
    block_expert_ptr,
    position_ptr,
    act_ptr,
    gate_up_ptr,
    partial_ptr,
    slots,
    top_k,
    E,
    H,
    inter,
    blocks_m,
    work_rows,
    stride_ht,
    stride_hh,
    stride_we,
    stride_wn,
    stride_wh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PER_SLOT: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
    SAVE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), blocks_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    rows, slot, real, expert = _work_rows(work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M, PER_SLOT)
    if expert < 0:
        return
    token = tl.where(real, slot // top_k, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    gate_cols, up_cols = _gate_up_columns(cols, inter, INTERLEAVED)
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    x_rows = hidden_ptr + token[:, None] * stride_ht
    gate_w = w_expert + gate_cols[None, :].to(tl.int64) * stride_wn
    up_w = w_expert + up_cols[None, :].to(tl.int64) * stride_wn
    gate_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start, k_end = _k_range(H, BLOCK_K, SPLIT_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = _k_mask(ks, k_end, EVEN_K)
        x = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_hh, mask=real[:, None] & k_ok[None, :], other=0.0)
        k_offsets = ks[:, None].to(tl.int64) * stride_wh
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate_acc = _mma(gate_acc, x, tl.load(gate_w + k_offsets, mask=w_mask, other=0.0), not PER_SLOT)
        if GATED:
            up_acc = _mma(up_acc, x, tl.load(up_w + k_offsets, mask=w_mask, other=0.0), not PER_SLOT)
    if SPLIT_K == 1:
        _up_epilogue(gate_acc, up_acc, rows, slot, real, expert, cols, col_ok, bias_ptr, topk_w_ptr, position_ptr,
                     act_ptr, gate_up_ptr, inter, GATED, ACT, HAS_BIAS, ON_INPUT, SAVE, INTERLEAVED)  # fmt: skip
    else:
        # Partial sums [SPLIT_K, work_rows, 2I] float32 (gate columns, then up), finished by _up_finish_kernel.
        width = 2 * inter if GATED else inter
        part = partial_ptr + (tl.program_id(1) * work_rows + rows[:, None]) * width + cols[None, :]
        tl.store(part, gate_acc, mask=real[:, None] & col_ok[None, :])
        if GATED:
            tl.store(part + inter, up_acc, mask=real[:, None] & col_ok[None, :])


@triton.jit
def _up_finish_kernel(
    partial_ptr,
    bias_ptr,
    topk_w_ptr,
    ids_ptr,
    work_slot_ptr,
    block_expert_ptr,
    position_ptr,
    act_ptr,
    gate_up_ptr,
    slots,
    E,
    inter,
    blocks_m,
    work_rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PER_SLOT: tl.constexpr,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
    SAVE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """The split first GEMM's partial sums, added in split order, then the same epilogue as without splits."""
    pid_m, pid_n = _tile(tl.program_id(0), blocks_m, tl.cdiv(inter, BLOCK_N), 1)
    rows, slot, real, expert = _work_rows(work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M, PER_SLOT)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    width = 2 * inter if GATED else inter
    mask = real[:, None] & col_ok[None, :]
    gate_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in tl.static_range(SPLIT_K):
        part = partial_ptr + (split * work_rows + rows[:, None]) * width + cols[None, :]
        gate_acc += tl.load(part, mask=mask, other=0.0)
        if GATED:
            up_acc += tl.load(part + inter, mask=mask, other=0.0)
    _up_epilogue(gate_acc, up_acc, rows, slot, real, expert, cols, col_ok, bias_ptr, topk_w_ptr, position_ptr,
                 act_ptr, gate_up_ptr, inter, GATED, ACT, HAS_BIAS, ON_INPUT, SAVE, INTERLEAVED)  # fmt: skip


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
    blocks_m,
    stride_we,
    stride_wn,
    stride_wi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PER_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ON_INPUT: tl.constexpr,
):
    """y[split, slot] = (act[row] @ w_down[e]^T (+ bias on split 0)) * routing weight, one row per slot."""
    pid_m, pid_n = _tile(tl.program_id(0), blocks_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    rows, slot, real, expert = _work_rows(work_slot_ptr, block_expert_ptr, ids_ptr, pid_m, slots, E, BLOCK_M, PER_SLOT)
    if expert < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    a_rows = act_ptr + rows[:, None] * inter
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start, k_end = _k_range(inter, BLOCK_K, SPLIT_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = _k_mask(ks, k_end, EVEN_K)
        a = tl.load(a_rows + ks[None, :], mask=real[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wi, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(acc, a, w, not PER_SLOT)
    if HAS_BIAS:  # added once: by the first split
        bias = tl.load(bias_ptr + expert.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(tl.program_id(1) == 0, bias, 0.0)[None, :]
    if not ON_INPUT:
        acc *= tl.load(topk_w_ptr + slot, mask=real, other=0.0)[:, None]
    y = y_ptr + (tl.program_id(1) * slots + slot[:, None]) * H + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, ids_ptr, out_ptr, slots, top_k, E, H, BLOCK_H: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[t] = sum over t's slots in slot order, each slot's splits in split order, in float32 (slots routed
    nowhere have no row and are skipped)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in range(top_k):
        slot = t * top_k + j
        expert = tl.load(ids_ptr + slot + 0 * cols)  # as a block: masks must be blocks
        routed = (expert >= 0) & (expert < E)
        for split in tl.static_range(SPLIT_K):
            y = y_ptr + (split * slots + slot) * H + cols
            acc += tl.load(y, mask=col_ok & routed, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def launch_config(
    slots: int,
    num_experts: int,
    H: int,
    inter: int,
    *,
    gated: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
) -> dict:
    """The layout and tiles of one call: {"PER_SLOT", "BLOCK_M", "up": {...}, "down": {...}}, each GEMM's tiles
    with its SPLIT_K and EVEN_K (shared with the benchmarks and the compile check)."""
    device = device if device is not None else torch.device("cpu")
    capability, sm_count = moe_configs.device_properties(device)
    width = 2 * inter if gated else inter
    per_slot = slots <= num_experts
    if per_slot:
        config = {
            "BLOCK_M": 1,
            "up": moe_configs.decode_tiles(inter, H, dtype),
            "down": moe_configs.decode_tiles(H, inter, dtype),
        }
        row_blocks = slots
    else:
        rows_per_expert = slots / num_experts
        table = moe_configs.lookup(num_experts, width, H, dtype, capability, rows_per_expert)
        config = table or moe_configs.default_config(rows_per_expert, width, H, H, dtype, capability, gated)
        # Blocks that hold rows: one partly filled per expert that has any, the others full.
        row_blocks = min(num_experts, slots) + slots // config["BLOCK_M"]
    config = {
        "PER_SLOT": per_slot,
        "BLOCK_M": config["BLOCK_M"],
        "up": dict(config["up"]),
        "down": dict(config["down"]),
    }
    for gemm, n, k in (("up", inter, H), ("down", H, inter)):
        tiles = config[gemm]
        programs = row_blocks * triton.cdiv(n, tiles["BLOCK_N"])
        tiles["SPLIT_K"] = tiles.get("SPLIT_K") or moe_configs.split_k(programs, k, tiles["BLOCK_K"], sm_count)
        tiles["EVEN_K"] = k % tiles["BLOCK_K"] == 0  # every split is whole BLOCK_K steps
    return config


def _launch_options(tiles: dict) -> dict:
    return {
        key: tiles[key] for key in ("BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "EVEN_K", "num_warps", "num_stages")
    }


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
    """(out [T, H], sorted_ids [T*k], expert_offsets [E+1], gate_up [T*k, 2I] in expert-sorted order); the last
    three only with save_gate_up (for the backward), else empty. Chunked over T above CHUNK_TOKENS without it."""
    T = hidden.shape[0]
    args = (w_gate_up, w_down, activation, gated, b_gate_up, b_down, apply_weights_on_input, gate_up_interleaved)
    if save_gate_up or T <= CHUNK_TOKENS:
        return _experts(hidden, topk_weights, topk_ids, *args, save_gate_up)
    out = torch.empty((T, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    for t0 in range(0, T, CHUNK_TOKENS):
        t1 = min(T, t0 + CHUNK_TOKENS)
        out[t0:t1] = _experts(hidden[t0:t1], topk_weights[t0:t1], topk_ids[t0:t1], *args, False)[0]
    empty = lambda: torch.empty(0, dtype=torch.int32, device=hidden.device)  # fresh each: outputs must not alias
    return out, empty(), empty(), hidden.new_empty((0, w_gate_up.shape[1]))


def _experts(
    hidden, topk_weights, topk_ids, w_gate_up, w_down, activation, gated, b_gate_up, b_down, on_input, interleaved,
    save,
):  # fmt: skip
    T, H = hidden.shape
    E, inter = w_down.shape[0], w_down.shape[2]
    top_k = topk_ids.shape[1]
    slots = T * top_k
    width = w_gate_up.shape[1]
    device = hidden.device
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    config = launch_config(slots, E, H, inter, gated=gated, dtype=hidden.dtype, device=device)
    per_slot, block_m = config["PER_SLOT"], config["BLOCK_M"]
    up, down = config["up"], config["down"]

    out = torch.empty((T, H), dtype=hidden.dtype, device=device)
    # Zeros: the rows of slots routed nowhere are never written, and the backward multiplies them by 0.
    gate_up = torch.zeros((slots if save else 0, width), dtype=hidden.dtype, device=device)
    empty = lambda: torch.empty(0, dtype=torch.int32, device=device)  # fresh each: outputs must not alias
    if T == 0:
        return out, empty(), torch.zeros(E + 1 if save else 0, dtype=torch.int32, device=device), gate_up
    if per_slot and not save:
        sorted_ids, positions, offsets = empty(), empty(), empty()
        work_slot = block_expert = ids  # unused: each slot is its own block
    else:
        sorted_ids, positions, offsets, work_slot, block_expert, _ = align(
            topk_ids, E, 0 if per_slot else block_m, save
        )
        if per_slot:
            work_slot = block_expert = ids
    blocks_m = slots if per_slot else block_expert.numel()
    work_rows = blocks_m * block_m
    act = torch.empty((work_rows, inter), dtype=hidden.dtype, device=device)
    # One output row per slot, in hidden's dtype (summed in float32 by the combine); float32 partials when split.
    y = torch.empty(
        (down["SPLIT_K"], slots, H), dtype=torch.float32 if down["SPLIT_K"] > 1 else hidden.dtype, device=device
    )
    partial = torch.empty((up["SPLIT_K"] if up["SPLIT_K"] > 1 else 0, work_rows, width), dtype=torch.float32,
                          device=device)  # fmt: skip
    routing = (weights, ids, work_slot, block_expert, positions)
    epilogue = {
        "PER_SLOT": per_slot,
        "GATED": gated,
        "ACT": ACTIVATION_CODES[activation],
        "HAS_BIAS": b_gate_up is not None,
        "ON_INPUT": on_input,
        "SAVE": save,
        "INTERLEAVED": interleaved,
    }
    b_gate_up = b_gate_up.contiguous() if b_gate_up is not None else w_gate_up
    blocks_up = triton.cdiv(inter, up["BLOCK_N"])
    torch.library.wrap_triton(_up_kernel)[(blocks_m * blocks_up, up["SPLIT_K"])](
        hidden, w_gate_up, b_gate_up, *routing, act, gate_up, partial, slots, top_k, E, H, inter, blocks_m,
        work_rows, hidden.stride(0), hidden.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2),
        BLOCK_M=block_m, **_launch_options(up), **epilogue,
    )  # fmt: skip
    if up["SPLIT_K"] > 1:
        torch.library.wrap_triton(_up_finish_kernel)[(blocks_m * blocks_up,)](
            partial, b_gate_up, *routing, act, gate_up, slots, E, inter, blocks_m, work_rows, BLOCK_M=block_m,
            BLOCK_N=up["BLOCK_N"], SPLIT_K=up["SPLIT_K"], num_warps=up["num_warps"], **epilogue,
        )  # fmt: skip
    torch.library.wrap_triton(_down_kernel)[(blocks_m * triton.cdiv(H, down["BLOCK_N"]), down["SPLIT_K"])](
        act, w_down, b_down.contiguous() if b_down is not None else w_down, weights, ids, work_slot, block_expert, y,
        slots, E, H, inter, blocks_m, w_down.stride(0), w_down.stride(1), w_down.stride(2), BLOCK_M=block_m,
        PER_SLOT=per_slot, HAS_BIAS=b_down is not None, ON_INPUT=on_input, **_launch_options(down),
    )  # fmt: skip
    block_h = min(triton.next_power_of_2(H), 1024)
    torch.library.wrap_triton(_combine_kernel)[(T, triton.cdiv(H, block_h))](
        y, ids, out, slots, top_k, E, H, BLOCK_H=block_h, SPLIT_K=down["SPLIT_K"]
    )
    return out, sorted_ids, offsets, gate_up


def tune_block_m(hidden, w_gate_up, w_down, weights, ids, gated, block_m, candidates, do_bench=None):
    """(seconds, {"up": tiles, "down": tiles}): triton.autotune's pick for each GEMM at one BLOCK_M (moe_configs'
    tuner, on a GPU; ``do_bench`` replaces Triton's timer, e.g. in a test). The activation is silu; tiles do not
    depend on it."""
    H = hidden.shape[1]
    E, inter = w_down.shape[0], w_down.shape[2]
    slots = ids.numel()
    _, _, _, work_slot, block_expert, _ = align(ids, E, block_m, False)
    blocks_m = block_expert.numel()
    act = torch.empty((blocks_m * block_m, inter), dtype=hidden.dtype, device=hidden.device)
    y = torch.empty((1, slots, H), dtype=hidden.dtype, device=hidden.device)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    result, total = {}, 0.0
    for gemm, kernel, n, k in (("up", _up_kernel, inter, H), ("down", _down_kernel, H, inter)):
        configs = []
        for c in candidates:
            if c["BLOCK_N"] <= triton.next_power_of_2(n) and c["BLOCK_K"] <= triton.next_power_of_2(k):
                tiles = {key: c[key] for key in ("BLOCK_N", "BLOCK_K", "GROUP_M")}
                configs.append(
                    triton.Config(
                        dict(tiles, EVEN_K=k % c["BLOCK_K"] == 0), num_warps=c["num_warps"], num_stages=c["num_stages"]
                    )
                )
        tuned = triton.autotune(configs=configs, key=[], do_bench=do_bench)(kernel)
        grid = lambda meta, n=n: (blocks_m * triton.cdiv(n, meta["BLOCK_N"]), 1)
        if gemm == "up":
            tuned[grid](
                hidden, w_gate_up, w_gate_up, flat_w, flat_ids, work_slot, block_expert, flat_ids, act, act, act,
                slots, ids.shape[1], E, H, inter, blocks_m, act.shape[0], hidden.stride(0), hidden.stride(1),
                *w_gate_up.stride(), BLOCK_M=block_m, SPLIT_K=1, PER_SLOT=False, GATED=gated, ACT=0,
                HAS_BIAS=False, ON_INPUT=False, SAVE=False, INTERLEAVED=False,
            )  # fmt: skip
        else:
            tuned[grid](
                act, w_down, w_down, flat_w, flat_ids, work_slot, block_expert, y, slots, E, H, inter, blocks_m,
                *w_down.stride(), BLOCK_M=block_m, SPLIT_K=1, PER_SLOT=False, HAS_BIAS=False, ON_INPUT=False,
            )  # fmt: skip
        best = tuned.best_config
        result[gemm] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        result[gemm].pop("EVEN_K")
        timings = getattr(tuned, "configs_timings", None)  # absent when one config is left: nothing to compare
        total += timings[best][0] * 1e-3 if timings else 0.0
    return total, result


# ---- the backward's grouped GEMMs ----


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    tiles_m,
    K,
    N,
    stride_we,
    stride_wk,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """out[r] = x[r] @ w[e] for the sorted rows r of expert e; one program per (row tile, column tile), grouped."""
    pid_m, pid_n = _tile(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = tl.load(tile_row_ptr + pid_m) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(offsets_ptr + expert + 1)
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = _k_mask(ks, K, EVEN_K)
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
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


def _grouped_tile(dtype: torch.dtype, K: int, N: int) -> dict:
    fp32 = dtype == torch.float32
    block_k = moe_configs._pow2_at_most(K, 32 if fp32 else 64)
    return {
        "BLOCK_M": 64,
        "BLOCK_N": moe_configs._pow2_at_most(N, 64 if fp32 else 128),
        "BLOCK_K": block_k,
        "GROUP_M": 8,
        "EVEN_K": K % block_k == 0,
        "num_warps": 4 if fp32 else 8,
        "num_stages": 2 if fp32 else 3,
    }


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
    """out [S, N] = x [S, K] @ w[e] [K, N] for the rows expert_offsets[e]:expert_offsets[e+1] of each expert e
    (rows past expert_offsets[E] are 0)."""
    S, K = x.shape
    N = w.shape[2]
    out = torch.zeros((S, N), dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    tile = _grouped_tile(x.dtype, K, N)
    tile_expert, tile_row = _row_tiles(expert_offsets, S, tile["BLOCK_M"])
    tiles_m = tile_expert.numel()
    torch.library.wrap_triton(_grouped_mm_kernel)[(tiles_m * triton.cdiv(N, tile["BLOCK_N"]),)](
        x.contiguous(), w, out, expert_offsets, tile_expert, tile_row, tiles_m, K, N, w.stride(0), w.stride(1),
        w.stride(2), **tile,
    )  # fmt: skip
    return out


@torch.library.triton_op("netmerge::grouped_mm_weight_grad_triton", mutates_args=())
def grouped_mm_weight_grad_triton(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """out [E, M, N] = a[rows of e]^T @ b[rows of e] for a [S, M], b [S, N] (0 for experts without rows)."""
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
