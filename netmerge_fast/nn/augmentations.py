"""Test-time augmentations of the seed's multi-pass combiner. Each maps a batch to an augmented batch of the same
shape; the spatial ones (flip, crop, sharpen) treat the last two dimensions as the image. Randomness comes from
torch's global generator (seed it with ``torch.manual_seed`` for reproducible passes)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Augmentation = Callable[[torch.Tensor], torch.Tensor]


def gaussian_noise(x: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    return x + std * torch.randn_like(x)


def poisson_noise(x: torch.Tensor, rate: float = 0.5) -> torch.Tensor:
    """Adds Poisson(rate) shot noise, centred (minus ``rate``) so it does not shift the input's mean."""
    return x + torch.poisson(torch.full_like(x, rate)) - rate


def flip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical flip, as the seed."""
    _spatial("flip", x)
    return x.flip(-1, -2)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """A random square crop per sample (area fraction in ``scale``), resized back to the full image."""
    _spatial("random_resized_crop", x)
    images = x.reshape(-1, 1, *x.shape[-2:]).float()
    n = images.shape[0]
    side = (torch.empty(n, device=x.device).uniform_(*scale)).sqrt()
    # Affine grids crop and resize every sample at once: the crop's half-size is `side`, its centre moves within
    # what is left of [-1, 1].
    shift = (1 - side).unsqueeze(1) * (2 * torch.rand(n, 2, device=x.device) - 1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(x.shape).to(x.dtype)


def sharpen(x: torch.Tensor) -> torch.Tensor:
    """3x3 sharpening kernel (centre 5, edges -1), borders replicated."""
    _spatial("sharpen", x)
    images = x.reshape(-1, 1, *x.shape[-2:]).float()
    kernel = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 5.0, -1.0], [0.0, -1.0, 0.0]], device=x.device)
    out = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 3))
    return out.reshape(x.shape).to(x.dtype)


AUGMENTATIONS: dict[str, Augmentation] = {
    "gaussian": gaussian_noise,
    "poisson": poisson_noise,
    "flip": flip,
    "random_resized_crop": random_resized_crop,
    "sharpen": sharpen,
}


def resolve_augmentation(name: str, value: object) -> Augmentation:
    if isinstance(value, str):
        if value not in AUGMENTATIONS:
            names = ", ".join(map(repr, AUGMENTATIONS))
            raise ValueError(f"{name} must be a callable or one of {names}; got {value!r}")
        return AUGMENTATIONS[value]
    if not callable(value):
        raise TypeError(f"{name} must be a callable or an augmentation name, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _spatial(name: str, x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"{name} needs images [B, ..., H, W], got shape {list(x.shape)}")
