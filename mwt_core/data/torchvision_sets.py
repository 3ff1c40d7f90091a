"""The torchvision datasets (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST), read from a data
directory into uint8 tensors; nothing is downloaded unless asked."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mwt_core.data.bundle import (
    DatasetBundle,
    DatasetError,
    _bundle,
    _data_dir,
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
