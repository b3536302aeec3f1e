"""Training: GatingTrainer fits a HeterogeneousMoE's gates (PANs, the universal gate), with or without data from
the other experts' domains."""

from netmerge_fast.training.gating_trainer import GateEvaluation, GatingTrainer

__all__ = ["GateEvaluation", "GatingTrainer"]
