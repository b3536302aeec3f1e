"""ExpertUsageTracker: how often each expert of a mixture layer is used, counted on the device (Park 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.routing import expert_counts

__all__ = ["ROUTING_SOURCES", "ExpertUsageTracker"]

# What attach() reads from a layer after its forward: "auto" takes topk_ids when the layer set it, else gate_probs.
ROUTING_SOURCES = ("auto", "topk_ids", "gate_probs")


def _decay(value: object) -> float | None:
    if value is None:
        return None
    decay = _checks.finite_real("decay", value)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be None or in (0, 1), got {decay}")
    return decay


class ExpertUsageTracker:
    """Per-expert usage counts of one mixture layer, kept as a float64 ``[E]`` tensor on the layer's device.

    ``update(topk_ids)`` adds one count per selected (token, expert) slot: ``topk_ids`` is an integer tensor of any
    shape (typically ``[T, k]``); ids of -1 (a slot routed nowhere) are not counted. ``update(gate_probs)`` adds
    the gate mass of a dense mixture: ``gate_probs`` is a floating ``[B, E]`` tensor and expert e gets
    ``gate_probs[:, e].sum()``. With ``decay`` in (0, 1) the counts are an exponential moving count,
    ``counts = decay * counts + batch_counts`` per update; with ``decay=None`` they are plain totals.

    Counting stays on the device: an update is a scatter-add (``netmerge_fast.expert_counts``) or a column sum,
    with no host synchronisation, so it can run on every training step. On CPU tensors, ids outside ``[-1, E)``
    are a ``ValueError``; on other devices that check would need a host sync, and such ids are not counted.

    ``device=None``: the counts move to the device of the first tensor given to ``update`` (or of the layer's
    parameters at ``attach``) and stay there; before that they are on the CPU. A later update from another device
    is a ``ValueError`` (moving the counts would hide a sync).

    ``attach(layer)`` registers a forward hook that calls ``update`` after every forward of ``layer`` in training
    mode (not in eval mode), reading the layer's ``topk_ids`` (``SparseMoE``, ``MixtureLayer`` with ``top_k``)
    or, when that is ``None`` or absent, its ``gate_probs`` (dense ``MixtureLayer``); ``source=`` forces one of
    them. ``detach()`` removes the hook. ``state_dict()``/``load_state_dict()`` save and resume the counts.

    Errors: ``num_experts < 1``, ``decay`` outside (0, 1), routing of the wrong shape, width or dtype
    (``ValueError``/``TypeError`` naming the argument).

    Example::

        tracker = ExpertUsageTracker(moe.num_experts).attach(moe)    # counts every training forward
        loss = task_loss(moe(x)); ...
        tracker.counts                                                # float64 [E] on moe's device
        torch.save({"model": model.state_dict(), "usage": tracker.state_dict()}, path)
    """

    def __init__(self, num_experts: int, decay: float | None = None, device: torch.device | str | None = None) -> None:
        self.num_experts = _checks.integer("num_experts", num_experts, low=1)
        self.decay = _decay(decay)
        self._bound = device is not None
        self._counts = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._source = "auto"

    @property
    def counts(self) -> torch.Tensor:
        """float64 ``[E]`` on the tracker's device: the (decayed) usage of every expert. Writing into it in place
        (``tracker.counts[c] = ...``) changes the tracker's counts."""
        return self._counts

    @property
    def device(self) -> torch.device:
        return self._counts.device

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _follow(self, value: torch.Tensor, name: str) -> None:
        if value.device == self._counts.device:
            return
        if self._bound:
            raise ValueError(
                f"{name} is on {value.device} but the tracker's counts are on {self._counts.device} "
                "(pass device= to the tracker, or keep the layer on one device)"
            )
        self._counts = self._counts.to(value.device)
        self._bound = True

    def update(self, routing: torch.Tensor) -> None:
        """Add one batch: integer ``topk_ids`` (any shape, -1 ignored) or floating ``gate_probs`` ``[B, E]``."""
        if not isinstance(routing, torch.Tensor):
            raise TypeError(
                "routing must be a torch.Tensor (integer topk_ids or floating gate_probs), "
                f"got {type(routing).__name__}"
            )
        if routing.is_floating_point():
            if routing.dim() != 2 or routing.shape[1] != self.num_experts:
                raise ValueError(
                    f"gate_probs must be [B, num_experts={self.num_experts}], got shape {list(routing.shape)}"
                )
            self._follow(routing, "gate_probs")
            batch = routing.detach().sum(0, dtype=torch.float64)
        elif routing.is_complex() or routing.dtype == torch.bool:
            raise TypeError(f"routing must be integer topk_ids or floating gate_probs, got {routing.dtype}")
        else:
            self._follow(routing, "topk_ids")
            if routing.device.type == "cpu" and routing.numel():
                low, high = (v.item() for v in torch.aminmax(routing))
                if low < -1 or high >= self.num_experts:
                    raise ValueError(
                        f"topk_ids must be in [-1, num_experts={self.num_experts}), got values in [{low}, {high}]"
                    )
            batch = expert_counts(routing, self.num_experts).to(torch.float64)
        if self.decay is not None:
            self._counts.mul_(self.decay)
        self._counts.add_(batch)

    def reset(self) -> None:
        """Set every count to 0."""
        self._counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        """``{"num_experts", "decay", "counts"}`` (``counts`` a copy, on the tracker's device)."""
        return {"num_experts": self.num_experts, "decay": self.decay, "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the counts are copied onto this tracker's device. A state of another size
        or another ``decay`` is a ``ValueError`` (its counts would mean something else)."""
        if not isinstance(state, dict) or not {"num_experts", "decay", "counts"} <= state.keys():
            raise ValueError("state must be a dict from ExpertUsageTracker.state_dict() (num_experts, decay, counts)")
        if state["num_experts"] != self.num_experts:
            raise ValueError(f"state is for num_experts={state['num_experts']}, this tracker has {self.num_experts}")
        if state["decay"] != self.decay:
            raise ValueError(f"state was counted with decay={state['decay']}, this tracker has decay={self.decay}")
        counts = _checks.tensor("state['counts']", state["counts"], dim=1, floating=True)
        if counts.shape[0] != self.num_experts:
            raise ValueError(f"state['counts'] must be [{self.num_experts}], got shape {list(counts.shape)}")
        self._counts.copy_(counts)

    def attach(self, layer: nn.Module, source: str = "auto") -> ExpertUsageTracker:
        """Count ``layer``'s routing after each of its forwards in training mode; returns the tracker.

        ``source``: ``"auto"`` (``topk_ids`` when the layer set it, else ``gate_probs``), ``"topk_ids"`` or
        ``"gate_probs"``. A layer with a ``num_experts`` attribute other than the tracker's, or without the
        routing attribute(s), is a ``ValueError``/``TypeError``; attaching twice without ``detach()`` is a
        ``RuntimeError``.
        """
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
        _checks.choice("source", source, ROUTING_SOURCES)
        if self._handle is not None:
            raise RuntimeError("the tracker is already attached to a layer; call detach() first")
        wanted = ("topk_ids", "gate_probs") if source == "auto" else (source,)
        if not any(hasattr(layer, name) for name in wanted):
            raise TypeError(
                f"layer ({type(layer).__name__}) must expose {' or '.join(wanted)} after its forward to be tracked"
            )
        layer_experts = getattr(layer, "num_experts", None)
        if isinstance(layer_experts, int) and layer_experts != self.num_experts:
            raise ValueError(f"layer has num_experts={layer_experts}, the tracker counts {self.num_experts}")
        parameter = next(layer.parameters(), None)
        if parameter is not None:
            self._follow(parameter, "layer")
        self._source = source
        self._handle = layer.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook ``attach`` registered (nothing happens if the tracker is not attached)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _routing(self, layer: nn.Module) -> torch.Tensor:
        names = ("topk_ids", "gate_probs") if self._source == "auto" else (self._source,)
        for name in names:
            value = getattr(layer, name, None)
            if value is not None:
                return value
        raise RuntimeError(f"{type(layer).__name__} set none of {', '.join(names)} in its forward")

    def _hook(self, layer: nn.Module, _inputs: Any, _output: Any) -> None:
        if layer.training:
            self.update(self._routing(layer))

    def __repr__(self) -> str:
        return f"ExpertUsageTracker(num_experts={self.num_experts}, decay={self.decay}, device={self.device})"
