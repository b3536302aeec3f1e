"""Usage-driven expert merging (Park 2024, arXiv 2405.11530): the two most-used experts of a mixture layer are
averaged and the result is written over the least-used expert, which the router can then learn to use again.

The paper leaves open when to merge, how to weigh the average, what becomes of the router row and of the
counters. The choices here, and which are options:

- **Which experts**: a, b = the most and second most used by ``tracker.counts`` (ties: lower index); c = the least
  used of the others (ties: lower index), so c is never a or b. a and b keep their weights.
- **Weighting** (option ``weighting``): ``"uniform"``, ``W_c = (W_a + W_b) / 2``; ``"usage"``,
  ``W_c = (n_a W_a + n_b W_b) / (n_a + n_b)`` with their counts (uniform when both counts are 0). Computed in
  float64 and rounded once to the parameter's dtype, for every tensor indexed by expert (weights and biases).
- **Router row** (option ``router``): ``"mean"`` sets c's router row, router bias and selection bias (DeepSeek's
  ``e_score_correction_bias``) to the plain mean of a's and b's (whatever the weighting), so the router first
  sends c the inputs it would send a and b; ``"keep"`` leaves c's.
- **Optimizer state** (option ``optimizer``): every state tensor of the parameter's shape (SGD's
  ``momentum_buffer``, Adam/AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is zeroed at c's
  slice, for the expert tensors and the router rows. Per-parameter scalars (Adam's ``step``) are shared by all
  experts and left alone, so with Adam c's first updates after a merge are larger than usual (bias correction
  has already decayed). c's gradient slice, if one is held, is zeroed too.
- **Counters**: c's count becomes the mean of a's and b's, so c is not picked as the least used again at once;
  the others are unchanged (``ExpertMergingCallback(reset_counts=...)`` can reset the tracker instead).
- **Schedule** (``ExpertMergingCallback``): at the end of every task by default, or every n optimizer steps.

Merging reads the counts on the host (to name a, b, c): one host sync per merge, not per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.nn import SparseMoE
from netmerge_fast.training.expert_usage import ExpertUsageTracker

__all__ = [
    "COUNT_RESETS",
    "ROUTER_MODES",
    "WEIGHTINGS",
    "ExpertLayout",
    "ExpertMergingCallback",
    "MergeRecord",
    "expert_layout",
    "merge_most_used_experts",
]

WEIGHTINGS = ("uniform", "usage")
ROUTER_MODES = ("mean", "keep")
COUNT_RESETS = ("never", "merge", "task_end")


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture layer keeps each expert's tensors: the adapter ``merge_most_used_experts`` reads.

    ``experts``: names (as ``layer.named_parameters()``/``named_buffers()`` give them) of the tensors indexed by
    expert on dim 0, ``[E, ...]``: every one is merged. ``router``: names of the tensors whose entry e on dim 0 is
    expert e's routing (router weight row, router bias, selection bias): set by ``router="mean"``.

    Built in (``expert_layout``): ``SparseMoE`` (experts ``experts.gate_up_proj``, ``experts.down_proj`` and their
    biases; router ``gate.weight``, ``gate.bias``, ``gate.e_score_correction_bias`` where present) and
    ``MixtureLayer`` (experts ``expert_weight``, ``expert_bias``; router the gate's last Linear). Any other layer
    opts in by defining ``expert_layout(self) -> ExpertLayout``, or the caller passes ``layout=``.
    """

    num_experts: int
    experts: tuple[str, ...]
    router: tuple[str, ...] = ()


def _present(layer: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    tensors = _tensors(layer)
    return tuple(name for name in names if name in tensors)


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(layer.named_parameters()), **dict(layer.named_buffers())}


def _mixture_layer_class() -> type | None:
    # MixtureLayer (Deep MoE) lives in netmerge_fast.nn when that package provides it.
    import netmerge_fast.nn

    return getattr(netmerge_fast.nn, "MixtureLayer", None)


def expert_layout(layer: nn.Module) -> ExpertLayout:
    """The built-in ``ExpertLayout`` of ``layer`` (see ``ExpertLayout``); ``TypeError`` for a layer it does not
    know that defines no ``expert_layout()``."""
    if hasattr(layer, "expert_layout") and callable(layer.expert_layout):
        layout = layer.expert_layout()
        if not isinstance(layout, ExpertLayout):
            raise TypeError(f"{type(layer).__name__}.expert_layout() must return an ExpertLayout, got {layout!r}")
        return layout
    if isinstance(layer, SparseMoE):
        experts = ("experts.gate_up_proj", "experts.down_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias")
        router = ("gate.weight", "gate.bias", "gate.e_score_correction_bias")
        return ExpertLayout(layer.num_experts, _present(layer, experts), _present(layer, router))
    mixture = _mixture_layer_class()
    if mixture is not None and isinstance(layer, mixture):
        router = _present(layer, tuple(f"gate.{len(layer.gate) - 1}.{name}" for name in ("weight", "bias")))
        return ExpertLayout(layer.num_experts, ("expert_weight", "expert_bias"), router)
    raise TypeError(
        f"layer must be a SparseMoE or a MixtureLayer, or define expert_layout() -> ExpertLayout "
        f"(or pass layout=); got {type(layer).__name__}"
    )


def _resolve(layer: nn.Module, layout: ExpertLayout | None) -> tuple[ExpertLayout, dict[str, torch.Tensor]]:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
    if layout is None:
        layout = expert_layout(layer)
    elif not isinstance(layout, ExpertLayout):
        raise TypeError(f"layout must be an ExpertLayout or None, got {type(layout).__name__}")
    E = layout.num_experts
    if not layout.experts:
        raise ValueError("layout.experts must name at least one tensor indexed by expert")
    tensors = _tensors(layer)
    chosen = {}
    for name in (*layout.experts, *layout.router):
        if name not in tensors:
            raise ValueError(f"layout names {name!r}, which is not a parameter or buffer of {type(layer).__name__}")
        tensor = tensors[name]
        if tensor.dim() < 1 or tensor.shape[0] != E:
            raise ValueError(f"{name} must have num_experts={E} entries on dim 0, got shape {list(tensor.shape)}")
        chosen[name] = tensor
    return layout, chosen


@dataclass(frozen=True)
class MergeRecord:
    """One merge: experts ``merged == (a, b)`` (most and second most used) averaged with ``weights`` (of a, b) and
    written ``into == c``; ``counts`` are the tracker's counts of a, b, c just before the merge."""

    merged: tuple[int, int]
    into: int
    weights: tuple[float, float]
    counts: tuple[float, float, float]


def _choose(counts: torch.Tensor) -> tuple[int, int, int, list[float]]:
    host = counts.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"tracker.counts must be finite to pick experts, got {host.tolist()}")
    values = host.tolist()
    # Stable sorts keep the lower index first among equal counts.
    order = torch.sort(host, descending=True, stable=True).indices.tolist()
    a, b = order[0], order[1]
    rest = [e for e in range(len(values)) if e not in (a, b)]
    c = min(rest, key=lambda e: (values[e], e))
    return a, b, c, values


def _reset_optimizer_slices(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], c: int) -> None:
    for tensor in tensors:
        state = optimizer.state.get(tensor) if isinstance(tensor, nn.Parameter) else None
        for value in (state or {}).values():
            if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                value[c].zero_()


def _check_merge(
    layer: nn.Module,
    tracker: object,
    weighting: str,
    optimizer: object,
    router: str,
    layout: ExpertLayout | None,
) -> tuple[ExpertLayout, dict[str, torch.Tensor]]:
    if not isinstance(tracker, ExpertUsageTracker):
        raise TypeError(f"tracker must be an ExpertUsageTracker, got {type(tracker).__name__}")
    _checks.choice("weighting", weighting, WEIGHTINGS)
    _checks.choice("router", router, ROUTER_MODES)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    layout, tensors = _resolve(layer, layout)
    E = layout.num_experts
    if E < 3:
        raise ValueError(f"merging needs at least 3 experts (a, b and a distinct c), the layer has num_experts={E}")
    if tracker.num_experts != E:
        raise ValueError(f"tracker counts {tracker.num_experts} experts, the layer has num_experts={E}")
    return layout, tensors


@torch.no_grad()
def merge_most_used_experts(
    layer: nn.Module,
    tracker: ExpertUsageTracker,
    weighting: str = "uniform",
    optimizer: torch.optim.Optimizer | None = None,
    router: str = "mean",
    *,
    layout: ExpertLayout | None = None,
) -> MergeRecord:
    """Average the two most-used experts a, b of ``layer`` and write the result over the least-used expert c.

    See the module docstring for every choice: ``weighting`` ``"uniform"`` or ``"usage"``; ``router`` ``"mean"``
    or ``"keep"``; with ``optimizer``, c's slices of the optimizer state are zeroed; c's count in ``tracker`` is
    set to the mean of a's and b's. Works in place on ``layer``'s tensors (the same ``Parameter`` objects, so an
    optimizer holding them keeps working). ``layout``: the layer's ``ExpertLayout`` (default: ``expert_layout``).

    Returns a ``MergeRecord`` with ``merged == (a, b)`` and ``into == c``.

    Errors (``ValueError``): fewer than 3 experts, a tracker of another size, an unknown ``weighting`` or
    ``router``, non-finite counts, a layout naming tensors the layer lacks or with another dim 0.
    ``TypeError``: a layer that is not a ``SparseMoE``/``MixtureLayer`` and has no layout, a tracker or optimizer
    of the wrong type.

    Example::

        record = merge_most_used_experts(moe, tracker, optimizer=opt)
        record.merged, record.into        # (a, b), c
    """
    layout, tensors = _check_merge(layer, tracker, weighting, optimizer, router, layout)
    a, b, c, counts = _choose(tracker.counts)
    total = counts[a] + counts[b]
    w_a, w_b = (counts[a] / total, counts[b] / total) if weighting == "usage" and total > 0 else (0.5, 0.5)

    def combine(tensor: torch.Tensor, left: float, right: float) -> None:
        merged = left * tensor[a].double() + right * tensor[b].double()
        tensor[c] = merged.to(tensor.dtype)
        if tensor.grad is not None:
            tensor.grad[c] = 0

    for name in layout.experts:
        combine(tensors[name], w_a, w_b)
    if router == "mean":
        for name in layout.router:
            combine(tensors[name], 0.5, 0.5)
    if optimizer is not None:
        _reset_optimizer_slices(optimizer, [tensors[n] for n in (*layout.experts, *layout.router)], c)
    tracker.counts[c] = (tracker.counts[a] + tracker.counts[b]) / 2
    return MergeRecord((a, b), c, (w_a, w_b), (counts[a], counts[b], counts[c]))


class ExpertMergingCallback:
    """When to call ``merge_most_used_experts`` in a plain training loop.

    Call ``step()`` after every optimizer step and ``task_end()`` at the end of every task (in a task-incremental
    sequence, at the boundary before the next task). Defaults: no merging on steps (``every_n_steps=None``), one
    merge at every ``task_end()`` (``at_task_end=True``). With ``every_n_steps=n``, ``step()`` merges after steps
    n, 2n, ... (counted from construction or the last ``load_state_dict``). Both can be on at once.

    ``weighting``, ``optimizer``, ``router``, ``layout``: passed to ``merge_most_used_experts``.
    ``reset_counts``: ``"never"`` (default: the tracker keeps counting, c's count set to the mean of a's and b's),
    ``"merge"`` (``tracker.reset()`` after every merge) or ``"task_end"`` (after every ``task_end()``, merged or
    not). ``step()`` and ``task_end()`` return the ``MergeRecord`` of a merge they made, else ``None``;
    ``history`` lists every record. ``state_dict()``/``load_state_dict()`` keep the step count and history.

    Example::

        tracker = ExpertUsageTracker(moe.num_experts).attach(moe)
        merging = ExpertMergingCallback(moe, tracker, optimizer=opt)
        for task in tasks:
            for x, y in task:
                loss(model(x), y).backward(); opt.step(); opt.zero_grad()
                merging.step()
            merging.task_end()
    """

    def __init__(
        self,
        layer: nn.Module,
        tracker: ExpertUsageTracker,
        every_n_steps: int | None = None,
        at_task_end: bool = True,
        *,
        weighting: str = "uniform",
        optimizer: torch.optim.Optimizer | None = None,
        router: str = "mean",
        reset_counts: str = "never",
        layout: ExpertLayout | None = None,
    ) -> None:
        if every_n_steps is not None:
            _checks.integer("every_n_steps", every_n_steps, low=1)
        _check_merge(layer, tracker, weighting, optimizer, router, layout)
        self.layer, self.tracker, self.layout = layer, tracker, layout
        self.every_n_steps, self.at_task_end = every_n_steps, _checks.boolean("at_task_end", at_task_end)
        self.weighting, self.optimizer, self.router = weighting, optimizer, router
        self.reset_counts = _checks.choice("reset_counts", reset_counts, COUNT_RESETS)
        self.steps = 0
        self.history: list[MergeRecord] = []

    def merge(self) -> MergeRecord:
        """Merge now (whatever the schedule)."""
        record = merge_most_used_experts(
            self.layer, self.tracker, self.weighting, self.optimizer, self.router, layout=self.layout
        )
        self.history.append(record)
        if self.reset_counts == "merge":
            self.tracker.reset()
        return record

    def step(self) -> MergeRecord | None:
        self.steps += 1
        if self.every_n_steps is not None and self.steps % self.every_n_steps == 0:
            return self.merge()
        return None

    def task_end(self) -> MergeRecord | None:
        record = self.merge() if self.at_task_end else None
        if self.reset_counts == "task_end":
            self.tracker.reset()
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"steps", "history"} <= state.keys():
            raise ValueError("state must be a dict from ExpertMergingCallback.state_dict() (steps, history)")
        self.steps = _checks.integer("state['steps']", state["steps"], low=0)
        self.history = [
            MergeRecord(tuple(r["merged"]), r["into"], tuple(r["weights"]), tuple(r["counts"]))
            for r in state["history"]
        ]
