"""Layers built on the fused ops."""

from netmerge_fast.nn.sparse_moe import MoEExperts, SharedExpert, SparseMoE

__all__ = ["MoEExperts", "SharedExpert", "SparseMoE"]
