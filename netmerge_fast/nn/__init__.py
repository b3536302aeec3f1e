"""Modules: SparseMoE (the routed layer), HeterogeneousMoE (merging pre-trained classifiers) and its gating
networks, PAN and UniversalGate."""

from netmerge_fast.nn.heterogeneous_moe import COMBINERS, HeterogeneousMoE
from netmerge_fast.nn.mixture import DeepMoE, MixtureLayer
from netmerge_fast.nn.pan import PAN
from netmerge_fast.nn.sparse_moe import MoEExperts, RouterStats, SharedExpert, SparseMoE
from netmerge_fast.nn.universal_gate import UniversalGate

__all__ = ["COMBINERS", "PAN", "HeterogeneousMoE", "MoEExperts", "SharedExpert", "SparseMoE", "UniversalGate"]
__all__ += ["DeepMoE", "MixtureLayer"]  # Eigen et al.: stacked gated mixture layers
__all__ += ["RouterStats"]  # SparseMoE's per-call routing statistics
