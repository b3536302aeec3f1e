"""Training: GatingTrainer fits a HeterogeneousMoE's gates (PANs, the universal gate), with or without data from
the other experts' domains."""

from netmerge_fast.training.expert_merging import (
    ExpertLayout,
    ExpertMergingCallback,
    MergeRecord,
    expert_layout,
    merge_most_used_experts,
)
from netmerge_fast.training.expert_usage import ExpertUsageTracker
from netmerge_fast.training.gating_trainer import GateEvaluation, GatingTrainer

__all__ = ["GateEvaluation", "GatingTrainer"]
# Usage-driven expert merging (Park 2024).
__all__ += [
    "ExpertLayout",
    "ExpertMergingCallback",
    "ExpertUsageTracker",
    "MergeRecord",
    "expert_layout",
    "merge_most_used_experts",
]
