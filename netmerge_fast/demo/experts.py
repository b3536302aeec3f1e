"""The demo's experts, trained separately, each on its own domain only: small MLPs on the 64 inputs of the digits
problems, the seed's LeNet5 on 32x32 MNIST, and (for the evaluation of the universal gate on experts it never saw)
other MLPs and small CNNs trained with other recipes."""

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


class LeNet5(nn.Module):
    """The seed's LeNet5 on ``[B, 1, 32, 32]``: conv 6@5x5, pool, conv 16@5x5, pool, conv 120@5x5 (``body``: the
    120-d feature), then fc 84 and fc ``num_classes`` (``head``); ReLU after every layer but the last."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MLP(nn.Module):
    """``in_features -> hidden -> num_classes`` with ReLU (``body``: the hidden layers)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip((in_features, *hidden[:-1]), hidden, strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (8 and 16 channels, ReLU), 2x2 max-pool, fc 32, fc ``num_classes``, on
    ``[B, 1, H, W]`` with even H and W."""

    def __init__(self, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * (h // 2) * (w // 2), 32), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    *,
    optimizer: str = "sgd",
    lr: float = 0.01,
    batch_size: int = 32,
    epochs: int | None = 15,
    steps: int | None = None,
) -> nn.Module:
    """Cross-entropy training on ``(x, y)``: ``optimizer`` ``"sgd"`` (momentum 0.9, the seed's) or ``"adam"``;
    ``epochs`` passes over shuffled batches, or exactly ``steps`` batches (epochs repeated as needed). Batches are
    drawn from ``seed``; returns the model in eval mode with gradients off."""
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    total = steps if steps is not None else epochs * -(-len(x) // batch_size)
    done = 0
    model.train()
    while done < total:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            if done == total:
                break
            rows = order[start : start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
            done += 1
    return model.eval().requires_grad_(False)


def seeded(factory, seed: int) -> nn.Module:
    """``factory()`` with its weights drawn from ``seed`` (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def train_expert(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, epochs: int = 15) -> Expert:
    """The digits problems' MLP: SGD lr 0.01, momentum 0.9, batch 32; returns the expert in eval mode."""
    return fit_classifier(seeded(lambda: Expert(num_classes), seed), x, y, seed, epochs=epochs)


def train_lenet5(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, epochs: int = 10) -> LeNet5:
    """The seed's recipe: SGD lr 0.01, momentum 0.9, batch 512 (``epochs``: the seed's 10 by default)."""
    return fit_classifier(seeded(lambda: LeNet5(num_classes), seed), x, y, seed, batch_size=512, epochs=epochs)
