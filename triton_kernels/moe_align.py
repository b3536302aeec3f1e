"""Triton moe_align: a stable counting sort of the T*k token slots by expert, without a host synchronisation.

Two launches of E+1 programs (one per expert, the last for slots routed nowhere): the first counts each
expert's slots, the second derives its segment start from the counts and writes its slots in increasing slot
order, ranked by a running prefix sum over the slots. Every program reads all slot ids, which sit in L2 after
the first pass; the layout matches csrc/kernels/moe_align.h exactly.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _bucket(ids, E):
    """Expert of a slot; slots routed nowhere (id outside [0, E)) go to bucket E."""
    return tl.where((ids >= 0) & (ids < E), ids, E)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, slots, E, BLOCK: tl.constexpr):
    bucket = tl.program_id(0)
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(0, slots, BLOCK):
        s = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + s, mask=s < slots, other=-1).to(tl.int32)
        total += ((_bucket(ids, E) == bucket) & (s < slots)).to(tl.int32)
    tl.store(counts_ptr + bucket, tl.sum(total, 0))


@triton.jit
def _place_kernel(
    ids_ptr,
    counts_ptr,
    sorted_ptr,
    offsets_ptr,
    padded_ptr,
    block_expert_ptr,
    padded_length_ptr,
    slots,
    E,
    block_size,
    BLOCK: tl.constexpr,
    E_PAD: tl.constexpr,
    PADDED: tl.constexpr,
):
    bucket = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts <= E, other=0)
    start = tl.sum(tl.where(experts < bucket, counts, 0), 0)
    if bucket < E:
        tl.store(offsets_ptr + bucket, start)
    else:
        tl.store(offsets_ptr + E, start)
    if PADDED:
        padded_counts = (counts + block_size - 1) // block_size * block_size
        padded_start = tl.sum(tl.where((experts < bucket) & (experts < E), padded_counts, 0), 0)
        padded_end = tl.sum(tl.where((experts <= bucket) & (experts < E), padded_counts, 0), 0)
        if bucket < E:
            count = tl.sum(tl.where(experts == bucket, counts, 0), 0)
            first_block = padded_start // block_size
            for b in range(0, (count + block_size - 1) // block_size):
                tl.store(block_expert_ptr + first_block + b, bucket)
        else:
            tl.store(padded_length_ptr, padded_start)

    seen = start * 0
    for base in range(0, slots, BLOCK):
        s = base + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + s, mask=s < slots, other=-1).to(tl.int32)
        mine = (_bucket(ids, E) == bucket) & (s < slots)
        rank = seen + tl.cumsum(mine.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + start + rank, s, mask=mine)
        if PADDED:
            # Slots routed nowhere have no place in the padded layout (padded_start is past every expert's).
            tl.store(padded_ptr + padded_start + rank, s, mask=mine & (padded_start + rank < padded_end))
        seen += tl.sum(mine.to(tl.int32), 0)


_BLOCK = 1024


@torch.library.triton_op("netmerge::moe_align_triton", mutates_args=())
def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = topk_ids.reshape(-1).contiguous()
    slots, E = ids.numel(), num_experts
    device = ids.device
    counts = torch.empty(E + 1, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(slots, dtype=torch.int32, device=device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
    padded = block_size > 0
    capacity = slots + E * (block_size - 1) if padded else 0
    padded_ids = torch.full((capacity,), slots, dtype=torch.int32, device=device)
    block_expert = torch.full((capacity // block_size if padded else 0,), -1, dtype=torch.int32, device=device)
    padded_length = torch.zeros(1 if padded else 0, dtype=torch.int32, device=device)
    torch.library.wrap_triton(_count_kernel)[(E + 1,)](ids, counts, slots, E, BLOCK=_BLOCK)
    torch.library.wrap_triton(_place_kernel)[(E + 1,)](
        ids,
        counts,
        sorted_ids,
        offsets,
        padded_ids,
        block_expert,
        padded_length,
        slots,
        E,
        max(block_size, 1),
        BLOCK=_BLOCK,
        E_PAD=triton.next_power_of_2(E + 1),
        PADDED=padded,
    )
    if padded:
        return padded_ids, offsets, block_expert, padded_length
    return sorted_ids, offsets, block_expert, padded_length
