"""Test-time augmentations of the seed's multi-pass combiner (cwkang1998/network-merging, ``augments.py``). Each maps
a batch to an augmented batch of the same shape; the spatial ones treat the last two dimensions as the image and
draw one set of parameters per sample (shared by its channels). Randomness comes from torch's global generator
(seed it with ``torch.manual_seed`` for reproducible passes); nothing syncs with the host.

The seed's passes, as it runs them: ``gaussian_noise`` (``x + std * N(0, 1)``), ``poisson_noise``
(``x + clamp(Poisson(rate), 0, 1)``), ``horizontal_flip`` and ``vertical_flip`` (two separate passes),
``random_resized_crop`` (torchvision's ``RandomResizedCrop`` sampling, scale 0.08-1, ratio 3/4-4/3, bilinear resize
back to the image size) and ``sharpen`` (imgaug's ``Sharpen(alpha=0.5)``). One difference on purpose: the seed
sends flips, crops and sharpening through 8-bit PIL images (``ToPILImage``: ``x * 255`` cast to uint8), which
wraps the negative values of normalised inputs around; these work on the tensor's values, unquantised.
``SEED_CONFIGURATIONS`` holds the seed's ten pass lists.

The project's own (not the seed's): ``rotate180`` (both flips in one pass) and ``random_square_crop``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Augmentation = Callable[[torch.Tensor], torch.Tensor]


def gaussian_noise(x: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """``x + std * N(0, 1)``, as the seed."""
    return x + std * torch.randn_like(x)


def poisson_noise(x: torch.Tensor, rate: float = 0.5) -> torch.Tensor:
    """``x + clamp(Poisson(rate), 0, 1)``, as the seed: each value gains 1 with probability ``1 - exp(-rate)``."""
    return x + torch.poisson(torch.full_like(x, rate, dtype=torch.float32)).clamp_(0, 1).to(x.dtype)


def horizontal_flip(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror (the seed's ``RandomHorizontalFlip(p=1)`` pass)."""
    _spatial("horizontal_flip", x)
    return x.flip(-1)


def vertical_flip(x: torch.Tensor) -> torch.Tensor:
    """Top-bottom mirror (the seed's ``RandomVerticalFlip(p=1)`` pass)."""
    _spatial("vertical_flip", x)
    return x.flip(-2)


def random_resized_crop_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop boxes ``(top, left, h, w)``, int64 ``[batch]`` each, drawn as torchvision's
    ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio
    log-uniform in ``ratio``, the side lengths rounded; the first try that fits the image wins and its corner is
    uniform; if none fits, the largest central crop within ``ratio``. Vectorised over the batch (all 10 tries are
    drawn for every sample), so the random stream is not torchvision's."""
    if not 0 <= scale[0] <= scale[1]:
        raise ValueError(f"scale must be (low, high) with 0 <= low <= high, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
    tries = 10
    area = height * width
    target = area * torch.empty(batch, tries, device=device).uniform_(*scale)
    log_ratio = torch.empty(batch, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round().long()
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # index of the first fitting try (0 if none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, or its largest central crop whose ratio is in range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    any_fits = fits.any(1)
    w = torch.where(any_fits, w, fw)
    h = torch.where(any_fits, h, fh)
    u = torch.rand(batch, 2, device=device)
    top = torch.where(any_fits, torch.minimum((u[:, 0] * (height - h + 1)).long(), height - h), (height - fh) // 2)
    left = torch.where(any_fits, torch.minimum((u[:, 1] * (width - w + 1)).long(), width - w), (width - fw) // 2)
    return top, left, h, w


def resized_crop(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Each sample's box ``(top[b], left[b], h[b], w[b])`` resized back to the image size by bilinear interpolation
    with half-pixel centres, the box's edge pixels repeated beyond it (as ``F.interpolate(crop, (H, W),
    mode="bilinear", align_corners=False)`` of every crop, and PIL's bilinear up-sampling)."""
    _spatial("resized_crop", x)
    height, width = x.shape[-2:]
    images = x.reshape(x.shape[0], math.prod(x.shape[1:-2]), height, width).to(_compute_dtype(x))
    rows = _source_taps(top, h, height)
    cols = _source_taps(left, w, width)
    n, m = images.shape[:2]

    def pick_rows(index):
        return images.gather(2, index[:, None, :, None].expand(n, m, height, width))

    def pick_cols(part, index):
        return part.gather(3, index[:, None, None, :].expand(n, m, height, width))

    (r0, r1, wr), (c0, c1, wc) = rows, cols
    wr, wc = wr[:, None, :, None].to(images.dtype), wc[:, None, None, :].to(images.dtype)
    top_rows, bottom_rows = pick_rows(r0), pick_rows(r1)
    upper = pick_cols(top_rows, c0) * (1 - wc) + pick_cols(top_rows, c1) * wc
    lower = pick_cols(bottom_rows, c0) * (1 - wc) + pick_cols(bottom_rows, c1) * wc
    return (upper * (1 - wr) + lower * wr).reshape(x.shape).to(x.dtype)


def _source_taps(start: torch.Tensor, size: torch.Tensor, out: int):
    """For every output position: the two source indices (absolute) and the weight of the second."""
    position = torch.arange(out, device=start.device, dtype=torch.float32)
    scale = size.float().unsqueeze(1) / out
    source = ((position + 0.5) * scale - 0.5).clamp_min(0)
    low = source.floor()
    weight = source - low
    low = low.long()
    high = torch.minimum(low + 1, size.unsqueeze(1) - 1)
    return start.unsqueeze(1) + low, start.unsqueeze(1) + high, weight


def random_resized_crop(
    x: torch.Tensor, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` with the seed's (default) ranges, resized back to the image's size."""
    _spatial("random_resized_crop", x)
    return resized_crop(x, *random_resized_crop_params(x.shape[0], *x.shape[-2:], scale, ratio, x.device))


def sharpen(x: torch.Tensor, alpha: float = 0.5, lightness: float | tuple[float, float] = (0.8, 1.2)) -> torch.Tensor:
    """imgaug's ``Sharpen``: the 3x3 kernel ``(1 - alpha) * identity + alpha * [[-1, -1, -1], [-1, 8 + L, -1],
    [-1, -1, -1]]`` with the lightness ``L`` drawn per sample (uniform in ``lightness``, imgaug's default 0.8-1.2,
    or fixed), borders reflected without repeating the edge (OpenCV's default ``BORDER_REFLECT_101``). The seed
    calls it with alpha 0.5 (its ``alpha`` argument is ignored: every sharpen pass of the seed uses 0.5)."""
    _spatial("sharpen", x)
    if min(x.shape[-2:]) < 2:
        raise ValueError(f"sharpen needs images of at least 2x2, got {list(x.shape[-2:])}")
    height, width = x.shape[-2:]
    images = x.reshape(-1, 1, height, width).to(_compute_dtype(x))
    per_sample = images.shape[0] // x.shape[0] if x.shape[0] else 1
    if isinstance(lightness, tuple):
        light = torch.empty(x.shape[0], device=x.device).uniform_(*lightness)
    else:
        light = torch.full((x.shape[0],), float(lightness), device=x.device)
    light = light.repeat_interleave(per_sample).view(-1, 1, 1, 1).to(images.dtype)
    ones = torch.ones(1, 1, 3, 3, device=x.device, dtype=images.dtype)
    box = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), ones)
    # centre weight (1 - a) + a (8 + L), the 8 neighbours -a: written with the 3x3 sum, which includes the centre
    out = (1 + alpha * (8 + light)) * images - alpha * box
    return out.reshape(x.shape).to(x.dtype)


def rotate180(x: torch.Tensor) -> torch.Tensor:
    """The project's own: both flips in one pass (a 180 degree rotation)."""
    _spatial("rotate180", x)
    return x.flip(-1, -2)


def random_square_crop(x: torch.Tensor, scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """The project's own: a random square crop per sample (side fraction = sqrt of an area fraction uniform in
    ``scale``), resized back to the full image by bilinear sampling with replicated borders."""
    _spatial("random_square_crop", x)
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


AUGMENTATIONS: dict[str, Augmentation] = {
    "gaussian": gaussian_noise,
    "poisson": poisson_noise,
    "horizontal_flip": horizontal_flip,
    "vertical_flip": vertical_flip,
    "random_resized_crop": random_resized_crop,
    "sharpen": sharpen,
    "rotate180": rotate180,
    "random_square_crop": random_square_crop,
}

_SWEEP = (0.05, 0.1, 0.3, 0.5, 0.7, 1.0)
# The seed's ten multi-pass configurations (mnist/__init__.py, AUGS), each run on its own, the plain pass added by
# the combiner. Its "diff alpha sharpen" asks for alphas 0.1-0.9 but apply_sharpen ignores them: five passes at 0.5.
SEED_CONFIGURATIONS: dict[str, list[Augmentation]] = {
    "sharpen": [sharpen],
    "sharpen_x5": [sharpen] * 5,
    "gauss": [gaussian_noise],
    "gauss_x5": [gaussian_noise] * 5,
    "gauss_std_sweep": [partial(gaussian_noise, std=s) for s in _SWEEP],
    "poisson": [poisson_noise],
    "poisson_x5": [poisson_noise] * 5,
    "poisson_rate_sweep": [partial(poisson_noise, rate=r) for r in _SWEEP],
    "hvflip": [horizontal_flip, vertical_flip],
    "random_crop": [random_resized_crop],
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, float64 kept."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def _spatial(name: str, x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"{name} needs images [B, ..., H, W], got shape {list(x.shape)}")
