"""The dataset types every loader returns (:class:`DatasetBundle`, :class:`InputSpec`), their
limits, and the operations on a loaded bundle (statistics, resizing, a held-out split)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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


def split_validation(bundle: DatasetBundle, fraction: float, seed: int
                     ) -> tuple[DatasetBundle, DatasetBundle | None]:
    """``(fit, val)``: ``bundle`` with a stratified ``fraction`` of its training split moved
    out, and that part as a bundle whose *test* split it is (same spec, so images are
    normalised as in training). ``val`` is None where ``fraction`` is 0 or rounds to no image.

    Each class gives ``round(fraction * its size)`` images, drawn by a generator seeded with
    ``seed``, so the slice is fixed by the run's seed whatever the machine; a class of one image
    stays whole in training. The test split is untouched and never part of either.
    """
    if not 0 <= fraction < 1:
        raise DatasetError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return bundle, None
    gen = torch.Generator().manual_seed(seed)
    labels = bundle.train_y
    held: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        take = min(int(round(fraction * len(idx))), len(idx) - 1)
        if take > 0:
            held.append(idx[torch.randperm(len(idx), generator=gen)[:take]])
    if not held:
        return bundle, None
    val_idx = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    fit = replace(bundle, train_x=bundle.train_x[keep], train_y=labels[keep])
    val = replace(bundle, name=f"{bundle.name}-validation", train_x=bundle.train_x[val_idx],
                  train_y=labels[val_idx], test_x=bundle.train_x[val_idx],
                  test_y=labels[val_idx])
    return fit, val
