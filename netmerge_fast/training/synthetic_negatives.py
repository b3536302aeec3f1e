"""Negatives for training an expert's PAN from that expert's own data alone (no other domain's data): inputs the
expert should NOT claim, synthesised from its own inputs or from the other experts' weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from netmerge_fast.nn.augmentations import random_square_crop, rotate180

NEGATIVE_KINDS = ("noise", "augment", "dream")


def noise_like(own: torch.Tensor, count: int) -> torch.Tensor:
    """Gaussian inputs with the own data's per-position mean and std: the right scale, none of the structure."""
    mean, std = own.mean(0), own.std(0)
    return mean + std * torch.randn(count, *own.shape[1:], dtype=own.dtype, device=own.device)


def heavy_augment(own: torch.Tensor, count: int) -> torch.Tensor:
    """Own inputs with the structure destroyed: half with every sample's positions shuffled (same values, no shape),
    half tiny crops blown up and flipped."""
    picks = own[torch.randint(len(own), (count,), device=own.device)]
    flat = picks.flatten(1)
    order = torch.rand(flat.shape, device=own.device).argsort(1)
    shuffled = flat.gather(1, order).view_as(picks)
    if picks.dim() < 3:
        return shuffled
    cropped = rotate180(random_square_crop(picks, scale=(0.05, 0.2)))
    half = torch.rand(count, device=own.device) < 0.5
    return torch.where(half.view(-1, *([1] * (picks.dim() - 1))), shuffled, cropped)


def dreams(own: torch.Tensor, others: Sequence[nn.Module], count: int, steps: int = 40) -> torch.Tensor:
    """Inputs that another expert is sure of: from noise, gradient ascent on another expert's log-probability of a
    random class of its own, kept within the own data's value range (a model-inversion sketch of that domain)."""
    low, high = own.min(), own.max()
    out = []
    for j, expert in enumerate(others):
        n = count // len(others) + (j < count % len(others))
        x = noise_like(own, n).requires_grad_(True)
        with torch.no_grad():
            classes = _logits(expert(x)).shape[1]
        target = torch.randint(classes, (n,), device=own.device)
        optimiser = torch.optim.Adam([x], lr=0.1)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(_logits(expert(x)), target)
            # Gradient to the input only: the expert's own .grad stays untouched.
            (x.grad,) = torch.autograd.grad(loss, x)
            optimiser.step()
            with torch.no_grad():
                x.clamp_(low, high)
        out.append(x.detach())
    return torch.cat(out)


def synthesise_negatives(
    own: torch.Tensor, kinds: Sequence[str], count: int, others: Sequence[nn.Module] = ()
) -> torch.Tensor:
    """``count`` negatives shared evenly among ``kinds`` (names from ``NEGATIVE_KINDS``)."""
    parts = []
    for k, kind in enumerate(kinds):
        n = count // len(kinds) + (k < count % len(kinds))
        if kind == "noise":
            parts.append(noise_like(own, n))
        elif kind == "augment":
            parts.append(heavy_augment(own, n))
        elif kind == "dream":
            if not others:
                raise ValueError("negatives='dream' needs other experts to dream from")
            parts.append(dreams(own, others, n))
    return torch.cat(parts)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out
