"""``digits28``: a harder built-in dataset made from scikit-learn's 8x8 digits, no download.

Every source image of ``digits`` becomes :data:`COPIES` distorted 28x28 grey images, MNIST
style: the digit is upsampled to a 20x20 box in the middle of a 28x28 frame, then each copy
gets its own random affine transform (rotation, scale, shear, shift), on some copies a
thicker or thinner stroke, and Gaussian pixel noise of a random strength.

The train and test splits are ``digits``' own (split by source image before distorting),
so no copy of a test image is ever in the training split. The images are drawn from fixed
seeds, one stream per split: every load gives the same tensors, and a fresh bundle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mwt_core.data.bundle import DatasetBundle, _bundle

__all__ = ["COPIES", "IMAGE_SIZE", "digits28_dataset", "distort_digits"]

COPIES = 10
IMAGE_SIZE = 28
_DIGIT_BOX = 20  # MNIST's digits fill a 20x20 box of the 28x28 frame

# Ranges of the random distortions; pixel values on the 0..255 scale.
_MAX_ROTATION_DEG = 30.0
_SCALE_RANGE = (0.7, 1.2)
_MAX_SHEAR = 0.4
_MAX_SHIFT_PX = 4.0
_STROKE_CHANGE_FRACTION = 0.25  # of the copies dilated, and as many again eroded
_NOISE_SIGMA_RANGE = (10.0, 80.0)

# One stream per split, so changing one split's size never changes the other's images.
_TRAIN_SEED = 28_000
_TEST_SEED = 28_001

_BATCH = 4096  # images distorted at a time: bounds the float32 working memory


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _affine_grids(n: int, gen: torch.Generator) -> torch.Tensor:
    """Sampling grids (``n x H x W x 2``) for ``n`` random affine transforms."""
    angle = _uniform(n, -_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, gen) * (math.pi / 180.0)
    scale = _uniform(n, *_SCALE_RANGE, gen)
    shear = _uniform(n, -_MAX_SHEAR, _MAX_SHEAR, gen)
    # affine_grid works in [-1, 1] coordinates: a frame is 2 units wide.
    shift = _uniform(2 * n, -_MAX_SHIFT_PX, _MAX_SHIFT_PX, gen).view(n, 2) * (2.0 / IMAGE_SIZE)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([cos, -sin, sin, cos], dim=1).view(n, 2, 2)
    shear_m = torch.zeros(n, 2, 2)
    shear_m[:, 0, 0] = 1.0
    shear_m[:, 0, 1] = shear
    shear_m[:, 1, 1] = 1.0
    forward = rotate @ shear_m * scale.view(n, 1, 1)
    # grid_sample asks, for every output pixel, where to read in the input: the inverse map.
    inverse = torch.linalg.inv(forward)
    offset = -(inverse @ shift.unsqueeze(2))
    theta = torch.cat([inverse, offset], dim=2)
    return F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)


def _change_strokes(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Thicken (grey dilation) some images and thin (grey erosion) as many others."""
    n = x.shape[0]
    pick = torch.rand(n, generator=gen).view(n, 1, 1, 1)
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    x = torch.where(pick < _STROKE_CHANGE_FRACTION, thick, x)
    return torch.where(pick > 1.0 - _STROKE_CHANGE_FRACTION, thin, x)


def distort_digits(images: torch.Tensor, copies: int, gen: torch.Generator) -> torch.Tensor:
    """``copies`` distorted 28x28 versions of each uint8 ``N x 1 x h x w`` digit image.

    Returns uint8 ``N*copies x 1 x 28 x 28``; rows ``i*copies .. i*copies+copies-1`` are
    the copies of image ``i``. The randomness comes from ``gen`` only.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"distort_digits needs N x 1 x H x W images, got {tuple(images.shape)}")
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    pad = (IMAGE_SIZE - _DIGIT_BOX) // 2
    boxed = F.interpolate(
        images.float(), size=(_DIGIT_BOX, _DIGIT_BOX), mode="bilinear", align_corners=False
    )
    framed = F.pad(boxed, (pad, pad, pad, pad))
    sources = framed.repeat_interleave(copies, dim=0)
    out = torch.empty(sources.shape, dtype=torch.uint8)
    for start in range(0, sources.shape[0], _BATCH):
        x = sources[start : start + _BATCH]
        n = x.shape[0]
        x = F.grid_sample(
            x, _affine_grids(n, gen), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        x = _change_strokes(x, gen)
        sigma = _uniform(n, *_NOISE_SIGMA_RANGE, gen).view(n, 1, 1, 1)
        x = x + sigma * torch.randn(x.shape, generator=gen)
        out[start : start + n] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def digits28_dataset(source: DatasetBundle) -> DatasetBundle:
    """``digits`` (``source``, as ``datasets.digits_dataset`` gives it) made harder: 14,370
    train / 3,600 test distorted, noisy 1x28x28 digits.

    Ten copies of each of ``source``'s images, split as it is (so by source image).
    Deterministic; each call builds a new bundle.
    """
    train_x = distort_digits(source.train_x, COPIES, torch.Generator().manual_seed(_TRAIN_SEED))
    test_x = distort_digits(source.test_x, COPIES, torch.Generator().manual_seed(_TEST_SEED))
    return _bundle(
        "digits28",
        train_x,
        source.train_y.repeat_interleave(COPIES),
        test_x,
        source.test_y.repeat_interleave(COPIES),
        list(source.class_names),
        hflip=False,  # a mirrored digit is not the same digit
    )
