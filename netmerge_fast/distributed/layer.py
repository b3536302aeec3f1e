"""ExpertParallelMoE: a SparseMoE whose experts are spread over the ranks of a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from netmerge_fast.distributed.experts import ExpertParallelCall, ExpertParallelStats, resolve_group
from netmerge_fast.nn.sparse_moe import MoEExperts, SparseMoE
from netmerge_fast.routing import topk_gating

__all__ = ["EXPERT_TENSORS", "ExpertParallelMoE"]

# The stacked [E, ...] tensors of an experts module (SparseMoE's and Hugging Face transformers 5's names).
EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


class ExpertParallelMoE(nn.Module):
    """``SparseMoE`` with expert parallelism: every rank of ``group`` keeps the router, the selection bias and the
    shared expert (replicated) and its contiguous slice of the experts, ``E / world_size`` of them; tokens go to
    the rank of their expert with an all-to-all and come back with another.

    The forward of each rank equals ``SparseMoE`` on that rank's tokens with all experts in one process (see the
    README, "Scaling out", for where it is bit-identical). Every rank of the group must call it, each with its own
    batch (sizes may differ, 0 included), and, when training, run its backward with the same inputs requiring
    gradients (the backward exchanges gradients with the other ranks). State dict keys are ``SparseMoE``'s, with
    ``experts.*`` holding this rank's slice: ``shard_state_dict`` / ``gather_state_dict`` convert from and to a
    full checkpoint.

    Args:
        moe: the full layer. Its router, bias buffer and shared expert modules are taken over (shared, not
            copied); the experts' slice of this rank is copied, so drop ``moe`` afterwards to free the rest (or
            build it on the ``meta`` device, then ``to_empty`` this module and load a shard).
        group: the expert-parallel process group (``None``: the world).

    Errors: ``ValueError`` if E is not a multiple of the group's size, if this process is not in ``group``, or if
    the ranks' layers differ (checked once here, collectively: every rank of the group must construct it);
    ``TypeError`` if ``moe`` is not a ``SparseMoE``; ``RuntimeError`` if torch.distributed is not initialised.

    After each forward, ``stats`` (``ExpertParallelStats``) says how many slots went to and came from each rank
    and how many rows each local expert ran, at no extra synchronisation; ``router_logits``, ``topk_ids`` and
    ``aux_loss()`` are ``SparseMoE``'s, for this rank's tokens.

    Gradients: expert parameters get the gradient of every rank's loss (through the reverse all-to-all); the
    replicated parameters only get their own rank's, as in data parallelism: call ``all_reduce_replicated_grads``
    after backward (or leave them to DDP, see the README).

    Example (``torchrun --nproc-per-node 4 train.py``)::

        dist.init_process_group("nccl")
        moe = SparseMoE(2048, 768, num_experts=128, top_k=8)
        moe.load_state_dict(checkpoint)
        layer = ExpertParallelMoE(moe).cuda()   # 32 experts per rank
        y = layer(x_of_this_rank)
    """

    def __init__(self, moe: SparseMoE, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(moe, SparseMoE):
            raise TypeError(f"moe must be a netmerge_fast.nn.SparseMoE, got {type(moe).__name__}")
        self.group, self.rank, self.world_size = resolve_group(group)
        experts = moe.experts
        if moe.num_experts % self.world_size:
            raise ValueError(
                f"num_experts ({moe.num_experts}) must be a multiple of the expert-parallel group's size "
                f"({self.world_size}): every rank holds the same number of experts"
            )
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.num_local_experts = moe.num_experts // self.world_size
        self.first_expert = self.rank * self.num_local_experts
        self.routing, self.backend = dict(moe.routing), moe.backend
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.gate, self.shared_expert, self.shared_expert_gate = moe.gate, moe.shared_expert, moe.shared_expert_gate
        with torch.device("meta"):
            local = MoEExperts(
                experts.hidden_size,
                experts.intermediate_size,
                self.num_local_experts,
                activation=experts.activation,
                gated=experts.gated,
                bias=experts.gate_up_proj_bias is not None,
                backend=experts.backend,
            )
        for name in EXPERT_TENSORS:
            full = getattr(experts, name)
            if full is not None:
                part = full.detach()[self.first_expert : self.first_expert + self.num_local_experts].clone()
                setattr(local, name, nn.Parameter(part, requires_grad=full.requires_grad))
        self.experts = local
        self.router_logits: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None
        self.stats: ExpertParallelStats | None = None
        self._check_same_layer_everywhere()

    # The routing arguments and the router losses are SparseMoE's, on this rank's tokens.
    _routing_args = SparseMoE._routing_args
    aux_loss = SparseMoE.aux_loss

    def _check_same_layer_everywhere(self) -> None:
        experts = self.experts
        layout = (
            self.num_experts,
            self.top_k,
            experts.hidden_size,
            experts.intermediate_size,
            experts.activation,
            experts.gated,
            experts.gate_up_proj_bias is not None,
            experts.gate_up_proj.dtype,
            None if self.shared_expert is None else self.shared_expert.down_proj.in_features,
            self.shared_expert_gate is not None,
            sorted(self.routing.items()),
        )
        layouts: list = [None] * self.world_size
        dist.all_gather_object(layouts, layout, group=self.group)
        if any(other != layout for other in layouts):
            differing = [r for r, other in enumerate(layouts) if other != layouts[0]]
            raise ValueError(
                f"group: the ranks' layers differ (ranks {differing} differ from rank 0: {layouts[0]} vs "
                f"{layouts[differing[0]]}); every rank of the expert-parallel group must wrap the same SparseMoE"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        weights, ids = topk_gating(logits, self.top_k, **self._routing_args(), backend=self.backend)
        experts = self.experts
        config = (experts.activation, experts.gated, experts.gate_up_proj_bias, experts.down_proj_bias)
        call = ExpertParallelCall(
            flat,
            experts.gate_up_proj,
            experts.down_proj,
            weights,
            ids,
            (self.group, self.rank, self.world_size),
            config,
            experts.backend,
        )
        self.stats = call.send()
        # The shared expert runs while the rows travel.
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        out = call.finish()
        if shared is not None:
            out = out + shared
        self.router_logits, self.topk_ids = logits, ids
        return out.reshape(shape)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank holds a copy of: router, shared expert and its gate (not the experts)."""
        experts = set(self.experts.parameters())
        return [p for p in self.parameters() if p not in experts]

    @torch.no_grad()
    def all_reduce_replicated_grads(self, *, average: bool = False) -> None:
        """Make the replicated parameters' gradients equal on every rank: one all-reduce over the group (per
        dtype) of the router's and the shared expert's gradients. A collective: call it on every rank, after
        backward.

        ``average=False``: every gradient becomes that of the sum of the ranks' losses (the expert gradients
        already are). ``average=True``: that of their mean, DDP's convention (the replicated gradients are
        averaged and the expert gradients divided by the world size).
        """
        params = [p for p in self.replicated_parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for bucket in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, group=self.group)
            if average:
                flat /= self.world_size
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                p.grad.copy_(g.view_as(p.grad))
        if average:
            for p in self.experts.parameters():
                if p.grad is not None:
                    p.grad /= self.world_size

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, world_size={self.world_size}, "
            f"local_experts=[{self.first_expert}, {self.first_expert + self.num_local_experts})"
        )
