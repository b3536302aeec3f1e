"""``expert_parallel_experts``: ``moe_experts`` with the experts spread over the ranks of a process group.

Each rank holds a contiguous slice of the E experts; the token slots travel to the rank of their expert with one
``all_to_all_single`` and their expert outputs come back with the reverse one. Built on torch.distributed only
(NCCL on GPUs, Gloo on CPU). The all-to-alls are a small autograd Function whose backward is the reverse
all-to-all: torch's differentiable functional collectives work with Gloo too, but their result is a Python tensor
subclass that costs about 0.2 ms per collective and more per op that touches it (measured on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from netmerge_fast import _checks, reference
from netmerge_fast.dispatch import _validate, moe_align, moe_experts

__all__ = ["ExpertParallelStats", "expert_parallel_experts", "resolve_group"]


def resolve_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, int, int]:
    """``(group, rank in it, its size)``; ``None`` is the default (world) group. Errors: torch.distributed not
    initialised (RuntimeError), not a ProcessGroup (TypeError), this process not a member (ValueError)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs torch.distributed initialised: call torch.distributed.init_process_group "
            "first (torchrun sets the environment it reads)"
        )
    group = dist.group.WORLD if group is None else group
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to the ranks it leaves out
        group = None
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = -1 if group is None else dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group, rank, dist.get_world_size(group)


@dataclass(frozen=True)
class ExpertParallelStats:
    """Where one call's token slots went, seen from this rank (host integers: they come with the count exchange
    the call needs anyway, so reading them costs no synchronisation).

    Attributes:
        rank, world_size: this rank in the group, and the group's size.
        sent_per_rank: slots this rank sent to each rank's experts (its own included), ``[world_size]``.
        received_per_rank: rows this rank's experts received from each rank, ``[world_size]``.
        received_per_expert: rows each local expert ran, ``[E / world_size]``.
    """

    rank: int
    world_size: int
    sent_per_rank: tuple[int, ...]
    received_per_rank: tuple[int, ...]
    received_per_expert: tuple[int, ...]

    @property
    def sent(self) -> int:
        """Slots this rank sent (T * k minus the slots routed nowhere)."""
        return sum(self.sent_per_rank)

    @property
    def received(self) -> int:
        """Rows this rank's experts ran: its share of the expert compute."""
        return sum(self.received_per_rank)

    def gather(self, group: dist.ProcessGroup | None = None) -> list[ExpertParallelStats]:
        """Every rank's stats, on every rank: one ``all_gather_object`` over ``group`` (pass the layer's group; a
        collective: call it on all its ranks, e.g. at a logging interval, not every step)."""
        group, _, world = resolve_group(group)
        stats: list[ExpertParallelStats | None] = [None] * world
        dist.all_gather_object(stats, self, group=group)
        return stats  # type: ignore[return-value]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with autograd: the backward sends the gradients back the way they came.

    With ``pending`` (a list) the forward returns at once and appends the transfer's handle; the caller waits
    on it before reading the result, and can compute meanwhile. The backward waits for its own transfer.
    ``zero_row=1`` appends a row of zeros to the result (the row that slots routed nowhere read).
    """

    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group, pending, zero_row):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        received = sum(out_splits)
        out = rows.new_empty((received + zero_row, *rows.shape[1:]))
        out[received:].zero_()
        work = dist.all_to_all_single(
            out[:received], rows.contiguous(), out_splits, in_splits, group=group, async_op=True
        )  # fmt: skip
        if pending is None:
            work.wait()
        else:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_rows = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        grad = grad[: sum(out_splits)].contiguous()
        dist.all_to_all_single(grad_rows, grad, in_splits, out_splits, group=ctx.group)
        return grad_rows, None, None, None, None, None


class ExpertParallelCall:
    """One expert-parallel ``moe_experts`` call in three steps, so a caller can put its own work where the
    communication is in flight (``ExpertParallelMoE`` runs its shared expert between ``send`` and ``finish``).

    - construction: permute the slots by expert (so by destination rank), launch the count exchange, gather the
      slots' rows while the counts travel;
    - ``send()``: wait for the counts (the call's one host synchronisation: ``all_to_all_single`` needs its split
      sizes on the host) and launch the rows' all-to-all;
    - ``finish()``: run the local experts on the received rows, send the results back, and combine them with
      the routing weights in slot order.

    Arguments as ``expert_parallel_experts`` (``group`` as ``resolve_group`` returns it, ``config`` is
    ``(activation, gated, b_gate_up, b_down)``), checked by the caller (``ExpertParallelMoE`` owns its weights,
    and its router's ids are valid by construction); the local ``moe_experts`` checks its own inputs again.
    """

    def __init__(self, hidden, w_gate_up, w_down, topk_weights, topk_ids, group, config, backend) -> None:
        self.group, self.rank, self.world_size = group
        self.hidden, self.w_gate_up, self.w_down, self.config, self.backend = hidden, w_gate_up, w_down, config, backend
        self.num_local = w_gate_up.shape[0]
        num_experts = self.num_local * self.world_size
        k = topk_ids.shape[1]
        # Ids outside [0, E) are routed nowhere (on CPU they were rejected before; on GPU checking costs a sync).
        self.valid = (topk_ids >= 0) & (topk_ids < num_experts)
        ids = torch.where(self.valid, topk_ids, -1)
        self.sorted_slots, offsets = moe_align(ids, num_experts, backend=backend)
        self.sorted_slots = self.sorted_slots.long()
        self.send_counts = (offsets[1:] - offsets[:-1]).long()
        # recv_counts[s * E_local + e]: slots rank s sends to local expert e.
        self.recv_counts = torch.empty_like(self.send_counts)
        self.counts_sent = dist.all_to_all_single(self.recv_counts, self.send_counts, group=self.group, async_op=True)
        # Expert-sorted order groups the slots by destination rank; slots routed nowhere are at the tail and are
        # cut off once their number is known. Rows of the same token are gathered once per slot.
        self.rows = hidden[self.sorted_slots // k]
        self.topk_weights = torch.where(self.valid, topk_weights, 0)

    def send(self) -> ExpertParallelStats:
        self.counts_sent.wait()
        counts = torch.cat([self.send_counts, self.recv_counts]).tolist()  # the host synchronisation
        E, W, El = self.num_local * self.world_size, self.world_size, self.num_local
        send, recv = counts[:E], counts[E:]
        self.sent_per_rank = [sum(send[r * El : (r + 1) * El]) for r in range(W)]
        self.received_per_rank = [sum(recv[r * El : (r + 1) * El]) for r in range(W)]
        self.num_sent = sum(self.sent_per_rank)
        self.num_received = sum(self.received_per_rank)
        self.pending: list = []
        self.received = _AllToAll.apply(
            self.rows[: self.num_sent], self.received_per_rank, self.sent_per_rank, self.group, self.pending, 0
        )
        return ExpertParallelStats(
            self.rank,
            W,
            tuple(self.sent_per_rank),
            tuple(self.received_per_rank),
            tuple(sum(recv[e::El]) for e in range(El)),
        )

    def finish(self) -> torch.Tensor:
        self.pending.pop().wait()
        hidden, El = self.hidden, self.num_local
        activation, gated, b_gate_up, b_down = self.config
        # Received rows come grouped by source rank, then by local expert within each source.
        local_ids = torch.repeat_interleave(
            torch.arange(El, dtype=torch.int32, device=hidden.device).repeat(self.world_size),
            self.recv_counts,
            output_size=self.num_received,
        )
        unit = torch.ones(self.num_received, 1, dtype=self.topk_weights.dtype, device=hidden.device)
        expert_out = moe_experts(
            self.received,
            self.w_gate_up,
            self.w_down,
            unit,
            local_ids[:, None],
            activation=activation,
            gated=gated,
            b_gate_up=b_gate_up,
            b_down=b_down,
            backend=self.backend,
        )
        returned = _AllToAll.apply(expert_out, self.sent_per_rank, self.received_per_rank, self.group, None, 1)
        # Each slot reads its result where its row was sent from; slots routed nowhere read the zero row.
        T, k = self.topk_weights.shape
        sorted_position = torch.empty_like(self.sorted_slots).scatter_(
            0, self.sorted_slots, torch.arange(T * k, device=hidden.device)
        )
        rows = sorted_position.clamp_(max=self.num_sent).view(T, k)
        return _combine(returned, rows, self.topk_weights, hidden.dtype)


def _combine(results: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * results[rows[t, j]]``, accumulated in slot order with one fused
    multiply-add per slot in float32 (float64 for float64): the order and rounding of the cpu moe_experts
    kernel's own combine."""
    acc_dtype = reference.compute_dtype(results)
    weights = weights.to(acc_dtype)
    acc = results[rows[:, 0]].to(acc_dtype) * weights[:, :1]
    for j in range(1, weights.shape[1]):
        acc = torch.addcmul(acc, results[rows[:, j]].to(acc_dtype), weights[:, j : j + 1])
    return acc.to(dtype)


def _check(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, world_size):
    _checks.tensor("hidden", hidden, dim=2, floating=True)
    _checks.tensor("topk_weights", topk_weights, dim=2, floating=True)
    _checks.tensor("topk_ids", topk_ids, dim=2, integer=True)
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != hidden.shape[0] or topk_ids.shape[1] < 1:
        raise ValueError(
            f"topk_weights and topk_ids must both be [T={hidden.shape[0]}, k >= 1], got "
            f"{list(topk_weights.shape)} and {list(topk_ids.shape)}"
        )
    # The weight, bias, dtype and device checks of moe_experts, on zero tokens (the ids are global, not local).
    _validate(
        hidden[:0], w_gate_up, w_down, topk_weights[:0], topk_ids[:0], activation, gated, b_gate_up, b_down
    )  # fmt: skip
    if topk_weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"topk_weights must be float32 (float64 with float64 hidden), got {topk_weights.dtype}")
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        _checks.same_device(name, t, "hidden", hidden)
    num_experts = w_gate_up.shape[0] * world_size
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        low, high = (v.item() for v in torch.aminmax(topk_ids))
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"topk_ids must be in [-1, E={num_experts}) (E: local experts {w_gate_up.shape[0]} x world size "
                f"{world_size}; -1: routed nowhere), got values in [{low}, {high}]"
            )


def expert_parallel_experts(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    activation: str = "silu",
    gated: bool = True,
    b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ExpertParallelStats]:
    """``moe_experts`` over a process group: this rank holds experts ``[rank * E_local, (rank + 1) * E_local)``
    of ``E = E_local * world_size``, and its tokens' slots are answered by whichever rank holds their expert.

    Every rank of ``group`` must call it (it is a collective), each with its own tokens (T may differ, 0
    included) and the same expert shapes. The result on each rank equals ``moe_experts`` of that rank's tokens
    with all E experts in one process.

    Args:
        hidden: ``[T, H]`` this rank's tokens (float32, float16, bfloat16; float64 on CPU).
        w_gate_up, w_down: this rank's expert slice, ``[E_local, 2I, H]`` and ``[E_local, H, I]`` (layout of
            ``moe_experts``); b_gate_up ``[E_local, 2I]``, b_down ``[E_local, H]``: optional biases.
        topk_weights: ``[T, k]`` float32 routing weights; topk_ids: ``[T, k]`` *global* expert ids in
            ``[0, E)``, or -1 for a slot routed nowhere (checked on CPU tensors; on GPU, ids outside ``[0, E)``
            contribute nothing).
        group: the process group of the expert-parallel ranks (``None``: the world).
        activation, gated, backend: as ``moe_experts`` (the backend runs the local experts and the permutation).

    Returns:
        ``(out [T, H] in hidden's dtype, ExpertParallelStats)``.

    Gradients flow to hidden, topk_weights, the local weights and biases (each rank's expert gradients sum
    over the tokens of every rank that reached them). One host synchronisation per call (the all-to-all sizes).

    Example::

        out, stats = expert_parallel_experts(x, w_gate_up[lo:hi], w_down[lo:hi], weights, ids)
    """
    group_info = resolve_group(group)
    _check(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, gated, b_gate_up, b_down, group_info[2])
    call = ExpertParallelCall(
        hidden, w_gate_up, w_down, topk_weights, topk_ids, group_info, (activation, gated, b_gate_up, b_down), backend
    )
    stats = call.send()
    return call.finish(), stats
