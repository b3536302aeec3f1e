"""The universal (expert-agnostic) gate of Kang, Hong & Maul: one MLP on statistics of an expert's logits, shared
by every expert, so it applies to experts it never saw; the expert with the highest "mine" score wins."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.combine import STATISTICS, logit_statistics
from netmerge_fast.nn.gate_files import check_config, load_gates, save_gates
from netmerge_fast.nn.pan import _mlp

PRETRAINED_FILE = "universal_gate.safetensors"


class UniversalGate(nn.Module):
    """MLP ``len(stats) -> 80 -> 50 -> 20 -> 2`` (ReLU) on per-expert logit statistics.

    Args:
        stats: names from ``netmerge_fast.combine.STATISTICS``, computed by ``logit_statistics`` (default the
            paper's ``("mean", "std", "max")``; the follow-up adds ``"min"`` and ``"median"``).
        hidden: hidden layer widths.

    ``forward(statistics [..., S]) -> [..., 2]`` logits (e.g. ``[B, E, S] -> [B, E, 2]``; column 1: "mine").
    ``scores(logits, class_counts)`` takes the experts' logits and returns the ``[B, E]`` log-odds of "mine",
    the ``gate`` for ``combine_logits(method="gate")``.

    Example::

        gate = UniversalGate.pretrained()                       # bundled, trained on the project's experts
        winner = gate.scores([logits_a, logits_b]).argmax(1)
    """

    def __init__(self, stats: Sequence[str] = ("mean", "std", "max"), hidden: Sequence[int] = (80, 50, 20)) -> None:
        super().__init__()
        if isinstance(stats, str) or not isinstance(stats, Sequence) or not stats:
            raise TypeError(f"stats must be a non-empty sequence of statistic names, got {stats!r}")
        self.stats = tuple(_checks.choice("stats", s, STATISTICS) for s in stats)
        self.hidden = tuple(_checks.integer(f"hidden[{i}]", h, low=1) for i, h in enumerate(hidden))
        self.net = _mlp(len(self.stats), self.hidden, 2)

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        if statistics.dim() < 1 or statistics.shape[-1] != len(self.stats):
            shape = list(statistics.shape)
            raise ValueError(f"statistics must be [..., {len(self.stats)}] ({self.stats}), got {shape}")
        return self.net(statistics.float())

    def statistics(self, logits, class_counts=None) -> torch.Tensor:
        return logit_statistics(logits, class_counts, stats=self.stats)

    def scores(self, logits, class_counts=None) -> torch.Tensor:
        out = self(self.statistics(logits, class_counts))
        return out[..., 1] - out[..., 0]

    def config(self) -> dict:
        return {"kind": "universal", "stats": list(self.stats), "hidden": list(self.hidden)}

    def save(self, path: str | os.PathLike) -> None:
        save_gates(path, self.state_dict(), self.config())

    @classmethod
    def load(cls, path: str | os.PathLike, stats: Sequence[str] | None = None) -> UniversalGate:
        """A saved gate; with ``stats``, refuse a gate trained on other statistics (``ValueError``)."""
        state, config = load_gates(path)
        check_config(path, config, {"kind": "universal"} | ({"stats": list(stats)} if stats is not None else {}))
        gate = cls(config["stats"], config["hidden"])
        gate.load_state_dict(state)
        return gate

    @classmethod
    def pretrained(cls, stats: Sequence[str] | None = None) -> UniversalGate:
        """The gate bundled with the package (``python -m netmerge_fast.demo.train_universal_gate`` rebuilds it)."""
        with resources.as_file(resources.files("netmerge_fast.nn") / PRETRAINED_FILE) as path:
            return cls.load(path, stats)
