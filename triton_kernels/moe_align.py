"""Triton moe_align: a stable counting sort of the T*k token slots by expert, without a host synchronisation.

The slots are cut into chunks of CHUNK. Three phases, the layout of csrc/kernels/moe_align.h exactly:

  count   one program per chunk: the chunk's histogram over the E+1 buckets (E experts, then "routed nowhere").
  scan    one program: an exclusive scan over buckets (where each expert's segment starts, dense and padded)
          and, per bucket, over chunks (where each chunk's share of the segment starts), carried from one block
          of chunks to the next: one base per (chunk, bucket).
  place   one program per chunk: each slot's rank among the chunk's earlier slots of its bucket (a comparison
          of the chunk with itself, SUB columns at a time), so slot s lands at base[chunk, bucket] + rank:
          stable, deterministic, no atomics. The padded layout's sentinels and the block -> expert table are
          written by the same launch, over the padded positions.

Slots that fit in one chunk (decode, small batches) take a single launch that runs the three phases in turn.
Work is O(T*k * CHUNK + E * chunks), spread over the chunks; only the scan is serial, over E * chunks counts.
"""

import torch
import triton
import triton.language as tl

CHUNK = 256
_SUB = 32  # columns of the place phase's self-comparison per step: CHUNK * SUB booleans in registers
# Padded positions per program and loop step of the fill part (sentinels, block -> expert).
_FILL = 256


@triton.jit
def _buckets(ids_ptr, s, slots, E):
    """Bucket of slots s: the expert, E if routed nowhere (id outside [0, E)), E + 1 past the end."""
    ids = tl.load(ids_ptr + s, mask=s < slots, other=-1)
    bucket = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    return tl.where(s < slots, bucket, E + 1)


@triton.jit
def _count(ids_ptr, counts_ptr, chunk, slots, E, CHUNK: tl.constexpr, BINS: tl.constexpr):
    bins = tl.arange(0, BINS)
    histogram = tl.histogram(_buckets(ids_ptr, chunk * CHUNK + tl.arange(0, CHUNK), slots, E), BINS)
    tl.store(counts_ptr + chunk * (E + 1) + bins, histogram, mask=bins <= E)


@triton.jit
def _scan(
    counts_ptr,
    dense_base_ptr,
    padded_base_ptr,
    offsets_ptr,
    padded_start_ptr,
    chunks,
    E,
    block_size,
    BINS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PADDED: tl.constexpr,
):
    bins = tl.arange(0, BINS)
    bin_ok = bins <= E
    totals = tl.zeros([BINS], tl.int32)
    for c0 in range(0, chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (cs < chunks)[:, None] & bin_ok[None, :]
        totals += tl.sum(tl.load(counts_ptr + cs[:, None] * (E + 1) + bins[None, :], mask=ok, other=0), 0)
    start = tl.cumsum(totals, 0) - totals
    tl.store(offsets_ptr + bins, start, mask=bin_ok)
    # Padded segments: experts only (slots routed nowhere have no place there); padded_start[E] is the length.
    padded_count = tl.where(bins < E, (totals + block_size - 1) // block_size * block_size, 0)
    padded_start = tl.cumsum(padded_count, 0) - padded_count
    if PADDED:
        tl.store(padded_start_ptr + bins, padded_start, mask=bin_ok)

    carry = tl.zeros([BINS], tl.int32)  # slots of each bucket in the chunks before this block
    for c0 in range(0, chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (cs < chunks)[:, None] & bin_ok[None, :]
        at = cs[:, None] * (E + 1) + bins[None, :]
        tile = tl.load(counts_ptr + at, mask=ok, other=0)
        before = tl.cumsum(tile, 0) - tile + carry[None, :]  # the bucket's slots in earlier chunks
        tl.store(dense_base_ptr + at, start[None, :] + before, mask=ok)
        if PADDED:
            tl.store(padded_base_ptr + at, padded_start[None, :] + before, mask=ok)
        carry += tl.sum(tile, 0)


@triton.jit
def _place(
    ids_ptr,
    dense_base_ptr,
    padded_base_ptr,
    sorted_ptr,
    position_ptr,
    padded_ptr,
    chunk,
    slots,
    E,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    DENSE: tl.constexpr,
    PADDED: tl.constexpr,
):
    position = tl.arange(0, CHUNK)
    slot = chunk * CHUNK + position
    bucket = _buckets(ids_ptr, slot, slots, E)
    rank = tl.zeros([CHUNK], tl.int32)  # earlier slots of the chunk in the same bucket
    for j in tl.static_range(0, CHUNK, SUB):
        columns = j + tl.arange(0, SUB)
        other = _buckets(ids_ptr, chunk * CHUNK + columns, slots, E)
        earlier = (other[None, :] == bucket[:, None]) & (columns[None, :] < position[:, None])
        rank += tl.sum(earlier.to(tl.int32), 1)
    row = chunk * (E + 1) + bucket
    if DENSE:
        real = bucket <= E
        at = tl.load(dense_base_ptr + row, mask=real, other=0) + rank
        tl.store(sorted_ptr + at, slot, mask=real)
        tl.store(position_ptr + slot, at, mask=real)  # the inverse permutation
    if PADDED:
        routed = bucket < E
        tl.store(padded_ptr + tl.load(padded_base_ptr + row, mask=routed, other=0) + rank, slot, mask=routed)


@triton.jit
def _fill(
    offsets_ptr,
    padded_start_ptr,
    padded_ptr,
    block_expert_ptr,
    padded_length_ptr,
    program,
    programs,
    slots,
    E,
    block_size,
    capacity,
    BINS: tl.constexpr,
    FILL: tl.constexpr,
):
    """Sentinels at the padded positions no slot takes, and each block's expert (-1 past the padded length)."""
    bins = tl.arange(0, BINS)
    is_expert = bins < E
    counts = tl.load(offsets_ptr + bins + 1, mask=is_expert, other=0) - tl.load(offsets_ptr + bins, mask=is_expert)
    starts = tl.load(padded_start_ptr + bins, mask=bins <= E, other=0)
    ends = tl.where(is_expert, tl.load(padded_start_ptr + bins + 1, mask=is_expert, other=0), 2**31 - 1)
    length = tl.load(padded_start_ptr + E)
    if program == 0:
        tl.store(padded_length_ptr, length)
    blocks = capacity // block_size
    for first in range(program * FILL, capacity, programs * FILL):
        r = first + tl.arange(0, FILL)
        expert = tl.sum((ends[None, :] <= r[:, None]).to(tl.int32), 1)  # the segment holding position r
        in_use = tl.sum(tl.where(bins[None, :] == expert[:, None], starts[None, :] + counts[None, :], 0), 1)
        tl.store(padded_ptr + r, slots, mask=(r < capacity) & ((expert >= E) | (r >= in_use)))
        b = first + tl.arange(0, FILL)  # blocks, FILL at a time, alongside the positions
        owner = tl.sum((ends[None, :] <= (b * block_size)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, tl.where(b * block_size < length, owner, -1), mask=b < blocks)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, slots, E, CHUNK: tl.constexpr, BINS: tl.constexpr):
    _count(ids_ptr, counts_ptr, tl.program_id(0), slots, E, CHUNK, BINS)


@triton.jit
def _scan_kernel(
    counts_ptr,
    dense_base_ptr,
    padded_base_ptr,
    offsets_ptr,
    padded_start_ptr,
    chunks,
    E,
    block_size,
    BINS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PADDED: tl.constexpr,
):
    _scan(
        counts_ptr, dense_base_ptr, padded_base_ptr, offsets_ptr, padded_start_ptr, chunks, E, block_size, BINS,
        BLOCK_C, PADDED,
    )  # fmt: skip


@triton.jit
def _place_kernel(
    ids_ptr,
    dense_base_ptr,
    padded_base_ptr,
    offsets_ptr,
    padded_start_ptr,
    sorted_ptr,
    position_ptr,
    padded_ptr,
    block_expert_ptr,
    padded_length_ptr,
    chunks,
    slots,
    E,
    block_size,
    capacity,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BINS: tl.constexpr,
    FILL: tl.constexpr,
    DENSE: tl.constexpr,
    PADDED: tl.constexpr,
):
    program = tl.program_id(0)
    if program < chunks:
        _place(ids_ptr, dense_base_ptr, padded_base_ptr, sorted_ptr, position_ptr, padded_ptr, program, slots, E,
               CHUNK, SUB, DENSE, PADDED)  # fmt: skip
    if PADDED:
        _fill(offsets_ptr, padded_start_ptr, padded_ptr, block_expert_ptr, padded_length_ptr, program,
              tl.num_programs(0), slots, E, block_size, capacity, BINS, FILL)  # fmt: skip


@triton.jit
def _one_chunk_kernel(
    ids_ptr,
    counts_ptr,
    dense_base_ptr,
    padded_base_ptr,
    offsets_ptr,
    padded_start_ptr,
    sorted_ptr,
    position_ptr,
    padded_ptr,
    block_expert_ptr,
    padded_length_ptr,
    slots,
    E,
    block_size,
    capacity,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BINS: tl.constexpr,
    FILL: tl.constexpr,
    DENSE: tl.constexpr,
    PADDED: tl.constexpr,
):
    """All three phases in one program (slots <= CHUNK); the barriers make each phase's stores visible to the
    next phase's loads by other threads of the program."""
    _count(ids_ptr, counts_ptr, 0, slots, E, CHUNK, BINS)
    tl.debug_barrier()
    _scan(counts_ptr, dense_base_ptr, padded_base_ptr, offsets_ptr, padded_start_ptr, 1, E, block_size, BINS, 1,
          PADDED)  # fmt: skip
    tl.debug_barrier()
    _place(ids_ptr, dense_base_ptr, padded_base_ptr, sorted_ptr, position_ptr, padded_ptr, 0, slots, E, CHUNK, SUB,
           DENSE, PADDED)  # fmt: skip
    if PADDED:
        _fill(offsets_ptr, padded_start_ptr, padded_ptr, block_expert_ptr, padded_length_ptr, 0, 1, slots, E,
              block_size, capacity, BINS, FILL)  # fmt: skip


def align(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, dense: bool, chunk: int = CHUNK
) -> tuple[torch.Tensor, ...]:
    """(sorted_ids [T*k], positions [T*k] (where each slot sits in sorted_ids), offsets [E+1], padded_ids [P],
    block_expert [P / block_size], padded_length [1]); the first two are empty without ``dense``, the padded ones
    when block_size is 0. Layouts as netmerge_fast.moe_align."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    slots, E = ids.numel(), num_experts
    device = ids.device
    padded = block_size > 0
    block_size = max(block_size, 1)
    capacity = slots + E * (block_size - 1) if padded else 0
    chunks = triton.cdiv(slots, chunk)
    new = lambda *shape: torch.empty(shape, dtype=torch.int32, device=device)
    sorted_ids, positions = new(slots if dense else 0), new(slots if dense else 0)
    offsets = new(E + 1)
    padded_ids, block_expert, padded_length = new(capacity), new(capacity // block_size), new(1 if padded else 0)
    counts, dense_base, padded_base = (new(max(chunks, 1), E + 1) for _ in range(3))
    padded_start = new(E + 1)
    bins = triton.next_power_of_2(E + 2)
    flags = {"CHUNK": chunk, "SUB": min(_SUB, chunk), "BINS": bins, "FILL": _FILL, "DENSE": dense, "PADDED": padded}
    outputs = (sorted_ids, positions, padded_ids, block_expert, padded_length)
    if chunks <= 1:
        torch.library.wrap_triton(_one_chunk_kernel)[(1,)](
            ids, counts, dense_base, padded_base, offsets, padded_start, *outputs, slots, E, block_size, capacity,
            **flags,
        )  # fmt: skip
    else:
        torch.library.wrap_triton(_count_kernel)[(chunks,)](ids, counts, slots, E, CHUNK=chunk, BINS=bins)
        torch.library.wrap_triton(_scan_kernel)[(1,)](
            counts, dense_base, padded_base, offsets, padded_start, chunks, E, block_size, BINS=bins,
            BLOCK_C=max(1, 4096 // bins), PADDED=padded,
        )  # fmt: skip
        fill_programs = triton.cdiv(capacity, _FILL) if padded else 0
        torch.library.wrap_triton(_place_kernel)[(max(chunks, fill_programs),)](
            ids, dense_base, padded_base, offsets, padded_start, *outputs, chunks, slots, E, block_size, capacity,
            **flags,
        )  # fmt: skip
    return sorted_ids, positions, offsets, padded_ids, block_expert, padded_length


@torch.library.triton_op("netmerge::moe_align_triton", mutates_args=())
def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align's outputs: (sorted_ids, offsets, empty, empty) for block_size 0, else (padded_ids, offsets,
    block_expert, padded_length)."""
    sorted_ids, _, offsets, padded_ids, block_expert, padded_length = align(
        topk_ids, num_experts, block_size, dense=block_size == 0
    )
    if block_size:
        return padded_ids, offsets, block_expert, padded_length
    return sorted_ids, offsets, block_expert, padded_length
