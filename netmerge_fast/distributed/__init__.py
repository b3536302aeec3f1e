"""Expert parallelism on torch.distributed: each rank holds a slice of the experts, token slots travel to their
expert's rank with an all-to-all and come back with another (NCCL on GPUs, Gloo on CPU; launch with torchrun).

- ``ExpertParallelMoE(moe, group=None)``: a ``SparseMoE`` spread over a process group.
- ``expert_parallel_experts(...)``: the functional form (``moe_experts`` with global ids over a group).
- ``shard_state_dict`` / ``gather_state_dict``: full checkpoints to ranks' shards and back.
- ``spawn``: run a function on N local processes in one group (tests, benchmarks).
"""

from netmerge_fast.distributed.experts import ExpertParallelStats, expert_parallel_experts
from netmerge_fast.distributed.launch import spawn
from netmerge_fast.distributed.layer import EXPERT_TENSORS, ExpertParallelMoE
from netmerge_fast.distributed.sharding import gather_state_dict, is_expert_key, shard_state_dict

__all__ = [
    "EXPERT_TENSORS",
    "ExpertParallelMoE",
    "ExpertParallelStats",
    "expert_parallel_experts",
    "gather_state_dict",
    "is_expert_key",
    "shard_state_dict",
    "spawn",
]
