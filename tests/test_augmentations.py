"""The seed's test-time augmentations against hand-computed outputs and independent loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from netmerge_fast.nn.augmentations import (
    AUGMENTATIONS,
    SEED_CONFIGURATIONS,
    gaussian_noise,
    horizontal_flip,
    poisson_noise,
    random_resized_crop,
    random_resized_crop_params,
    resized_crop,
    rotate180,
    sharpen,
    vertical_flip,
)


def test_gaussian_noise_adds_scaled_standard_normal_noise(gen):
    x = torch.randn(4, 1, 5, 5, generator=gen)
    torch.manual_seed(3)
    got = gaussian_noise(x, std=0.3)
    torch.manual_seed(3)
    torch.testing.assert_close(got, x + 0.3 * torch.randn_like(x))


def test_poisson_noise_adds_clamped_poisson_counts(gen):
    x = torch.randn(2000, 1, 8, 8, generator=gen)
    torch.manual_seed(5)
    got = poisson_noise(x, rate=0.7)
    torch.manual_seed(5)
    want = x + torch.poisson(torch.full_like(x, 0.7)).clamp(0, 1)
    torch.testing.assert_close(got, want)
    added = got - x
    assert set(added.round().unique().tolist()) <= {0.0, 1.0}
    # P(Poisson(0.7) >= 1) = 1 - exp(-0.7); 128,000 draws put the mean within 0.01 of it
    assert abs(added.mean().item() - (1 - math.exp(-0.7))) < 0.01
    torch.testing.assert_close(poisson_noise(x, rate=0.0), x)


def test_flips_are_two_separate_passes():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    torch.testing.assert_close(horizontal_flip(x), torch.tensor([[[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]]]))
    torch.testing.assert_close(vertical_flip(x), torch.tensor([[[[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]]]))
    torch.testing.assert_close(rotate180(x), torch.tensor([[[[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]]]))
    assert SEED_CONFIGURATIONS["hvflip"] == [horizontal_flip, vertical_flip]


def test_resized_crop_by_hand():
    # the 2x2 box at (1, 1) of a 4x4 image, up-sampled to 4x4: along each axis the outputs sample the box at
    # -0.25 (clamped to 0), 0.25, 0.75 and 1.25 (clamped to 1) box pixels
    x = torch.arange(16.0).view(1, 1, 4, 4)
    box = torch.tensor([[5.0, 6.0], [9.0, 10.0]])
    weights = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])  # [out, box pixel]
    want = weights @ box @ weights.T
    one = torch.tensor([1])
    got = resized_crop(x, one, one, 2 * one, 2 * one)
    torch.testing.assert_close(got[0, 0], want)
    # the whole image is the identity
    full = resized_crop(x, 0 * one, 0 * one, 4 * one, 4 * one)
    torch.testing.assert_close(full, x)


def test_resized_crop_matches_interpolate_of_each_crop(gen):
    x = torch.randn(12, 2, 9, 7, generator=gen)
    torch.manual_seed(0)
    top, left, h, w = random_resized_crop_params(12, 9, 7)
    got = resized_crop(x, top, left, h, w)
    for b in range(12):
        t, lf, hh, ww = (int(v[b]) for v in (top, left, h, w))
        crop = x[b : b + 1, :, t : t + hh, lf : lf + ww]
        want = F.interpolate(crop, size=(9, 7), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)


def test_random_resized_crop_params_follow_torchvision():
    torch.manual_seed(1)
    top, left, h, w = random_resized_crop_params(4000, 32, 32)
    assert ((h >= 1) & (h <= 32) & (w >= 1) & (w <= 32)).all()
    assert ((top >= 0) & (top + h <= 32) & (left >= 0) & (left + w <= 32)).all()
    # the side lengths are rounded from an area fraction in [0.08, 1] and a ratio in [3/4, 4/3]
    area = (h * w).float() / 1024
    assert area.min() > 0.08 * 0.7 and area.max() <= 1
    large = torch.minimum(h, w) >= 8  # rounding to whole pixels moves the ratio by at most 15% there
    ratio = w[large].float() / h[large].float()
    assert ratio.max() <= 4 / 3 * 1.15 and ratio.min() >= 3 / 4 / 1.15
    assert len(set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist(), strict=True))) > 1000
    # no try fits (every area is larger than the image): torchvision's central fallback
    square = random_resized_crop_params(5, 10, 10, scale=(2.0, 3.0))
    assert [v.tolist() for v in square] == [[0] * 5, [0] * 5, [10] * 5, [10] * 5]
    wide = random_resized_crop_params(3, 10, 40, scale=(2.0, 3.0))  # ratio 4 > 4/3: the widest box of ratio 4/3
    assert [v.tolist() for v in wide] == [[0] * 3, [13] * 3, [10] * 3, [13] * 3]


def test_random_resized_crop_uses_the_seed_ranges(gen):
    x = torch.randn(3, 1, 32, 32, generator=gen)
    torch.manual_seed(2)
    got = random_resized_crop(x)
    torch.manual_seed(2)
    want = resized_crop(x, *random_resized_crop_params(3, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)))
    torch.testing.assert_close(got, want)


def sharpen_by_loop(image, alpha, lightness):
    """imgaug's Sharpen kernel applied pixel by pixel, borders reflected without the edge (BORDER_REFLECT_101)."""
    h, w = image.shape

    def reflect(i, n):
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    out = torch.empty_like(image)
    for r in range(h):
        for c in range(w):
            total = 0.0
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    weight = (1 - alpha) + alpha * (8 + lightness) if dr == dc == 0 else -alpha
                    total += weight * image[reflect(r + dr, h), reflect(c + dc, w)].item()
            out[r, c] = total
    return out


def test_sharpen_matches_imgaug_kernel_by_hand(gen):
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    got = sharpen(x, alpha=0.5, lightness=1.1)
    for b in range(2):
        for ch in range(3):
            torch.testing.assert_close(got[b, ch], sharpen_by_loop(x[b, ch], 0.5, 1.1))
    # a 3x3 case written out: centre weight 0.5 + 0.5 * 9 = 5, neighbours -0.5
    tiny = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    want = torch.tensor([[5.0, -0.5, 0.0], [-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(sharpen(tiny, alpha=0.5, lightness=1.0)[0, 0], want)
    # alpha 0 is the identity; lightness 1 keeps a constant image
    torch.testing.assert_close(sharpen(x, alpha=0.0), x)
    torch.testing.assert_close(sharpen(torch.full((1, 1, 4, 4), 3.0), lightness=1.0), torch.full((1, 1, 4, 4), 3.0))


def test_sharpen_draws_one_lightness_per_sample(gen):
    x = torch.randn(6, 2, 4, 4, generator=gen)
    torch.manual_seed(4)
    got = sharpen(x)
    torch.manual_seed(4)
    lightness = torch.empty(6).uniform_(0.8, 1.2)
    for b in range(6):
        torch.testing.assert_close(got[b], sharpen(x[b : b + 1], lightness=lightness[b].item())[0])


def test_seed_configurations():
    counts = {name: len(passes) for name, passes in SEED_CONFIGURATIONS.items()}
    assert counts == {
        "sharpen": 1, "sharpen_x5": 5, "gauss": 1, "gauss_x5": 5, "gauss_std_sweep": 6,
        "poisson": 1, "poisson_x5": 5, "poisson_rate_sweep": 6, "hvflip": 2, "random_crop": 1,
    }  # fmt: skip
    x = torch.zeros(1, 1, 4, 4)
    torch.manual_seed(0)
    stds = [p(x).std().item() for p in SEED_CONFIGURATIONS["gauss_std_sweep"]]
    assert stds == sorted(stds)


def test_every_named_augmentation_keeps_the_shape(gen):
    x = torch.randn(6, 1, 8, 8, generator=gen)
    torch.manual_seed(0)
    for name, aug in AUGMENTATIONS.items():
        y = aug(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all(), name
        assert not torch.equal(y, x), name
    assert AUGMENTATIONS["random_resized_crop"](torch.randn(0, 1, 8, 8)).shape == (0, 1, 8, 8)


def test_bad_inputs_name_the_augmentation():
    for aug in (horizontal_flip, vertical_flip, random_resized_crop, sharpen, rotate180):
        with pytest.raises(ValueError, match="images"):
            aug(torch.randn(4, 8))
    with pytest.raises(ValueError, match="2x2"):
        sharpen(torch.randn(2, 1, 1, 5))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(torch.randn(2, 1, 8, 8), scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        random_resized_crop(torch.randn(2, 1, 8, 8), ratio=(0.0, 1.0))
