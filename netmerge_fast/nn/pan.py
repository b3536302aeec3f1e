"""PAN (pattern attribution network, Kang et al. 2020): one per expert, a binary "is this input mine?"."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from netmerge_fast import _checks


class PAN(nn.Module):
    """MLP ``in_features -> 80 -> 60 -> 2`` with ReLU, as the seed: output ``[B, 2]`` logits, column 1 is "mine".

    The input is the expert's logits ``[B, C_i]`` (``combiner="pan_logits"``), its penultimate features
    ``[B, F_i]`` (``combiner="pan_features"``) or statistics of its logits ``[B, S]`` (``combiner="pan_statistics"``,
    with ``hidden=(80, 50, 20)``: the seed's agnostic PAN); the expert stays frozen while its PAN trains.

    Example::

        pan = PAN(5)                  # on a 5-class expert's logits
        claims = pan.claims(logits)   # [B] bool
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (80, 60)) -> None:
        super().__init__()
        self.in_features = _checks.integer("in_features", in_features, low=1)
        self.hidden = tuple(_checks.integer(f"hidden[{i}]", h, low=1) for i, h in enumerate(hidden))
        self.net = _mlp(self.in_features, self.hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"PAN input must be [B, {self.in_features}], got {list(x.shape)}")
        return self.net(x.float())

    def claims(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the "mine" logit beats the "not mine" one."""
        out = self(x)
        return out[:, 1] > out[:, 0]


def _mlp(in_features: int, hidden: tuple[int, ...], out_features: int) -> nn.Sequential:
    sizes = (in_features, *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)
