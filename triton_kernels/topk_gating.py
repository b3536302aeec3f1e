"""Triton topk_gating: one program routes BLOCK_T rows; each row is loaded once and stays in registers.

Ranking uses one int64 per expert: the float key mapped to an order-preserving int32 in the high half and
the complemented expert index in the low half. A single integer max then yields the best key, with ties
going to the lower index, and its position, so every selection step is one reduction.
"""

import torch
import triton
import triton.language as tl

_LOW_MASK = tl.constexpr(0xFFFFFFFF)
# Chosen already, or a padding column. Experts outside the chosen groups get this high half too, but keep their
# index in the low half: behind every real key, still in index order (kernels/topk_gating.h does the same).
_EXCLUDED = tl.constexpr(-(2**63))


@triton.jit
def _pack(key, index):
    """Order-preserving int64 of (key, lower index first). key has no NaN; -0.0 ranks as +0.0."""
    key = tl.where(key == 0.0, 0.0, key)
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (index.to(tl.int64) ^ _LOW_MASK)


@triton.jit
def _topk_gating_kernel(
    x_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    T,
    E,
    stride_t,
    stride_e,
    scale,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    SOFTMAX_AFTER: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    KEY_IS_LOGIT: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    TOP2_SUM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    x = tl.load(
        x_ptr + rows64[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e,
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)

    if SOFTMAX_AFTER:
        scores = x
    elif SIGMOID:
        scores = tl.sigmoid(x)
    else:
        m = tl.max(x, axis=1)
        # x == m also covers m = +inf (the +inf entries share the mass) and m = -inf (masked below).
        num = tl.where(x == m[:, None], 1.0, tl.exp(x - m[:, None]))
        num = tl.where(col_ok[None, :], num, 0.0)
        inv = tl.where(m == float("-inf"), 0.0, 1.0 / tl.sum(num, axis=1))
        scores = num * inv[:, None]

    if KEY_IS_LOGIT:
        key = x
    else:
        key = scores
        if HAS_BIAS:
            key = key + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
        key = tl.where(key != key, float("-inf"), key)
    packed = tl.where(col_ok[None, :], _pack(key, cols[None, :]), _EXCLUDED)

    if NUM_GROUPS > 1:
        group_of = cols // GROUP_SIZE
        gcols = tl.arange(0, GROUP_PAD)
        gpacked = tl.full([BLOCK_T, GROUP_PAD], _EXCLUDED, tl.int64)
        for g in tl.static_range(NUM_GROUPS):
            in_group = ((group_of == g) & col_ok)[None, :]
            best = tl.max(tl.where(in_group, key, float("-inf")), axis=1)
            if TOP2_SUM:
                first = tl.max(tl.where(in_group, packed, _EXCLUDED), axis=1)
                rest = in_group & (packed != first[:, None])
                gscore = best + tl.max(tl.where(rest, key, float("-inf")), axis=1)
                gscore = tl.where(gscore != gscore, float("-inf"), gscore)
            else:
                gscore = best
            gpacked = tl.where(gcols[None, :] == g, _pack(gscore, g + 0 * rows)[:, None], gpacked)
        allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int1)
        for _ in tl.static_range(TOPK_GROUPS):
            top = tl.max(gpacked, axis=1)
            group = ((top & _LOW_MASK) ^ _LOW_MASK).to(tl.int32)
            allowed = allowed | (group_of[None, :] == group[:, None])
            gpacked = tl.where(gcols[None, :] == group[:, None], _EXCLUDED, gpacked)
        packed = tl.where(allowed | ~col_ok[None, :], packed, _EXCLUDED + (cols[None, :].to(tl.int64) ^ _LOW_MASK))

    kcols = tl.arange(0, K_PAD)
    weights = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in range(K):
        top = tl.max(packed, axis=1)
        expert = ((top & _LOW_MASK) ^ _LOW_MASK).to(tl.int32)
        hit = cols[None, :] == expert[:, None]
        value = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        packed = tl.where(hit, _EXCLUDED, packed)
        weights = tl.where(kcols[None, :] == j, value[:, None], weights)
        ids = tl.where(kcols[None, :] == j, expert[:, None], ids)

    slot_ok = (kcols < K)[None, :]
    if SOFTMAX_AFTER:
        chosen = tl.where(slot_ok, weights, float("-inf"))
        cm = tl.max(chosen, axis=1)
        num = tl.where(slot_ok, tl.where(chosen == cm[:, None], 1.0, tl.exp(chosen - cm[:, None])), 0.0)
        weights = tl.where((cm == float("-inf"))[:, None], 0.0, num / tl.sum(num, axis=1)[:, None])
    elif RENORMALIZE:
        total = tl.sum(tl.where(slot_ok, weights, 0.0), axis=1) + 1e-20
        weights = weights / total[:, None]
    weights = weights * scale

    out = rows64[:, None] * K + kcols[None, :]
    out_ok = row_ok[:, None] & slot_ok
    tl.store(w_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


# Elements per program: the row tile lives in registers as float keys, scores and int64 ranks.
_TILE_ELEMENTS = 2048


def launch_config(T, E, k, scoring, renormalize, has_bias, num_groups, topk_groups, group_score, softmax_after_topk):
    """Compile-time parameters and warps of the kernel for one call (shared with the compile check in tests)."""
    top2_sum = group_score == "top2_sum" and num_groups > 1
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(triton.next_power_of_2(max(T, 1)), _TILE_ELEMENTS // block_e))
    constexprs = {
        "K": k,
        "K_PAD": triton.next_power_of_2(k),
        "BLOCK_T": block_t,
        "BLOCK_E": block_e,
        "SIGMOID": scoring == "sigmoid",
        "SOFTMAX_AFTER": softmax_after_topk,
        "RENORMALIZE": renormalize,
        "HAS_BIAS": has_bias,
        "KEY_IS_LOGIT": not has_bias and (softmax_after_topk or not top2_sum),
        "NUM_GROUPS": num_groups,
        "TOPK_GROUPS": topk_groups,
        "GROUP_SIZE": E // num_groups,
        "GROUP_PAD": triton.next_power_of_2(num_groups),
        "TOP2_SUM": top2_sum,
    }
    return constexprs, (4 if block_t * block_e <= 1024 else 8)


@torch.library.triton_op("netmerge::topk_gating_triton", mutates_args=())
def topk_gating_triton(
    router_logits: torch.Tensor,
    k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    softmax_after_topk: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = router_logits.shape
    weights = torch.empty((T, k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    constexprs, num_warps = launch_config(
        T, E, k, scoring, renormalize, bias is not None, num_groups, topk_groups, group_score, softmax_after_topk
    )
    grid = (triton.cdiv(T, constexprs["BLOCK_T"]),)
    torch.library.wrap_triton(_topk_gating_kernel)[grid](
        router_logits,
        bias.float().contiguous() if bias is not None else weights,
        weights,
        ids,
        T,
        E,
        router_logits.stride(0),
        router_logits.stride(1),
        scale,
        **constexprs,
        num_warps=num_warps,
    )
    return weights, ids
