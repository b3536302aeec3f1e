"""netmerge-fast: fused routing, grouped expert dispatch and logit-statistics combining for mixtures of experts.

Every op takes ``backend="auto"``; ``backends()`` tells which backends this machine has and why not.
"""

from netmerge_fast._backends import BackendStatus, backends
from netmerge_fast.capacity import apply_capacity, expert_capacity
from netmerge_fast.combine import combine_logits, logit_statistics
from netmerge_fast.dispatch import moe_align, moe_experts
from netmerge_fast.grouped_linear import grouped_linear
from netmerge_fast.packed_experts import PackedExperts, pack_experts
from netmerge_fast.routing import expert_counts, load_balancing_loss, router_z_loss, topk_gating

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "PackedExperts",
    "apply_capacity",
    "backends",
    "combine_logits",
    "expert_capacity",
    "expert_counts",
    "grouped_linear",
    "load_balancing_loss",
    "logit_statistics",
    "moe_align",
    "moe_experts",
    "pack_experts",
    "router_z_loss",
    "topk_gating",
]
