"""Datasets as uint8 tensors: built-in, torchvision and user ``.npz`` files.

Every loader returns a :class:`DatasetBundle`: train and test images as uint8
``N x C x H x W`` tensors, int64 labels, class names and an :class:`InputSpec`
(channels, size, per-channel mean/std in [0, 1] units of the train split, and
whether horizontal flips keep the label).

Names understood by :func:`load_dataset`:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  no download), split 80/20 stratified with a fixed seed.
- ``synthetic``: generated CIFAR-shaped (3x32x32) images whose class decides a
  colour and a stripe pattern, plus noise; for smoke tests and benchmarks.
- ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion_mnist``: the torchvision
  files under ``data_dir`` (``$MWT_DATA_DIR``, else ``./data``); fetched only
  with ``download=True``.
- a path to a ``.npz`` file (see :func:`load_npz`).

Every user-facing failure raises :class:`DatasetError` (a ``ValueError``).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mwt_core.config import DEFAULT_DATASET

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

# Limits for user-provided data.
MAX_IMAGES = 2_000_000  # train + test
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
MAX_CLASSES = 1000

_CHUNK_ELEMENTS = 1 << 24  # float32 values per chunk when computing statistics or resizing


class DatasetError(ValueError):
    """A dataset cannot be loaded: missing files, bad ``.npz`` contents, bad options."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """What a model trained on a dataset expects as input.

    ``mean`` and ``std`` are per channel, in units of pixel/255 (as in torchvision's
    ``Normalize``); ``hflip`` tells whether a horizontal flip keeps the label.
    """

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.channels not in (1, 3):
            raise ValueError(f"InputSpec.channels must be 1 or 3, got {self.channels}")
        if self.size < 1:
            raise ValueError(f"InputSpec.size must be positive, got {self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"InputSpec needs one mean and one std per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(not s > 0 for s in self.std):
            raise ValueError(f"InputSpec.std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, self.size, self.size)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_json` reads it back."""
        return {
            "channels": self.channels,
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "hflip": self.hflip,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> InputSpec:
        """Build from :meth:`to_json`'s dict (or that dict as a JSON string)."""
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        assert isinstance(data, dict)
        return cls(
            channels=int(data["channels"]),
            size=int(data["size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            hflip=bool(data.get("hflip", False)),
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x C x H x W`` images -> normalised float32 tensor."""
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass(eq=False)
class DatasetBundle:
    """A dataset in memory: uint8 ``N x C x H x W`` images, int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    spec: InputSpec

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no tensors): for manifests, logs and the API."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "num_train": int(self.train_y.shape[0]),
            "num_test": int(self.test_y.shape[0]),
            "input_spec": self.spec.to_json(),
        }

    def __repr__(self) -> str:
        return (
            f"DatasetBundle(name={self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, classes={self.num_classes}, spec={self.spec})"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of :func:`list_datasets`."""

    name: str
    num_classes: int
    channels: int
    size: int
    available: bool
    source: str


# --------------------------------------------------------------------------- helpers


def default_data_dir() -> Path:
    """``$MWT_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get("MWT_DATA_DIR") or "data")


def _data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _chunk_rows(per_image: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, per_image))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``N x C x H x W`` images, in pixel/255 units.

    Computed in chunks (float64 sums) so large datasets need little extra memory.
    A constant channel gets std 1.0 rather than 0.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("channel_stats needs a non-empty N x C x H x W tensor")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    rows = _chunk_rows(images[0].numel())
    for start in range(0, images.shape[0], rows):
        chunk = images[start : start + rows].to(torch.float32)
        total += chunk.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += chunk.square().sum(dim=(0, 2, 3), dtype=torch.float64)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count / 255.0
    var = (total_sq / count / 255.0**2 - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    mean_t = tuple(round(float(m), 6) for m in mean)
    std_t = tuple(round(float(s), 6) if s > 1e-6 else 1.0 for s in std)
    return mean_t, std_t


def resize_images(images: torch.Tensor, size: int, channels: int | None = None) -> torch.Tensor:
    """Bilinear resize of uint8 ``N x C x H x W`` images to ``size x size``.

    With ``channels=3`` a 1-channel input is repeated to 3 channels. Works in
    chunks; returns a new uint8 tensor.
    """
    n, c, h, w = images.shape
    c_out = channels or c
    if c_out != c and not (c == 1 and c_out == 3):
        raise ValueError(f"can only turn 1 channel into 3, not {c} into {c_out}")
    out = torch.empty((n, c_out, size, size), dtype=torch.uint8)
    rows = _chunk_rows(max(c, c_out) * max(h * w, size * size))
    for start in range(0, n, rows):
        chunk = images[start : start + rows].to(torch.float32)
        if (h, w) != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        if c_out != c:
            chunk = chunk.expand(-1, c_out, -1, -1)
        out[start : start + rows] = chunk.round().clamp_(0, 255).to(torch.uint8)
    return out


def model_input_shape(channels: int, size: int, min_input_size: int) -> tuple[int, int]:
    """``(channels, size)`` of the images a model sees after :func:`ensure_min_size`."""
    if min_input_size <= 0 or size >= min_input_size:
        return channels, size
    return 3, min_input_size


def ensure_min_size(bundle: DatasetBundle, min_input_size: int) -> DatasetBundle:
    """The contract's resize rule.

    If ``bundle.spec.size < min_input_size``, images are resized bilinearly to
    ``min_input_size`` and 1-channel images become 3-channel; mean/std are
    recomputed on the resized train split. Otherwise the bundle is returned as is.
    """
    channels, size = model_input_shape(bundle.spec.channels, bundle.spec.size, min_input_size)
    if size == bundle.spec.size:
        return bundle
    train_x = resize_images(bundle.train_x, size, channels=channels)
    test_x = resize_images(bundle.test_x, size, channels=channels)
    mean, std = channel_stats(train_x)
    spec = InputSpec(channels=channels, size=size, mean=mean, std=std, hflip=bundle.spec.hflip)
    return DatasetBundle(
        name=bundle.name,
        train_x=train_x,
        train_y=bundle.train_y,
        test_x=test_x,
        test_y=bundle.test_y,
        class_names=list(bundle.class_names),
        spec=spec,
    )


def _bundle(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    class_names: list[str],
    hflip: bool,
) -> DatasetBundle:
    """Assemble a bundle; mean/std come from the train split."""
    train_x = train_x.contiguous()
    test_x = test_x.contiguous()
    mean, std = channel_stats(train_x)
    spec = InputSpec(
        channels=int(train_x.shape[1]), size=int(train_x.shape[2]), mean=mean, std=std, hflip=hflip
    )
    return DatasetBundle(
        name=name,
        train_x=train_x,
        train_y=train_y.to(torch.int64).contiguous(),
        test_x=test_x,
        test_y=test_y.to(torch.int64).contiguous(),
        class_names=[str(c) for c in class_names],
        spec=spec,
    )


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


def holdout(bundle: DatasetBundle, fraction: float = 0.2, seed: int = 0) -> DatasetBundle:
    """The same dataset with its test split replaced by a stratified ``fraction`` of the
    training split (and that part removed from training): for choosing settings without
    ever looking at the test split."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DatasetError(f"holdout fraction must be in (0, 1), got {fraction}")
    idx = np.arange(len(bundle.train_y))
    labels = bundle.train_y.numpy()
    try:
        tr, va = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:  # a class too small to split
        raise DatasetError(f"cannot hold out {fraction} of {bundle.name}'s training split: {exc}") from None
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return replace(bundle, name=f"{bundle.name}-holdout", train_x=bundle.train_x[tr],
                   train_y=bundle.train_y[tr], test_x=bundle.train_x[va], test_y=bundle.train_y[va])


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


# --------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _TorchvisionSet:
    num_classes: int
    channels: int
    size: int
    hflip: bool
    # Any one of these file sets (relative to data_dir) makes the dataset available.
    file_sets: tuple[tuple[str, ...], ...]


def _mnist_files(folder: str) -> tuple[tuple[str, ...], ...]:
    raw = tuple(
        f"{folder}/raw/{f}"
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )
    legacy = (f"{folder}/processed/training.pt", f"{folder}/processed/test.pt")
    return (raw, legacy)


_TORCHVISION: dict[str, _TorchvisionSet] = {
    "cifar10": _TorchvisionSet(
        10,
        3,
        32,
        True,
        (
            tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
            + ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"),
        ),
    ),
    "cifar100": _TorchvisionSet(
        100,
        3,
        32,
        True,
        (("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),),
    ),
    "svhn": _TorchvisionSet(10, 3, 32, False, (("train_32x32.mat", "test_32x32.mat"),)),
    "mnist": _TorchvisionSet(10, 1, 28, False, _mnist_files("MNIST")),
    "fashion_mnist": _TorchvisionSet(10, 1, 28, False, _mnist_files("FashionMNIST")),
}

DATASET_NAMES: tuple[str, ...] = ("digits", "synthetic", *_TORCHVISION)

_ALIASES = {
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}


def _torchvision_available(name: str, root: Path) -> bool:
    files = _TORCHVISION[name].file_sets
    return any(all((root / f).is_file() for f in file_set) for file_set in files)


def torchvision_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False
) -> DatasetBundle:
    """Load a torchvision dataset from ``data_dir`` into uint8 tensors (once).

    Without ``download`` the files must already be there; torchvision checks the
    CIFAR/SVHN files' MD5 sums before reading them.
    """
    if name not in _TORCHVISION:
        raise DatasetError(
            f"unknown torchvision dataset {name!r}; choose one of {list(_TORCHVISION)}"
        )
    meta = _TORCHVISION[name]
    root = _data_dir(data_dir)
    if not _torchvision_available(name, root):
        if not download:
            expected = ", ".join(meta.file_sets[0])
            raise DatasetError(
                f"dataset {name!r} not found in {root.resolve()} (expected {expected}). "
                f"Download it with --download (download=True), or put the torchvision files "
                f"there (or point MWT_DATA_DIR / --data-dir at the folder that holds them)."
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"cannot create data directory {root}: {exc}") from exc

    import torchvision.datasets as tvd

    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=False)

            def images(ds: Any) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))

            def labels(ds: Any) -> torch.Tensor:
                return torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))

            class_names = list(train.classes)
        elif name == "svhn":
            train = tvd.SVHN(str(root), split="train", download=download)
            test = tvd.SVHN(str(root), split="test", download=download)

            def images(ds: Any) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))

            def labels(ds: Any) -> torch.Tensor:
                return torch.as_tensor(np.asarray(ds.labels, dtype=np.int64))

            class_names = [str(i) for i in range(10)]
        else:
            cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
            train = cls(str(root), train=True, download=download)
            test = cls(str(root), train=False, download=False)

            def images(ds: Any) -> torch.Tensor:
                return ds.data.to(torch.uint8).unsqueeze(1)

            def labels(ds: Any) -> torch.Tensor:
                return ds.targets.to(torch.int64)

            class_names = [str(i) for i in range(10)] if name == "mnist" else list(train.classes)
    except DatasetError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        action = "downloading" if download else "reading"
        raise DatasetError(
            f"{action} {name!r} in {root.resolve()} failed: {exc}. If the files are incomplete "
            f"or corrupted, delete them and run again with --download."
        ) from exc

    return _bundle(
        name,
        images(train),
        labels(train),
        images(test),
        labels(test),
        class_names,
        hflip=meta.hflip,
    )


# --------------------------------------------------------------------------- npz

_NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _peek_header(npz: Any, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of ``key`` read from the .npy header, without loading the data."""
    try:
        with npz.zip.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return None
            return tuple(shape), dtype
    except Exception:  # header peeking is only an early check; full checks follow
        return None


def _images_nchw(x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DatasetError(
            f"{key} must be uint8 pixels 0..255, got dtype {x.dtype}; "
            f"scale and convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        if x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]:
            pass  # N, C, H, W
        elif x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]:
            x = x.transpose(0, 3, 1, 2)  # N, H, W, C -> N, C, H, W
        else:
            raise DatasetError(
                f"{key} has shape {x.shape}; expected square images as N,H,W or N,H,W,C "
                f"or N,C,H,W with C in {{1, 3}} and H == W"
            )
    else:
        raise DatasetError(
            f"{key} has {x.ndim} dimensions (shape {x.shape}); expected N,H,W or N,H,W,C or N,C,H,W"
        )
    n, _, h, w = x.shape
    if n == 0:
        raise DatasetError(f"{key} holds no images")
    if h != w:
        raise DatasetError(f"{key}: images must be square, got {h}x{w}")
    if h < MIN_IMAGE_SIZE:
        raise DatasetError(
            f"{key}: images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {h}x{w}"
        )
    if h > MAX_IMAGE_SIZE:
        raise DatasetError(
            f"{key}: images must be at most {MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE}, got {h}x{w}"
        )
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, key: str, n: int, x_key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{key} must be a 1-D array of integer labels, got shape {y.shape}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{key} must hold integer labels, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise DatasetError(f"{key} has {y.shape[0]} labels but {x_key} has {n} images")
    if n and int(y.min()) < 0:
        raise DatasetError(f"{key} has negative labels (min {int(y.min())}); labels must be 0..K-1")
    if n and int(y.max()) >= MAX_CLASSES:
        raise DatasetError(
            f"{key} has labels up to {int(y.max())}; labels must be 0..K-1 with at most "
            f"{MAX_CLASSES} classes"
        )
    return y.astype(np.int64)


def _class_names(arr: np.ndarray, num_classes: int | None) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in ("U", "S"):
        raise DatasetError(
            f"class_names must be a 1-D array of strings, got dtype {arr.dtype} shape {arr.shape}"
        )
    names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
    names = [n.strip() for n in names]
    if any(not n for n in names):
        raise DatasetError("class_names contains an empty name")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"class_names must be unique; repeated: {dupes}")
    if any(len(n) > 200 for n in names):
        raise DatasetError("class_names: names must be at most 200 characters")
    if num_classes is not None and len(names) != num_classes:
        raise DatasetError(f"class_names has {len(names)} names but labels need {num_classes}")
    return names


def load_npz(path: str | os.PathLike[str], name: str | None = None) -> DatasetBundle:
    """Load and validate a user dataset saved with ``np.savez``.

    Keys: ``x_train``, ``x_test`` (uint8; ``N,H,W``, ``N,H,W,C`` or ``N,C,H,W`` with
    C in {1, 3}; square, at least 8 pixels), ``y_train``, ``y_test`` (integers
    0..K-1) and optionally ``class_names`` (K strings). Loaded with
    ``allow_pickle=False``: object arrays are refused.
    """
    p = Path(path).expanduser()
    label = str(path)
    if not p.is_file():
        raise DatasetError(f"{label}: no such file")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{label}: not a readable .npz file ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{label}: holds a single array; expected an .npz archive (np.savez) with keys "
            f"{', '.join(_NPZ_REQUIRED)} [, class_names]"
        )
    with npz:
        missing = [k for k in _NPZ_REQUIRED if k not in npz.files]
        if missing:
            raise DatasetError(
                f"{label}: missing key(s) {', '.join(missing)}; expected {', '.join(_NPZ_REQUIRED)}"
                f" [, class_names], found {', '.join(npz.files) or 'nothing'}"
            )
        # Early checks from the headers, before reading possibly huge arrays.
        total = 0
        for key in ("x_train", "x_test"):
            header = _peek_header(npz, key)
            if header is None:
                continue
            shape, dtype = header
            if dtype != np.uint8:
                raise DatasetError(f"{label}: {key} must be uint8 pixels 0..255, got dtype {dtype}")
            if shape:
                total += int(shape[0])
        if total > MAX_IMAGES:
            raise DatasetError(f"{label}: {total} images; at most {MAX_IMAGES} are accepted")

        arrays: dict[str, np.ndarray] = {}
        for key in (*_NPZ_REQUIRED, "class_names"):
            if key not in npz.files:
                continue
            try:
                arrays[key] = npz[key]
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise DatasetError(
                    f"{label}: {key} cannot be read without pickle ({exc}); store plain "
                    f"numeric arrays (and a unicode string array for class_names)"
                ) from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DatasetError(f"{label}: {key} is corrupted ({exc})") from exc

    x_train = _images_nchw(arrays["x_train"], "x_train")
    x_test = _images_nchw(arrays["x_test"], "x_test")
    if x_train.shape[0] + x_test.shape[0] > MAX_IMAGES:
        raise DatasetError(
            f"{label}: {x_train.shape[0] + x_test.shape[0]} images; at most {MAX_IMAGES} are accepted"
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"x_train images are {x_train.shape[1:]} (C,H,W) but x_test images are "
            f"{x_test.shape[1:]}; both splits must have the same channels and size"
        )
    y_train = _labels(arrays["y_train"], "y_train", x_train.shape[0], "x_train")
    y_test = _labels(arrays["y_test"], "y_test", x_test.shape[0], "x_test")
    max_label = int(max(y_train.max(), y_test.max()))

    if "class_names" in arrays:
        names = _class_names(arrays["class_names"], None)
        if max_label >= len(names):
            raise DatasetError(
                f"labels go up to {max_label} but class_names has {len(names)} names "
                f"(labels must be 0..{len(names) - 1})"
            )
    else:
        names = [str(i) for i in range(max_label + 1)]
    k = len(names)
    if k < 2:
        raise DatasetError(f"a classifier needs at least 2 classes, found {k}")
    if k > MAX_CLASSES:
        raise DatasetError(f"{k} classes; at most {MAX_CLASSES} are supported")
    counts = np.bincount(y_train, minlength=k)
    absent = [names[i] for i in np.flatnonzero(counts == 0)]
    if absent:
        shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
        raise DatasetError(f"y_train has no sample of {len(absent)} class(es): {shown}")

    return _bundle(
        name or p.stem,
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        names,
        hflip=False,  # unknown for user data: never assume flips keep the label
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
