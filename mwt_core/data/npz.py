"""User datasets as ``.npz`` files: validated from their headers before any array is loaded."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mwt_core.data.bundle import (
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MIN_IMAGE_SIZE,
    DatasetBundle,
    DatasetError,
    _bundle,
)

# --------------------------------------------------------------------------- npz

_NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _member(npz: Any, key: str) -> str:
    """The zip member ``npz[key]`` reads: one named ``key`` itself wins over ``key.npy``."""
    return key if key in npz.zip.namelist() else f"{key}.npy"


def _peek_header(npz: Any, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of ``key`` read from the .npy header, without loading the data."""
    try:
        with npz.zip.open(_member(npz, key)) as fh:
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
            if not isinstance(arrays[key], np.ndarray):  # numpy hands back other members' bytes
                raise DatasetError(
                    f"{label}: {key} is not a .npy array; save the arrays with np.savez"
                )

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
