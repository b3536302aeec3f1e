"""The demo's experts: small MLPs on the 64 inputs (the seed used LeNet5 on 32x32 images; 8x8 inputs need less),
trained separately, each on its own domain only."""

from __future__ import annotations

import torch
from torch import nn


class Expert(nn.Module):
    """``body`` (64 -> 128 -> 64, ReLU: its output is the 64-d feature for ``pan_features``) then ``head``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_expert(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, epochs: int = 15) -> Expert:
    """SGD lr 0.01, momentum 0.9, batch 32, as the seed's experts; returns the expert in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expert = Expert(num_classes)
    optimiser = torch.optim.SGD(expert.parameters(), lr=0.01, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 32):
            rows = order[start : start + 32]
            optimiser.zero_grad()
            nn.functional.cross_entropy(expert(x[rows]), y[rows]).backward()
            optimiser.step()
    return expert.eval().requires_grad_(False)
