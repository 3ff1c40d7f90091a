"""Datasets as uint8 tensors: built-in, torchvision and user ``.npz`` files.

Every loader returns a :class:`DatasetBundle`: train and test images as uint8
``N x C x H x W`` tensors, int64 labels, class names and an :class:`InputSpec`
(channels, size, per-channel mean/std in [0, 1] units of the train split, and
whether horizontal flips keep the label).

Names understood by :func:`load_dataset`:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  no download), split 80/20 stratified with a fixed seed.
- ``digits28``: a harder ``digits`` (see :mod:`mwt_core.data.digits28`): ten
  distorted, noisy 1x28x28 copies of each of its images (rotation, scale, shear,
  shift, stroke width), 14,370 train / 3,600 test, split by source image.
- ``synthetic``: generated CIFAR-shaped (3x32x32) images whose class decides a
  colour and a stripe pattern, plus noise; for smoke tests and benchmarks.
- ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion_mnist``: the torchvision
  files under ``data_dir`` (``$MWT_DATA_DIR``, else ``./data``); fetched only
  with ``download=True``.
- a path to a ``.npz`` file (see :func:`load_npz`).

Every user-facing failure raises :class:`DatasetError` (a ``ValueError``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mwt_core.config import DEFAULT_DATASET
from mwt_core.data.bundle import (
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MIN_IMAGE_SIZE,
    DatasetBundle,
    DatasetError,
    DatasetInfo,
    InputSpec,
    _bundle,
    _data_dir,
    channel_stats,
    default_data_dir,
    ensure_min_size,
    holdout,
    resize_images,
)
from mwt_core.data.digits28 import digits28_dataset
from mwt_core.data.npz import load_npz
from mwt_core.data.torchvision_sets import _TORCHVISION, _torchvision_available, torchvision_dataset

__all__ = [
    "DATASET_NAMES",
    "MAX_CLASSES",
    "MAX_IMAGES",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "DatasetBundle",
    "DatasetError",
    "DatasetInfo",
    "InputSpec",
    "channel_stats",
    "default_data_dir",
    "digits28_dataset",
    "digits_dataset",
    "holdout",
    "ensure_min_size",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "resize_images",
    "synthetic_dataset",
    "torchvision_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "digits28", "synthetic", *_TORCHVISION)

_ALIASES = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}


# --------------------------------------------------------------------------- digits


def digits_dataset() -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits: 1,437 train / 360 test, stratified, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are counts 0..16; scale to 0..255.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = images[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return _bundle(
        "digits",
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(y_te),
        [str(i) for i in range(10)],
        hflip=False,  # a mirrored digit is not the same digit
    )


# --------------------------------------------------------------------------- synthetic


def _synthetic_split(
    n: int,
    colours: torch.Tensor,
    angles: torch.Tensor,
    freqs: torch.Tensor,
    size: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = colours.shape[0]
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    theta = (angles[labels] + 0.15 * torch.randn(n, generator=gen)).view(n, 1, 1)
    phase = (2 * math.pi * torch.rand(n, generator=gen)).view(n, 1, 1)
    freq = freqs[labels].view(n, 1, 1)
    stripes = torch.sin(
        2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase
    ).unsqueeze(1)  # n x 1 x H x W
    colour = colours[labels] + 0.25 * torch.randn(n, 3, generator=gen)  # n x 3
    brightness = 20.0 * torch.randn(n, 1, 1, 1, generator=gen)
    img = (
        127.5
        + brightness
        + 45.0 * colour.view(n, 3, 1, 1)
        + 40.0 * stripes * colour.view(n, 3, 1, 1).sign()
        + 35.0 * torch.randn(n, 3, size, size, generator=gen)
    )
    return img.round_().clamp_(0, 255).to(torch.uint8), labels


def synthetic_dataset(
    num_train: int = 5000, num_test: int = 1000, num_classes: int = 10, seed: int = 0
) -> DatasetBundle:
    """Generated CIFAR-shaped (3x32x32) data that a small CNN learns quickly.

    Each class has a mean colour and a stripe pattern (orientation and frequency);
    every image gets a random phase, colour jitter, brightness shift and pixel
    noise. The classes themselves depend only on ``num_classes``; ``seed`` draws
    the samples, so the same arguments always give the same tensors.
    """
    for label, value, lo in (("num_train", num_train, 1), ("num_test", num_test, 1)):
        if int(value) < lo or int(value) > MAX_IMAGES:
            raise DatasetError(f"synthetic: {label} must be in 1..{MAX_IMAGES}, got {value}")
    if not 2 <= int(num_classes) <= MAX_CLASSES:
        raise DatasetError(f"synthetic: num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    num_train, num_test, num_classes = int(num_train), int(num_test), int(num_classes)
    if num_train < num_classes:
        raise DatasetError(
            f"synthetic: num_train ({num_train}) must be at least num_classes ({num_classes})"
        )
    task = torch.Generator().manual_seed(1_000_003 + num_classes)
    colours = torch.rand(num_classes, 3, generator=task) * 2 - 1
    angles = torch.rand(num_classes, generator=task) * math.pi
    freqs = 1.0 + torch.randint(0, 4, (num_classes,), generator=task).float()
    gen = torch.Generator().manual_seed(int(seed))
    train_x, train_y = _synthetic_split(num_train, colours, angles, freqs, 32, gen)
    test_x, test_y = _synthetic_split(num_test, colours, angles, freqs, 32, gen)
    return _bundle(
        "synthetic",
        train_x,
        train_y,
        test_x,
        test_y,
        [f"class{i}" for i in range(num_classes)],
        hflip=False,  # a mirrored stripe pattern may be another class's
    )


# --------------------------------------------------------------------------- entry points


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(".npz") or os.sep in name or "/" in name


def load_dataset(
    name: str | os.PathLike[str] = DEFAULT_DATASET,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    min_input_size: int = 0,
    download: bool = False,
    **kw: Any,
) -> DatasetBundle:
    """Load a dataset by name (see the module docstring) or from a ``.npz`` path.

    ``kw`` are options of the dataset (``synthetic``: ``num_train``, ``num_test``,
    ``num_classes``, ``seed``; ``.npz``: ``display_name``). Then the resize rule of
    :func:`ensure_min_size` applies.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise DatasetError("dataset name must be a non-empty string")
    key = _canonical(name)

    def no_options() -> None:
        if kw:
            raise DatasetError(f"dataset {key!r} takes no options, got {', '.join(sorted(kw))}")

    if key == "digits":
        no_options()
        bundle = digits_dataset()
    elif key == "digits28":
        no_options()
        bundle = digits28_dataset(digits_dataset())
    elif key == "synthetic":
        allowed = {"num_train", "num_test", "num_classes", "seed"}
        unknown = sorted(set(kw) - allowed)
        if unknown:
            raise DatasetError(
                f"synthetic: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        bundle = synthetic_dataset(**kw)
    elif key in _TORCHVISION:
        no_options()
        bundle = torchvision_dataset(key, data_dir, download=download)
    elif _looks_like_path(name) or Path(name).expanduser().is_file():
        display_name = kw.pop("display_name", None)
        if kw:
            raise DatasetError(f".npz datasets take no options but display_name, got {sorted(kw)}")
        path = Path(name).expanduser()
        if not path.is_file() and data_dir is not None and (Path(data_dir) / name).is_file():
            path = Path(data_dir) / name
        bundle = load_npz(path, name=display_name)
    else:
        raise DatasetError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} "
            f"or give the path of a .npz file"
        )
    if min_input_size < 0:
        raise DatasetError(f"min_input_size must be >= 0, got {min_input_size}")
    return ensure_min_size(bundle, int(min_input_size))


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[DatasetInfo]:
    """The built-in datasets; torchvision ones are available iff their files are in ``data_dir``."""
    root = _data_dir(data_dir)
    infos = [
        DatasetInfo("digits", 10, 1, 8, True, "scikit-learn"),
        DatasetInfo("digits28", 10, 1, 28, True, "scikit-learn"),
        DatasetInfo("synthetic", 10, 3, 32, True, "generated"),
    ]
    for name, meta in _TORCHVISION.items():
        infos.append(
            DatasetInfo(
                name,
                meta.num_classes,
                meta.channels,
                meta.size,
                _torchvision_available(name, root),
                "torchvision",
            )
        )
    return infos
