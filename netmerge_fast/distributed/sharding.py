"""Checkpoints for expert parallelism: cut a full state dict into ranks' shards, and gather the shards back."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.distributed.layer import EXPERT_TENSORS, ExpertParallelMoE

__all__ = ["gather_state_dict", "is_expert_key", "shard_state_dict"]


def is_expert_key(key: str) -> bool:
    """Whether a state dict key is a stacked ``[E, ...]`` expert tensor: its name is one of ``EXPERT_TENSORS``
    and its module is called ``experts`` (``SparseMoE``'s ``experts.gate_up_proj``, Hugging Face transformers
    5's ``model.layers.3.mlp.experts.down_proj``, GPT-OSS's ``...experts.gate_up_proj_bias``; not DeepSeek's
    ``shared_experts``)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] in EXPERT_TENSORS and parts[-2] == "experts"


def shard_state_dict(full_state_dict: Mapping[str, torch.Tensor], rank: int, world_size: int) -> dict:
    """The state dict of ``rank`` of ``world_size`` expert-parallel ranks, from a full one.

    Expert tensors (``is_expert_key``: ``SparseMoE`` and Hugging Face experts modules) keep their contiguous slice
    ``[rank * E / world_size, (rank + 1) * E / world_size)`` along dim 0, copied (so saving the shard does not
    save the whole); every other entry (router, selection bias, shared expert, the rest of a model) is passed
    through as the same tensor. Load the result with ``ExpertParallelMoE.load_state_dict``.

    Errors: ``ValueError`` when rank is outside ``[0, world_size)`` or an expert tensor's E is not a multiple of
    world_size (naming the key); ``TypeError`` for a non-mapping or non-tensor expert entry.

    Example::

        layer.load_state_dict(shard_state_dict(torch.load("moe.pt"), rank, world_size))
    """
    if not isinstance(full_state_dict, Mapping):
        raise TypeError(f"full_state_dict must be a mapping of names to tensors, got {type(full_state_dict).__name__}")
    _checks.integer("world_size", world_size, low=1)
    _checks.integer("rank", rank, low=0, high=world_size - 1)
    shard = {}
    for key, value in full_state_dict.items():
        if not is_expert_key(key):
            shard[key] = value
            continue
        _checks.tensor(key, value)
        num_experts = value.shape[0] if value.dim() else 0
        if value.dim() == 0 or num_experts % world_size:
            raise ValueError(
                f"{key}: {num_experts} experts (dim 0 of {list(value.shape)}) cannot be split evenly over "
                f"world_size={world_size} ranks"
            )
        per_rank = num_experts // world_size
        shard[key] = value[rank * per_rank : (rank + 1) * per_rank].clone()
    return shard


def gather_state_dict(module: nn.Module, *, device: torch.device | str | None = None) -> dict:
    """The full state dict of a module holding ``ExpertParallelMoE`` layers (the layer itself, or a model with
    them), on every rank: each layer's expert tensors are all-gathered over its group and concatenated along
    dim 0, so the result loads into the single-process model (``SparseMoE.load_state_dict``).

    A collective: every rank of each layer's group must call it. The gather runs one tensor at a time on the
    parameters' device; ``device`` (e.g. ``"cpu"``) moves each gathered tensor there before the next, so only one
    full expert tensor is on the accelerator at a time.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    state = module.state_dict()
    for name, layer in module.named_modules():
        if not isinstance(layer, ExpertParallelMoE):
            continue
        prefix = f"{name}.experts." if name else "experts."
        for tensor_name in EXPERT_TENSORS:
            key = prefix + tensor_name
            if key not in state:
                continue
            local = state[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(layer.world_size)]
            dist.all_gather(parts, local, group=layer.group)
            full = torch.cat(parts)
            state[key] = full if device is None else full.to(device)
    if device is not None:
        state = {key: value.to(device) for key, value in state.items()}
    return state
