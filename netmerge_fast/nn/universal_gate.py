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

# Features derived from the raw statistics and the expert's class count C, so that one gate reads 2-class and
# 10-class experts on the same scale (raw mean/std/max of logits shift with C, and a gate trained on 5-class
# experts then misreads 2-class ones). Each: (raw statistics it needs, function of those and C).
DERIVED_FEATURES = {
    # max softmax probability rescaled from [1/C, 1] to [0, 1]: 0 = uniform, 1 = certain (1 when C = 1)
    "max_prob_norm": (
        ("max_prob",),
        lambda s, c: torch.where(c > 1, (s["max_prob"] - 1 / c) / (1 - 1 / c).clamp_min(1e-12), 1.0),
    ),
    # softmax entropy over log C, in [0, 1] (0 when C = 1)
    "entropy_norm": (("entropy",), lambda s, c: torch.where(c > 1, s["entropy"] / c.log().clamp_min(1e-12), 0.0)),
    # how far the top logit stands above the typical one (C-independent in scale, unlike max or mean)
    "max_minus_median": (("max", "median"), lambda s, c: s["max"] - s["median"]),
}
FEATURES = (*STATISTICS, *DERIVED_FEATURES)
DEFAULT_FEATURES = ("max_prob_norm", "entropy_norm", "margin", "max_minus_median")


class UniversalGate(nn.Module):
    """MLP ``len(stats) -> 80 -> 50 -> 20 -> 2`` (ReLU) on per-expert features of its logits.

    Args:
        stats: the gate's input features, in order: names from ``netmerge_fast.combine.STATISTICS`` (raw
            statistics computed by ``logit_statistics``) or from ``DERIVED_FEATURES``, which also use the
            expert's class count C: ``"max_prob_norm"`` ((max_prob - 1/C) / (1 - 1/C)), ``"entropy_norm"``
            (entropy / log C), ``"max_minus_median"``. The default, ``("max_prob_norm", "entropy_norm",
            "margin", "max_minus_median")``, is on the same scale for any C, so a gate trained on 5-class
            experts transfers to 2- or 10-class ones; the paper's ``("mean", "std", "max")`` (the follow-up
            adds ``"min"``, ``"median"``) is not (raw logit statistics shift with C).
        hidden: hidden layer widths.

    ``forward(features [..., S]) -> [..., 2]`` logits (e.g. ``[B, E, S] -> [B, E, 2]``; column 1: "mine").
    ``statistics(logits, class_counts)`` computes the ``[B, E, S]`` features (differentiable);
    ``scores(logits, class_counts)`` takes the experts' logits and returns the ``[B, E]`` log-odds of "mine",
    the ``gate`` for ``combine_logits(method="gate")``.

    Example::

        gate = UniversalGate.pretrained()                       # bundled, trained on the project's experts
        winner = gate.scores([logits_a, logits_b]).argmax(1)
    """

    def __init__(self, stats: Sequence[str] = DEFAULT_FEATURES, hidden: Sequence[int] = (80, 50, 20)) -> None:
        super().__init__()
        if isinstance(stats, str) or not isinstance(stats, Sequence) or not stats:
            raise TypeError(f"stats must be a non-empty sequence of statistic names, got {stats!r}")
        self.stats = tuple(_checks.choice("stats", s, FEATURES) for s in stats)
        self.hidden = tuple(_checks.integer(f"hidden[{i}]", h, low=1) for i, h in enumerate(hidden))
        # the raw statistics to compute, each once, in first-use order
        needed = [r for s in self.stats for r in (DERIVED_FEATURES[s][0] if s in DERIVED_FEATURES else (s,))]
        self._raw = tuple(dict.fromkeys(needed))
        self.net = _mlp(len(self.stats), self.hidden, 2)

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        if statistics.dim() < 1 or statistics.shape[-1] != len(self.stats):
            shape = list(statistics.shape)
            raise ValueError(f"statistics must be [..., {len(self.stats)}] ({self.stats}), got {shape}")
        return self.net(statistics.float())

    def statistics(self, logits, class_counts=None) -> torch.Tensor:
        """``[B, E, S]``: the features named in ``stats`` for every expert's logits (as ``logit_statistics``)."""
        raw = logit_statistics(logits, class_counts, stats=self._raw)
        if not any(s in DERIVED_FEATURES for s in self.stats):
            return raw
        if class_counts is None:  # a list of [B, C_i] tensors (logit_statistics has checked it)
            class_counts = [t.shape[-1] for t in logits]
        counts = torch.as_tensor(class_counts, device=raw.device).to(raw.dtype)  # [E], broadcasts over B
        named = dict(zip(self._raw, raw.unbind(-1), strict=True))
        columns = [DERIVED_FEATURES[s][1](named, counts) if s in DERIVED_FEATURES else named[s] for s in self.stats]
        return torch.stack(columns, -1)

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
