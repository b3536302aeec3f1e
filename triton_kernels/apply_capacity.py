"""Triton apply_capacity: which slots each expert keeps, without a host synchronisation.

Capacity holds per group of ``group_size`` consecutive tokens (Switch Transformers: per sequence). Both orders
write only the dropped slots, over a copy of the ids, with one program per (group, expert) bucket.

Token order: the program scans its group's slot ids in order with a running prefix count of its expert's slots;
slots ranked ``capacity`` or later are dropped (the scan of ``moe_align``'s placing pass, with nothing to place).

Score order: a stable sort groups the slots by bucket (in slot order); each program then finds the
``capacity``-th best priority of its segment by a radix select over the order-preserving 32-bit image of the
priorities (four histogram passes of 8 bits, most significant first). Slots above it are kept, slots below
dropped, and among the slots equal to it the lowest ones fill the places left, by a prefix count in slot order:
the set that sorting by (priority desc, slot) would keep, with every pass a contiguous read of the segment.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _token_order_kernel(ids_ptr, out_ptr, counts_ptr, slots, group_slots, E, capacity, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    group = tl.program_id(1)
    begin = group * group_slots
    end = tl.minimum(begin + group_slots, slots)
    seen = tl.zeros([], tl.int32)
    for base in range(begin, end, BLOCK):
        s = base + tl.arange(0, BLOCK)
        in_range = s < end
        mine = (tl.load(ids_ptr + s, mask=in_range, other=-1) == expert) & in_range
        rank = seen + tl.cumsum(mine.to(tl.int32), 0) - 1
        tl.store(out_ptr + s, tl.full([BLOCK], -1, out_ptr.dtype.element_ty), mask=mine & (rank >= capacity))
        seen += tl.sum(mine.to(tl.int32), 0)
    tl.store(counts_ptr + group * E + expert, seen)


@triton.jit
def _priority_order(p):
    """int32 image of float32 priorities, order-preserving; NaN counts as -inf, -0.0 as +0.0 (as the C++ rule)."""
    p = tl.where(p != p, float("-inf"), p)
    p = tl.where(p == 0.0, 0.0, p)
    bits = p.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _score_order_kernel(
    sorted_ptr, offsets_ptr, priority_ptr, keys_ptr, out_ptr, counts_ptr, capacity, BLOCK: tl.constexpr
):
    expert = tl.program_id(0)
    begin = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    tl.store(counts_ptr + expert, end - begin)
    if end - begin > capacity:
        # Unsigned order of the priorities, in segment order, as int64 in [0, 2^32).
        for base in range(begin, end, BLOCK):
            i = base + tl.arange(0, BLOCK)
            slot = tl.load(sorted_ptr + i, mask=i < end, other=0)
            key = _priority_order(tl.load(priority_ptr + slot, mask=i < end, other=0.0))
            tl.store(keys_ptr + i, key.to(tl.int64) + 2**31, mask=i < end)
        # Radix select, 8 bits a pass from the top: the capacity-th best key `threshold`, and `need`, how many of
        # the keys equal to it still have a place.
        threshold = tl.zeros([], tl.int64)
        need = capacity + tl.zeros([], tl.int32)
        digits = tl.arange(0, 256)
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            histogram = tl.zeros([256], tl.int32)
            for base in range(begin, end, BLOCK):
                i = base + tl.arange(0, BLOCK)
                key = tl.load(keys_ptr + i, mask=i < end, other=0)
                match = (i < end) & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
                histogram += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
            total = tl.sum(histogram, 0)
            above_or_at = total - tl.cumsum(histogram, 0) + histogram
            digit = tl.max(tl.where(above_or_at >= need, digits, 0), 0)
            need -= tl.sum(tl.where(digits > digit, histogram, 0), 0)
            threshold += digit.to(tl.int64) << shift
        equal_seen = tl.zeros([], tl.int32)
        for base in range(begin, end, BLOCK):
            i = base + tl.arange(0, BLOCK)
            in_segment = i < end
            key = tl.load(keys_ptr + i, mask=in_segment, other=0)
            equal = (key == threshold) & in_segment
            equal_rank = equal_seen + tl.cumsum(equal.to(tl.int32), 0) - 1
            keep = (key > threshold) | (equal & (equal_rank < need))
            slot = tl.load(sorted_ptr + i, mask=in_segment, other=0)
            tl.store(out_ptr + slot, tl.full([BLOCK], -1, out_ptr.dtype.element_ty), mask=in_segment & ~keep)
            equal_seen += tl.sum(equal.to(tl.int32), 0)


@torch.library.triton_op("netmerge::apply_capacity_triton", mutates_args=())
def apply_capacity_triton(
    topk_ids: torch.Tensor,
    priority: torch.Tensor | None,
    num_experts: int,
    capacity: int,
    order: str,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = topk_ids.contiguous()
    T, k = ids.shape
    slots, E = ids.numel(), num_experts
    group_slots = max(1, min(group_size, T) * k)
    groups = triton.cdiv(slots, group_slots)
    out = ids.clone()
    counts = torch.zeros(groups * E, dtype=torch.int32, device=ids.device)
    capacity = min(capacity, slots)
    if order == "token" and slots:
        torch.library.wrap_triton(_token_order_kernel)[(E, groups)](
            ids, out, counts, slots, group_slots, E, capacity, BLOCK=_BLOCK
        )
    elif order == "score" and slots:
        # One bucket per (group, expert); a stable radix sort groups the slots by bucket, in slot order, without a
        # host sync and in O(slots) for any number of buckets (moe_align's scans cost O(buckets * slots)).
        flat = ids.reshape(-1).long()
        position = torch.arange(slots, device=ids.device)
        bucket = torch.where((flat >= 0) & (flat < E), position // group_slots * E + flat, groups * E)
        sorted_ids = torch.sort(bucket, stable=True).indices.to(torch.int32)
        bucket_counts = torch.zeros(groups * E + 1, dtype=torch.int32, device=ids.device)
        bucket_counts.scatter_add_(0, bucket, torch.ones_like(bucket, dtype=torch.int32))
        offsets = torch.cat([bucket_counts.new_zeros(1), bucket_counts.cumsum(0, dtype=torch.int32)])
        keys = torch.empty(slots, dtype=torch.int64, device=ids.device)
        torch.library.wrap_triton(_score_order_kernel)[(groups * E,)](
            sorted_ids, offsets, priority.float().contiguous(), keys, out, counts, capacity, BLOCK=_BLOCK
        )
    dropped = (counts.view(groups, E).long() - capacity).clamp_min(0).sum(0)
    return out, dropped
