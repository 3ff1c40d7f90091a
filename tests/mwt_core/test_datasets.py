"""mwt_core.data.datasets: built-in data, torchvision files, user .npz files, resize rule."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mwt_core.data import bundle, datasets, npz
from mwt_core.data.datasets import (
    DATASET_NAMES,
    DatasetBundle,
    DatasetError,
    DatasetInfo,
    InputSpec,
    channel_stats,
    list_datasets,
    load_dataset,
    load_npz,
    resize_images,
)

# ``digits`` (session fixture) comes from tests/mwt_core/conftest.py.


# --------------------------------------------------------------------------- InputSpec


def test_input_spec_json_round_trip() -> None:
    spec = InputSpec(channels=3, size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), hflip=True)
    data = spec.to_json()
    assert json.loads(json.dumps(data)) == data
    assert InputSpec.from_json(data) == spec
    assert InputSpec.from_json(json.dumps(data)) == spec
    assert spec.shape == (3, 32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": 2, "size": 8, "mean": (0, 0), "std": (1, 1)},
        {"channels": 3, "size": 8, "mean": (0,), "std": (1,)},
        {"channels": 1, "size": 8, "mean": (0,), "std": (0,)},
        {"channels": 1, "size": 0, "mean": (0,), "std": (1,)},
    ],
)
def test_input_spec_rejects_inconsistent_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        InputSpec(**kwargs)


def test_input_spec_normalize_uses_mean_and_std() -> None:
    spec = InputSpec(channels=1, size=8, mean=(0.5,), std=(0.25,))
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    assert torch.allclose(spec.normalize(x), torch.full((2, 1, 8, 8), 2.0))


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_spec(digits: DatasetBundle) -> None:
    assert digits.name == "digits"
    assert digits.train_x.shape == (1437, 1, 8, 8)
    assert digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_y.shape == (1437,) and digits.test_y.shape == (360,)
    assert digits.train_x.dtype == torch.uint8 and digits.test_x.dtype == torch.uint8
    assert digits.train_y.dtype == torch.int64 and digits.test_y.dtype == torch.int64
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.num_classes == 10
    assert int(digits.train_x.max()) == 255 and int(digits.train_x.min()) == 0
    spec = digits.spec
    assert (spec.channels, spec.size, spec.hflip) == (1, 8, False)
    mean, std = channel_stats(digits.train_x)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    # sanity: computed from pixel/255 values
    ref = digits.train_x.double() / 255
    assert spec.mean[0] == pytest.approx(float(ref.mean()), abs=1e-5)
    assert spec.std[0] == pytest.approx(float(ref.std(unbiased=False)), abs=1e-5)


def test_digits_split_is_stratified_and_fixed(digits: DatasetBundle) -> None:
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(digits.test_y, minlength=10).numpy()
    train_counts = torch.bincount(digits.train_y, minlength=10).numpy()
    assert (train_counts + test_counts == full).all()
    assert np.abs(test_counts - 0.2 * full).max() <= 1
    again = load_dataset("digits")
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)


def test_digits_takes_no_options() -> None:
    with pytest.raises(DatasetError, match="takes no options"):
        load_dataset("digits", seed=3)


# --------------------------------------------------------------------------- digits28


@pytest.fixture(scope="module")
def digits28() -> DatasetBundle:
    return load_dataset("digits28")


def _nearest_centroid_accuracy(data: DatasetBundle) -> float:
    """Test accuracy of the per-class mean training image, on raw pixels."""
    train = data.train_x.flatten(1).float()
    centroids = torch.stack([train[data.train_y == k].mean(0) for k in range(data.num_classes)])
    nearest = torch.cdist(data.test_x.flatten(1).float(), centroids).argmin(1)
    return float((nearest == data.test_y).float().mean())


def test_digits28_shapes_dtypes_and_spec(digits28: DatasetBundle) -> None:
    assert digits28.name == "digits28"
    assert digits28.train_x.shape == (14370, 1, 28, 28)
    assert digits28.test_x.shape == (3600, 1, 28, 28)
    assert digits28.train_y.shape == (14370,) and digits28.test_y.shape == (3600,)
    assert digits28.train_x.dtype == torch.uint8 and digits28.test_x.dtype == torch.uint8
    assert digits28.train_y.dtype == torch.int64 and digits28.test_y.dtype == torch.int64
    assert digits28.class_names == [str(i) for i in range(10)]
    spec = digits28.spec
    assert (spec.channels, spec.size, spec.hflip) == (1, 28, False)
    mean, std = channel_stats(digits28.train_x)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    # ten different copies of each source image, none of them blank
    copies = digits28.train_x[:10].flatten(1)
    assert len({row.numpy().tobytes() for row in copies}) == 10
    assert (digits28.test_x.flatten(1).float().amax(1) > 128).all()


def test_digits28_is_deterministic_and_split_by_source_image(
    digits: DatasetBundle, digits28: DatasetBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mwt_core.data import digits28 as module

    sources: list[torch.Tensor] = []
    real = module.distort_digits

    def spy(images: torch.Tensor, copies: int, gen: torch.Generator) -> torch.Tensor:
        sources.append(images.clone())
        return real(images, copies, gen)

    monkeypatch.setattr(module, "distort_digits", spy)
    again = load_dataset("digits28")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(digits28, name)), name
    assert again.spec == digits28.spec
    # The copies are made from digits' own splits, train from train and test from test,
    # and those splits share no image: no copy of a test image can be in training.
    train_src, test_src = sources
    assert torch.equal(train_src, digits.train_x) and torch.equal(test_src, digits.test_x)
    assert torch.equal(digits28.train_y, digits.train_y.repeat_interleave(10))
    assert torch.equal(digits28.test_y, digits.test_y.repeat_interleave(10))
    train_rows = {row.numpy().tobytes() for row in train_src}
    assert not any(row.numpy().tobytes() in train_rows for row in test_src)


def test_digits28_is_harder_than_digits(digits: DatasetBundle, digits28: DatasetBundle) -> None:
    easy, hard = _nearest_centroid_accuracy(digits), _nearest_centroid_accuracy(digits28)
    assert easy > 0.8
    assert 0.15 < hard < 0.6  # well above chance (0.1): the digits are still there


def test_distort_digits_order_and_errors(digits: DatasetBundle) -> None:
    from mwt_core.data.digits28 import distort_digits

    images = digits.train_x[:3]
    out = distort_digits(images, 4, torch.Generator().manual_seed(1))
    assert out.shape == (12, 1, 28, 28) and out.dtype == torch.uint8
    same = distort_digits(images, 4, torch.Generator().manual_seed(1))
    other = distort_digits(images, 4, torch.Generator().manual_seed(2))
    assert torch.equal(out, same) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        distort_digits(images[:, 0], 4, torch.Generator())
    with pytest.raises(ValueError, match="copies"):
        distort_digits(images, 0, torch.Generator())


def test_digits28_takes_no_options() -> None:
    with pytest.raises(DatasetError, match="takes no options"):
        load_dataset("digits28", seed=3)


# --------------------------------------------------------------------------- resize rule


def test_min_input_size_resizes_and_makes_three_channels(digits: DatasetBundle) -> None:
    big = load_dataset("digits", min_input_size=32)
    assert big.train_x.shape == (1437, 3, 32, 32)
    assert big.test_x.shape == (360, 3, 32, 32)
    assert big.train_x.dtype == torch.uint8
    assert torch.equal(big.train_x[:, 0], big.train_x[:, 2])
    assert (big.spec.channels, big.spec.size, big.spec.hflip) == (3, 32, False)
    assert len(big.spec.mean) == 3 and big.spec.mean[0] == pytest.approx(
        digits.spec.mean[0], abs=0.01
    )
    assert torch.equal(big.train_y, digits.train_y)
    assert big.class_names == digits.class_names


def test_min_input_size_not_larger_keeps_bundle(digits: DatasetBundle) -> None:
    same = datasets.ensure_min_size(digits, 8)
    assert same is digits
    assert load_dataset("digits", min_input_size=4).spec == digits.spec


def test_resize_images_bilinear_keeps_constants_and_range() -> None:
    x = torch.full((3, 1, 8, 8), 77, dtype=torch.uint8)
    out = resize_images(x, 16, channels=3)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    assert (out == 77).all()
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 8, 8)
    up = resize_images(ramp, 32)
    assert up.shape == (1, 1, 32, 32) and int(up.min()) >= 0 and int(up.max()) <= 252


def test_chunked_stats_and_resize_match_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randint(0, 256, (37, 3, 9, 9), dtype=torch.uint8)
    mean, std = channel_stats(x)
    up = resize_images(x, 16)
    monkeypatch.setattr(bundle, "_CHUNK_ELEMENTS", 500)  # a few images per chunk
    mean2, std2 = channel_stats(x)
    assert mean2 == pytest.approx(mean, abs=1e-6) and std2 == pytest.approx(std, abs=1e-6)
    assert torch.equal(resize_images(x, 16), up)
    ref = x.double().div(255)
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    a = load_dataset("synthetic", num_train=200, num_test=50, num_classes=4, seed=1)
    b = load_dataset("synthetic", num_train=200, num_test=50, num_classes=4, seed=1)
    c = load_dataset("synthetic", num_train=200, num_test=50, num_classes=4, seed=2)
    assert a.train_x.shape == (200, 3, 32, 32) and a.test_x.shape == (50, 3, 32, 32)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert a.num_classes == 4 and a.spec.channels == 3 and a.spec.size == 32
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y, minlength=4).tolist() == [50, 50, 50, 50]


def test_synthetic_defaults_are_cifar_shaped() -> None:
    s = load_dataset("synthetic")
    assert s.train_x.shape == (5000, 3, 32, 32) and s.test_x.shape == (1000, 3, 32, 32)
    assert s.num_classes == 10


def test_synthetic_classes_differ_in_mean_image() -> None:
    s = load_dataset("synthetic", num_train=1000, num_test=10, seed=0)
    means = torch.stack([s.train_x[s.train_y == k].float().mean(dim=(0, 2, 3)) for k in range(10)])
    # class colours differ: the per-class mean colours are not all alike
    assert torch.cdist(means, means).max() > 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_train": 0}, "num_train"),
        ({"num_train": 5, "num_classes": 10}, "at least num_classes"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_synthetic_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset("synthetic", **kwargs)


# --------------------------------------------------------------------------- npz


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _valid_arrays(n_train: int = 40, n_test: int = 12, k: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 12, 12, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % k,
        "x_test": rng.integers(0, 256, (n_test, 12, 12, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % k,
    }


def test_npz_round_trip_nhwc_with_class_names(tmp_path: Path) -> None:
    arrays = _valid_arrays()
    names = np.array(["cat", "dog", "bird", "fish"])
    path = _save(tmp_path / "pets.npz", class_names=names, **arrays)
    b = load_npz(path)
    assert b.name == "pets"
    assert b.class_names == ["cat", "dog", "bird", "fish"]
    assert b.train_x.shape == (40, 3, 12, 12) and b.test_x.shape == (12, 3, 12, 12)
    assert torch.equal(b.train_x, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(b.test_y, torch.from_numpy(arrays["y_test"]).long())
    assert b.train_y.dtype == torch.int64
    assert (b.spec.channels, b.spec.size, b.spec.hflip) == (3, 12, False)
    # through load_dataset, with a display name and the resize rule
    b2 = load_dataset(str(path), min_input_size=16, display_name="my pets")
    assert b2.name == "my pets" and b2.train_x.shape == (40, 3, 16, 16)
    assert load_dataset(path).name == "pets"  # a Path works too


def test_npz_grayscale_and_nchw_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gray = {
        "x_train": rng.integers(0, 256, (10, 9, 9), dtype=np.uint8),
        "y_train": np.array([0, 1] * 5, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (4, 9, 9), dtype=np.uint8),
        "y_test": np.array([1, 0, 1, 0], dtype=np.int32),
    }
    b = load_npz(_save(tmp_path / "g.npz", **gray), name="g")
    assert b.train_x.shape == (10, 1, 9, 9) and b.class_names == ["0", "1"]
    assert torch.equal(b.train_x[:, 0], torch.from_numpy(gray["x_train"]))
    nchw = dict(
        gray,
        x_train=rng.integers(0, 256, (10, 3, 9, 9), dtype=np.uint8),
        x_test=rng.integers(0, 256, (4, 3, 9, 9), dtype=np.uint8),
    )
    b = load_npz(_save(tmp_path / "c.npz", **nchw))
    assert b.train_x.shape == (10, 3, 9, 9)
    assert torch.equal(b.train_x, torch.from_numpy(nchw["x_train"]))


def _bad_cases() -> list[tuple[str, dict, str]]:
    v = _valid_arrays()
    return [
        ("missing key", {k: a for k, a in v.items() if k != "y_test"}, "missing key.*y_test"),
        ("float pixels", dict(v, x_train=v["x_train"].astype(np.float32)), "uint8"),
        ("label count", dict(v, y_train=v["y_train"][:-1]), "39 labels but x_train has 40"),
        ("float labels", dict(v, y_test=v["y_test"].astype(np.float64)), "integer labels"),
        ("negative labels", dict(v, y_train=v["y_train"] - 1), "negative"),
        ("label beyond names", dict(v, class_names=np.array(["a", "b", "c"])), "labels go up to 3"),
        ("not square", dict(v, x_train=v["x_train"][:, :, :10]), "square"),
        (
            "too small",
            dict(v, x_train=v["x_train"][:, :6, :6], x_test=v["x_test"][:, :6, :6]),
            "at least 8x8",
        ),
        ("split mismatch", dict(v, x_test=v["x_test"][:, :10, :10]), "same channels and size"),
        ("bad channels", dict(v, x_train=np.zeros((40, 12, 12, 2), np.uint8)), "C in"),
        ("bad ndim", dict(v, x_train=np.zeros((40, 144), np.uint8)), "dimensions"),
        ("empty", dict(v, x_test=v["x_test"][:0], y_test=v["y_test"][:0]), "no images"),
        ("huge labels", dict(v, y_test=v["y_test"] + 5000), "at most 1000 classes"),
        ("2-d labels", dict(v, y_train=np.zeros((40, 2), np.int64)), "1-D"),
        ("names not strings", dict(v, class_names=np.arange(4)), "strings"),
        ("duplicate names", dict(v, class_names=np.array(["a", "b", "a", "c"])), "unique"),
        ("empty name", dict(v, class_names=np.array(["a", "b", " ", "c"])), "empty name"),
        (
            "class without samples",
            dict(v, y_train=v["y_train"] % 3, class_names=np.array(["a", "b", "c", "d"])),
            "no sample of 1 class.*d",
        ),
        (
            "single class",
            dict(v, y_train=np.zeros(40, np.int64), y_test=np.zeros(12, np.int64)),
            "at least 2 classes",
        ),
    ]


@pytest.mark.parametrize(
    ("arrays", "message"), [pytest.param(a, m, id=case) for case, a, m in _bad_cases()]
)
def test_npz_validation_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_npz(path)


def test_npz_refuses_object_arrays(tmp_path: Path) -> None:
    v = _valid_arrays()
    path = tmp_path / "obj.npz"
    np.savez(path, class_names=np.array(["a", 1, None, "d"], dtype=object), **v)
    with pytest.raises(DatasetError, match="without pickle"):
        load_npz(path)


def test_npz_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_npz(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_npz(junk)
    single = tmp_path / "single.npz"
    with single.open("wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DatasetError, match="single array"):
        load_npz(single)


def test_npz_image_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "many.npz", **_valid_arrays())
    monkeypatch.setattr(npz, "MAX_IMAGES", 50)
    with pytest.raises(DatasetError, match="at most 50"):
        load_npz(path)


def test_unknown_dataset_name() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset("nowhere/data.npz")


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"])
def test_torchvision_missing_files_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, tmp_path / "nothing-here")
    message = str(info.value)
    assert str((tmp_path / "nothing-here").resolve()) in message
    assert "--download" in message and "put the torchvision files there" in message
    assert not (tmp_path / "nothing-here").exists()  # no download, no side effect


def test_data_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MWT_DATA_DIR", str(tmp_path / "envdir"))
    assert datasets.default_data_dir() == tmp_path / "envdir"
    with pytest.raises(DatasetError, match="envdir"):
        load_dataset("mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # unsigned byte data
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, n_train: int = 30, n_test: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    raw = root / folder / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", x_train)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    _write_idx(
        raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    )
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10)
    return x_train


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_files_load_as_uint8_nchw(tmp_path: Path, name: str, folder: str) -> None:
    x_train = _fake_mnist(tmp_path, folder)
    b = load_dataset(name, tmp_path)
    assert b.name == name
    assert b.train_x.shape == (30, 1, 28, 28) and b.test_x.shape == (10, 1, 28, 28)
    assert b.train_x.dtype == torch.uint8 and b.train_y.dtype == torch.int64
    assert torch.equal(b.train_x[:, 0], torch.from_numpy(x_train))
    assert b.num_classes == 10 and b.spec.hflip is False
    if name == "mnist":
        assert b.class_names == [str(i) for i in range(10)]
    else:
        assert b.class_names[0] == "T-shirt/top"
    big = load_dataset(name, tmp_path, min_input_size=32)
    assert big.train_x.shape == (30, 3, 32, 32) and big.spec.channels == 3


def test_cifar10_files_load_channels_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    # Fake files cannot match CIFAR's MD5 sums; skip that check for this test only.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # pixel value = 10 * channel + 1, in CIFAR's row layout (R plane, G plane, B plane)
    plane = np.concatenate([np.full(1024, 10 * c + 1, np.uint8) for c in range(3)])
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        entry = {"data": np.tile(plane, (4, 1)), "labels": [i % 10, 1, 2, 3]}
        (folder / fname).write_bytes(pickle.dumps(entry))
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    assert next(i for i in list_datasets(tmp_path) if i.name == "cifar10").available
    b = load_dataset("cifar10", tmp_path)
    assert b.train_x.shape == (20, 3, 32, 32) and b.test_x.shape == (4, 3, 32, 32)
    assert (
        b.train_x[:, 0].eq(1).all()
        and b.train_x[:, 1].eq(11).all()
        and b.train_x[:, 2].eq(21).all()
    )
    assert b.class_names == names and b.spec.hflip is True
    assert b.train_y[:4].tolist() == [0, 1, 2, 3]


def test_svhn_files_map_label_10_to_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.io
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "check_integrity", lambda *a, **k: True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN's H, W, C, N layout
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, 10 meaning digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    b = load_dataset("svhn", tmp_path)
    assert b.train_x.shape == (12, 3, 32, 32) and b.train_x.dtype == torch.uint8
    assert b.train_y.tolist() == [(i % 10 + 1) % 10 for i in range(12)]
    assert b.spec.hflip is False and b.class_names == [str(i) for i in range(10)]


# --------------------------------------------------------------------------- listing


def test_list_datasets(tmp_path: Path) -> None:
    infos = {i.name: i for i in list_datasets(tmp_path)}
    assert set(infos) == set(DATASET_NAMES)
    assert all(isinstance(i, DatasetInfo) for i in infos.values())
    assert infos["digits"] == DatasetInfo("digits", 10, 1, 8, True, "scikit-learn")
    assert infos["synthetic"].available and infos["synthetic"].channels == 3
    assert infos["digits28"] == DatasetInfo("digits28", 10, 1, 28, True, "scikit-learn")
    for name in ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"):
        assert infos[name].available is False and infos[name].source == "torchvision"
    assert infos["cifar100"].num_classes == 100
    _fake_mnist(tmp_path, "MNIST")
    infos = {i.name: i for i in list_datasets(tmp_path)}
    assert infos["mnist"].available and not infos["fashion_mnist"].available


def test_holdout_carves_a_stratified_validation_split_from_training():
    from mwt_core.data.datasets import DatasetError, holdout, load_dataset

    data = load_dataset("digits")
    held = holdout(data, 0.2)
    assert len(held.train_y) + len(held.test_y) == len(data.train_y) == 1437
    assert len(held.test_y) == 288
    # Stratified: every class keeps about a fifth of its training images for validation.
    per_class = torch.bincount(held.test_y, minlength=10).float() / torch.bincount(data.train_y).float()
    assert torch.all((per_class - 0.2).abs() < 0.02)
    # The two parts are exactly the training split, re-partitioned: the test split never enters.
    def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
        return sorted(xi.numpy().tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y, strict=True))

    both = rows(torch.cat([held.train_x, held.test_x]), torch.cat([held.train_y, held.test_y]))
    assert both == rows(data.train_x, data.train_y)
    assert held.test_x.shape[1:] == data.train_x.shape[1:]
    with pytest.raises(DatasetError, match="fraction"):
        holdout(data, 1.5)


def test_resident_images_are_gathered_on_their_device_without_a_host_round_trip(monkeypatch):
    # The caller's device may be written without an index ("cuda") while the data's reads
    # "cuda:0"; comparing the two took resident data for host data and sent every batch's
    # indices through the host (two device syncs a step on a GPU). "cpu:0" vs "cpu" is the
    # same mismatch on this machine.
    from mwt_core.data.batches import ImageBatches
    from mwt_core.data.datasets import InputSpec

    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    batches = ImageBatches(images, torch.arange(8), InputSpec(1, 4, (0.5,), (0.5,)),
                           torch.device("cpu", 0))

    def no_host_copy(self, *a, **k):
        raise AssertionError("batch indices were copied to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    x, y = batches.batch(torch.tensor([5, 2]))
    assert y.tolist() == [5, 2]
    assert torch.allclose(x, (images[[5, 2]].float() / 255 - 0.5) / 0.5, atol=1e-6)
